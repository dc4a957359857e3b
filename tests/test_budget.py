"""tests/budget.py, the guard that keeps the suite within its time budget: a pytest session of its own (in a
subprocess, with only the budget plugin) whose tests train, start processes, or do neither, declared or not."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

TESTS = os.path.join(ROOT, "tests")

CONFTEST = f"""
import sys
sys.path.insert(0, {TESTS!r})
import budget

def pytest_addoption(parser):
    budget.add_options(parser)

def pytest_configure(config):
    for marker in ("trains", "process"):
        config.addinivalue_line("markers", marker + "(why): see tests/budget.py")
    config.pluginmanager.register(budget.Budget(config), "diffjax-budget")
"""

TESTS_FILE = """
import subprocess, sys, time

import numpy as np
import pytest

from diffjax.train import Trainer
from fakes import tiny_config


def _trainer():
    return Trainer(tiny_config(), image_shape=(8, 8, 1))


def _step(trainer):
    ids, mask = trainer.models.text_encoder.tokenize(["a bag"] * 8)
    batch = trainer.shard_batch({"image": np.zeros((8, 8, 8, 1), np.float32), "token_ids": ids, "mask": mask})
    trainer.step(trainer.init(), batch)


@pytest.fixture(scope="module")
def shared():
    trainer = _trainer()
    _step(trainer)
    return trainer


def test_trains_its_own():
    _step(_trainer())


@pytest.mark.trains("declared")
def test_trains_declared():
    _step(_trainer())


def test_uses_the_shared_one(shared):
    _step(shared)  # its compiled step, built by a module-scoped fixture


def test_builds_without_training():
    _trainer()


def test_starts_a_process():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.process("declared")
def test_starts_a_process_declared():
    subprocess.run([sys.executable, "-c", "sum(range(10 ** 7))"], check=True)  # a few tenths of a CPU second


def test_slow():
    time.sleep(1.5)
"""


@pytest.mark.process("a pytest session of its own, with only the budget plugin")
def test_the_guard_fails_undeclared_training_and_processes_and_names_slow_tests(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_inner.py").write_text(TESTS_FILE)
    report = tmp_path / "budget.md"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-rA",
                           f"--rootdir={tmp_path}", "--budget-ceiling=1", f"--budget-report={report}", str(tmp_path)],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout
    # The guard fails a test at its teardown: pytest reports it as passed, then as an error.
    errors = set(re.findall(r"^ERROR test_inner\.py::(\w+)", out, re.M))
    passed = set(re.findall(r"^PASSED test_inner\.py::(\w+)", out, re.M))
    assert errors == {"test_trains_its_own", "test_starts_a_process"}, out[-5000:]
    assert len(passed) == 7, out[-5000:]
    assert "trains 1 Trainer(s) of its own" in out and "starts 1 process(es)" in out, out[-5000:]
    assert proc.returncode == 1
    # The summary: the budget line, and the tests over the ceiling by name.
    assert re.search(r"wall [\d.]+ min of the 25 min budget", out), out[-3000:]
    over = set(re.findall(r"over the 1 s per-test ceiling: test_inner\.py::(\w+)", out))
    assert "test_slow" in over and "test_starts_a_process_declared" not in over, out[-3000:]
    rows = report.read_text().splitlines()
    assert rows[0].startswith("| test | wall s | compile s") and len(rows) == 2 + 7
    trained = next(r for r in rows if "test_trains_declared" in r).split("|")
    assert float(trained[3]) > 0  # tracing, lowering and compiling (or loading) its programs
    process = next(r for r in rows if "test_starts_a_process_declared" in r).split("|")
    assert float(process[5]) > 0  # the child's CPU seconds
