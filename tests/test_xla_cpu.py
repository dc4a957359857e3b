"""diffjax.xla_cpu: the XLA flag that gives XLA:CPU's convolutions back to XLA's own kernels is set before JAX's
backend starts (and only then), takes effect in the compiled program, and leaves a user's own choice alone."""

import os
import subprocess
import sys

from diffjax import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys
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
