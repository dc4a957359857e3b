"""Shared fixtures: what is expensive is built once per session here and shared by every test that needs it (the
fake Fashion-MNIST and its prepared dataset, a Trainer of the tiny config, the multi-device results, the trained
classifier), the command line in process, and the environment of the few subprocesses (simulated devices, the
repo on PYTHONPATH). Stand-ins for models live in tests/fakes.py, which tests/train_worker.py (a subprocess)
imports too. tests/budget.py keeps the suite within its time budget.

Under pytest-xdist, each worker is a process of its own: what lands on disk (``build_once``) is built by the
first worker that needs it while the other waits for it; in-memory objects (a Trainer) are built per worker."""

import fcntl
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
# Every program, not only those that took over a second to compile: the other worker and the subprocesses
# compile many of the same small ones.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# What build_once makes, shared by the pytest-xdist workers (they inherit the variable from the controller, which
# removes the directory at the end).
_OWN_SHARED = None
if not os.environ.get("DIFFJAX_TEST_SHARED"):
    _OWN_SHARED = os.environ["DIFFJAX_TEST_SHARED"] = tempfile.mkdtemp(prefix="diffjax-test-shared-")

# The XLA:CPU convolution kernels diffjax's command line chooses (diffjax.xla_cpu), so that the tests compile
# the programs users run; set before JAX's backend starts, inherited by the subprocesses.
from diffjax import xla_cpu  # noqa: E402

xla_cpu.use_xla_convolutions()
# XLA:CPU hands each kernel to LLVM at -O2 by default; the suite's programs are compiled once and run for a few tiny
# steps, so LLVM's optimisations cost more than they save: at -O0 the same programs (XLA's own passes, fusion,
# layouts and buffers are unchanged) took 32% less CPU over tests/test_dit.py and tests/test_samplers.py
# (tests/README.md). Set DIFFJAX_TEST_LLVM_OPT=default to compile as users do.
if os.environ.get("DIFFJAX_TEST_LLVM_OPT", "0") != "default" and "--xla_backend_optimization_level" not in \
        os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import pytest  # noqa: E402

import budget  # noqa: E402
from fakes import run_main_in_process, write_fake_fashion_mnist  # noqa: E402


def pytest_addoption(parser):
    budget.add_options(parser)


def pytest_configure(config):
    config.pluginmanager.register(budget.Budget(config), "diffjax-budget")


def pytest_sessionfinish(session, exitstatus):
    for proc in _BACKGROUND.values():  # a session cut short (-x, Ctrl-C) leaves no job running
        proc.kill()
        proc.wait()
    for own in (_OWN_CACHE, _OWN_SHARED):
        if own:
            shutil.rmtree(own, ignore_errors=True)


def build_once(name: str, build) -> str:
    """The directory ``$DIFFJAX_TEST_SHARED/NAME``, filled by ``build(path)`` once per session, whichever
    pytest-xdist worker asks first (the others wait on a lock file, then use it)."""
    path = os.path.join(os.environ["DIFFJAX_TEST_SHARED"], name)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path + ".done"):
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
            build(path)
            open(path + ".done", "w").close()
    return path

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
    """``run_main(args, devices=1, process=False)``: the command line ``experiments.main ARGS``, output captured, as
    a CompletedProcess. In this process (``experiments.main.run``: no interpreter start, compiled programs shared)
    unless ``process`` is set or ``devices`` (simulated CPU devices) differs from this process's 1: then
    ``python -m experiments.main ARGS`` from the repo root. Use a process only where its boundary is what the
    test is about (signals, exit paths, device counts)."""

    def run(args, devices=1, process=False, timeout=600):
        if not process and devices == 1:
            return run_main_in_process(args)
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
def fake_fashion_mnist_dir():
    """Fashion-MNIST's four IDX files with 60 random training and 20 test images."""
    return build_once("fashion_mnist_idx", lambda path: write_fake_fashion_mnist(path, n_train=60, n_test=20))


@pytest.fixture(scope="session")
def fake_config(fake_fashion_mnist_dir):
    """experiments/configs/tiny.py on the fake Fashion-MNIST (its tfds dataset prepared once, read by all)."""
    from diffjax.data import describe_dataset
    from experiments.configs import tiny

    config = tiny.get_config()
    config.data.manual_dir = fake_fashion_mnist_dir

    def prepare(path):
        config.data.data_dir = path
        for split in ("train", "test"):
            describe_dataset(config.data, split)

    config.data.data_dir = build_once("fashion_mnist_tfds", prepare)
    return config


@pytest.fixture(scope="session")
def trainer(fake_config):
    """A Trainer of ``fake_config`` on one device, shared so that its steps compile once per session."""
    from diffjax.train import Trainer

    return Trainer(fake_config)


def start_in_background(name: str, args, devices: int) -> None:
    """``python tests/train_worker.py ARGS $DIFFJAX_TEST_SHARED/NAME`` on ``devices`` simulated devices, started once
    per session (by whichever pytest-xdist worker asks first) and left running while the tests go on; its output
    goes to NAME.log, and it marks its end with NAME.done or NAME.failed. ``wait_for(NAME)`` waits for it."""
    path = os.path.join(os.environ["DIFFJAX_TEST_SHARED"], name)
    try:
        fd = os.open(path + ".started", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    with open(path + ".log", "w") as log:
        _BACKGROUND[name] = subprocess.Popen([sys.executable, WORKER, *args, path], env=_subprocess_env(devices),
                                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    os.close(fd)


_BACKGROUND = {}


def wait_for(name: str, timeout: float = 1800) -> str:
    """The directory a ``start_in_background`` job wrote, once it has finished; its log's end if it failed."""
    import time

    path = os.path.join(os.environ["DIFFJAX_TEST_SHARED"], name)
    t0 = time.time()
    while not os.path.exists(path + ".done"):
        mine = _BACKGROUND.get(name)  # this process started it: it can also see it die without a word
        if os.path.exists(path + ".failed") or (mine is not None and mine.poll() is not None
                                                 and not os.path.exists(path + ".done")):
            with open(path + ".log") as f:
                pytest.fail(f"tests/train_worker.py {name} failed:\n{f.read()[-4000:]}")
        if time.time() - t0 > timeout:
            pytest.fail(f"tests/train_worker.py {name} did not finish in {timeout:.0f} s")
        time.sleep(0.2)
    if name in _BACKGROUND:
        _BACKGROUND.pop(name).wait()
    return path


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The multi-device runs start as soon as the tests that need them are selected (they take minutes; the tests
    meanwhile run on)."""
    if any("multi_device" in getattr(item, "fixturenames", ()) for item in items):
        start_in_background("multi_device", ["all"], devices=4)


@pytest.fixture(scope="session")
def multi_device():
    """tests/train_worker.py's ``all`` on 4 simulated devices: the directory of its results (layouts, an exported
    data x fsdp run, a command-line error); one process for all of them, started with the session."""
    start_in_background("multi_device", ["all"], devices=4)
    return wait_for("multi_device")


@pytest.fixture(scope="session")
def classifier_config(fake_config):
    """experiments/configs/fashion_mnist_classifier.py on the fake Fashion-MNIST at 8 px, two epochs."""
    from experiments.configs import fashion_mnist_classifier

    config = fashion_mnist_classifier.get_config()
    config.data.manual_dir, config.data.data_dir = fake_config.data.manual_dir, fake_config.data.data_dir
    config.data.image_size = 8
    config.training.batch_size = 20
    config.training.num_epochs = 2
    config.data.num_threads = 1
    return config


@pytest.fixture(scope="session")
def classifier_dir(classifier_config, run_main):
    """The feature network of the metrics, trained on ``classifier_config`` by the command line."""

    def build(path):
        data, tc = classifier_config.data, classifier_config.training
        proc = run_main(["--mode=train_classifier", "--config=experiments/configs/fashion_mnist_classifier.py",
                         f"--workdir={path}", f"--config.data.manual_dir={data.manual_dir}",
                         f"--config.data.data_dir={data.data_dir}", f"--config.data.image_size={data.image_size}",
                         f"--config.training.batch_size={tc.batch_size}",
                         f"--config.training.num_epochs={tc.num_epochs}",
                         f"--config.data.num_threads={data.num_threads}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "classifier test accuracy" in proc.stdout

    return build_once("classifier", build)


def error_line(proc) -> str:
    """The last non-empty stderr line of a failed command."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    return [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1]


@pytest.fixture(scope="session")
def last_error_line():
    return error_line
