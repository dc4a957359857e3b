"""diffjax.xla_cpu: the XLA flag that gives XLA:CPU's convolutions back to XLA's own kernels, and the malloc settings
that keep freed memory for the next call, are made before JAX's backend starts (and only then), take effect (in the
compiled program; in the page faults a call costs), and leave a user's own choice alone."""

import os
import subprocess
import sys

import pytest

from diffjax import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys

import pytest
import jax, jax.numpy as jnp
from diffjax import xla_cpu
if sys.argv[1] == "late":
    jnp.zeros(3).block_until_ready()  # the backend starts: XLA has read its flags
print("applied", xla_cpu.use_xla_convolutions())
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC")))
hlo = conv.lower(jnp.zeros((32, 32, 32, 64)), jnp.zeros((3, 3, 64, 64))).compile().as_text()
print("ynnpack", "__ynn_fusion" in hlo)
"""


def _run(mode, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.ENV)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], env={**base, "PYTHONPATH": ROOT, **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()[-3:]


def test_flag_moves_convolutions_out_of_ynnpack_only_before_the_backend_starts():
    assert _run("early") == ["True", "ynnpack", "False"]  # set in time: XLA's own convolution
    assert _run("late") == ["False", "ynnpack", "True"]  # too late: reported, nothing changed
    assert _run("early", **{xla_cpu.ENV: "off"}) == ["False", "ynnpack", "True"]  # the opt-out


def test_a_users_own_setting_stands(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_convolution")
    assert xla_cpu.use_xla_convolutions() is False
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 {xla_cpu.FLAG}")
    assert xla_cpu.use_xla_convolutions() is True  # there already: not added twice
    assert os.environ["XLA_FLAGS"].count(xla_cpu.FLAG) == 1


def test_unknown_jaxlib_gets_no_flag(monkeypatch):
    """XLA aborts the process on a flag it does not know: only the jaxlib series it was measured on gets it."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv(xla_cpu.ENV, raising=False)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 11))
    assert xla_cpu.use_xla_convolutions() is False
    assert "XLA_FLAGS" not in os.environ


MALLOC_SCRIPT = r"""
import ctypes, resource, sys, threading
from diffjax import xla_cpu
if sys.argv[1] == "late":
    import jax.numpy as jnp
    jnp.zeros(3).block_until_ready()  # the backend and its threads have started
print("applied", xla_cpu.reuse_freed_memory())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size, faults = 64 << 20, []

def calls():  # as a compiled program's call on a worker thread: a 64 MiB temporary, written, freed
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

worker = threading.Thread(target=calls)
worker.start()
worker.join()
print("faults", sorted(faults[1:])[2])  # the median call after the first
"""


def _faults(mode, **env):
    base = {k: v for k, v in os.environ.items()
            if k not in (xla_cpu.MALLOC_ENV, "LD_PRELOAD", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", MALLOC_SCRIPT, mode], env={**base, "PYTHONPATH": ROOT, **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.split()
    return out[1], int(out[3])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    """A worker thread's 64 MiB temporary costs 16,384 fresh pages a call with glibc's defaults (mmap'd and
    unmapped each time), none once freed memory is kept; too late (the backend's threads started) or opted
    out, nothing changes."""
    applied, kept = _faults("early")
    off_applied, fresh = _faults("early", **{xla_cpu.MALLOC_ENV: "off"})
    late_applied, late = _faults("late")
    assert (applied, off_applied, late_applied) == ("True", "False", "False")
    assert fresh > 16000 and late > 16000, (kept, fresh, late)
    assert kept < fresh / 20, (kept, fresh, late)


def test_a_users_own_allocator_stands(monkeypatch):
    monkeypatch.delenv(xla_cpu.MALLOC_ENV, raising=False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert xla_cpu.reuse_freed_memory() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert xla_cpu.reuse_freed_memory() is False
