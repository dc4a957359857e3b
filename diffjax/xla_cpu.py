"""XLA:CPU's choice of convolution kernels, set before JAX's backend starts.

jaxlib 0.10's XLA:CPU hands convolutions to YNNPACK by default, and YNNPACK runs each convolution on one thread:
a 3×3, 64 -> 64 channel convolution at 32×32, batch 32, kept 1.0 of 2 cores busy (96 GFLOP/s) where XLA's own
convolution kernel kept 1.8 busy (150 GFLOP/s, 1.56x faster; AMD EPYC, 2 cores). The flag
``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` leaves the matmuls with YNNPACK (they use
every core there) and gives the convolutions back to XLA. Measured on the suite's jobs, with and without the flag
side by side (``benchmarks/ab.py --old-env``; benchmarks/RESULTS.md): the fashion_mnist config's train step 1.22x,
the matched U-Net's 50-step sampler 1.24x faster.
With XLA's kernels the weight gradients of convolutions are no longer slow either, so the U-Net's automatic
``conv_impl`` follows :func:`convolutions_from_xla` (XLA's own transposed convolution instead of the bands).

XLA reads ``$XLA_FLAGS`` once, when JAX's first backend starts (the first array or compilation), not at
``import jax``: :func:`use_xla_convolutions` must run before that, as ``experiments/main.py`` does first thing.
Its effect is process-wide (every CPU program compiled afterwards) and inherited by subprocesses.
"""

import os
import re

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
ENV = "DIFFJAX_XLA_CPU_CONVOLUTIONS"  # "off" keeps XLA's default (YNNPACK convolutions)


def _jaxlib_version() -> tuple:
    from importlib import metadata

    try:
        return tuple(int(v) for v in re.findall(r"\d+", metadata.version("jaxlib"))[:2])
    except metadata.PackageNotFoundError:
        return ()


def _backend_started() -> bool:
    import sys

    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a jax without it: assume the worst, change nothing
        return True


def convolutions_from_xla() -> bool:
    """Whether :data:`FLAG` is in ``$XLA_FLAGS``, i.e. XLA:CPU's programs get XLA's own convolution kernels
    (assuming the flags were set before the backend started, as :func:`use_xla_convolutions` does)."""
    return FLAG in os.environ.get("XLA_FLAGS", "").split()


def use_xla_convolutions() -> bool:
    """Append :data:`FLAG` to ``$XLA_FLAGS`` so that XLA:CPU compiles convolutions with its own multi-threaded
    kernels. Returns whether the flag is in force for the programs compiled from now on.

    Changes nothing and returns False when ``$DIFFJAX_XLA_CPU_CONVOLUTIONS`` is ``off``, when jaxlib is not a
    0.10.x (the flag is experimental, and XLA aborts the process on a flag it does not know), or when a JAX
    backend has already started (too late: XLA has read its flags). The flag only concerns the CPU backend.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:  # set already, by this or by the user: theirs stands
        return convolutions_from_xla()
    if os.environ.get(ENV, "").lower() in ("off", "0", "false", "no") or _jaxlib_version() != (0, 10):
        return False
    if _backend_started():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True
