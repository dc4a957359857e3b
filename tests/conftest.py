"""Shared fixtures: the environment of the tests' subprocesses (simulated devices, the repo on PYTHONPATH), a
runner for the command line, and fake Fashion-MNIST files. Stand-ins for models live in tests/fakes.py, which
tests/train_worker.py (a subprocess) imports too."""

import os
import shutil
import subprocess
import sys
import tempfile

# JAX's persistent compilation cache, shared by this process and every subprocess it starts (they inherit the
# environment): the many command-line runs of the tiny config compile its programs once per session instead of
# once per process. A fresh directory per session, so that no run depends on an earlier one; set
# JAX_COMPILATION_CACHE_DIR to keep one across sessions. (Set before jax is imported: jax reads it then.)
_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffjax-test-xla-cache-")

# The XLA:CPU convolution kernels diffjax's command line chooses (diffjax.xla_cpu), so that the tests compile
# the programs users run; set before JAX's backend starts, inherited by the subprocesses.
from diffjax import xla_cpu  # noqa: E402

xla_cpu.use_xla_convolutions()

import pytest  # noqa: E402

from fakes import write_fake_fashion_mnist  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "train_worker.py")


def _subprocess_env(devices: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    env["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])
    return env


@pytest.fixture(scope="session")
def subprocess_env():
    """``subprocess_env(devices=1)``: the environment of a subprocess on ``devices`` simulated CPU devices."""
    return _subprocess_env


@pytest.fixture(scope="session")
def run_main():
    """``run_main(args, devices=1)``: ``python -m experiments.main ARGS`` from the repo root, output captured."""

    def run(args, devices=1, timeout=600):
        return subprocess.run([sys.executable, "-m", "experiments.main", *args], env=_subprocess_env(devices),
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def run_worker():
    """``run_worker(args, devices=1)``: ``python tests/train_worker.py ARGS``; asserts that it succeeded."""

    def run(args, devices=1, timeout=1800):
        proc = subprocess.run([sys.executable, WORKER, *map(str, args)], env=_subprocess_env(devices),
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    return run


@pytest.fixture(scope="session")
def fake_fashion_mnist_dir(tmp_path_factory):
    """Fashion-MNIST's four IDX files with 60 random training and 20 test images."""
    idx = tmp_path_factory.mktemp("idx")
    write_fake_fashion_mnist(str(idx), n_train=60, n_test=20)
    return str(idx)


@pytest.fixture(scope="session")
def fake_config(tmp_path_factory, fake_fashion_mnist_dir):
    """experiments/configs/tiny.py on the fake Fashion-MNIST (its own prepared tfds directory)."""
    from experiments.configs import tiny

    config = tiny.get_config()
    config.data.manual_dir = fake_fashion_mnist_dir
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    return config


@pytest.fixture(scope="session")
def trainer(fake_config):
    """A Trainer of ``fake_config`` on one device, shared so that its steps compile once per session."""
    from diffjax.train import Trainer

    return Trainer(fake_config)


def error_line(proc) -> str:
    """The last non-empty stderr line of a failed command."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    return [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1]


@pytest.fixture(scope="session")
def last_error_line():
    return error_line
