"""Process settings for XLA:CPU, made before JAX's backend starts: its convolution kernels and the host allocator.

**Convolutions.** jaxlib 0.10's XLA:CPU hands convolutions to YNNPACK by default, and YNNPACK runs each convolution on one thread:
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

**The allocator** (:func:`reuse_freed_memory`). Each call of a compiled program allocates its temporaries
afresh, and so do YNNPACK's fused kernels (e.g. the (B, heads, T, S) attention logits); glibc's malloc serves
blocks above its mmap threshold (at most 32 MiB) with new pages and gives them back on free, and XLA's worker
threads allocate from their own arenas, whose heaps cannot hold a block above 64 MiB. So every train step paid
for its temporaries again in page faults: 205,000 a step (800 MiB zeroed by the kernel, 0.39 s of system time
a step) in the matched U-Net's train step, 1.27 million in one 50-step sampling call. With one arena, a 1 GiB
mmap threshold and a trim threshold of 2 GiB, the freed blocks stay in the heap and the next call reuses them:
0 faults a call, the train step 1.10x faster and peak resident memory no higher (benchmarks/RESULTS.md).
"""

import ctypes
import os
import re
import sys

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


MALLOC_ENV = "DIFFJAX_MALLOC"  # "off" keeps glibc's malloc settings as they are
# mallopt's parameter numbers (glibc's malloc.h) and the values set.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MALLOC_SETTINGS = {_M_ARENA_MAX: 1, _M_MMAP_THRESHOLD: 1 << 30, _M_TRIM_THRESHOLD: (1 << 31) - 1}
# A user's own allocator choice, which stands: glibc's environment settings, or another malloc preloaded.
_USER_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _users_allocator() -> bool:
    if any(k in os.environ for k in _USER_MALLOC_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return True
    return any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc"))


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse (one arena for all threads, blocks up to 1 GiB from the
    heap, the heap trimmed only beyond 2 GiB free), so that each call of a compiled program reuses the pages of
    the last instead of faulting in new ones (see the module's docstring). Returns whether the settings were made.

    Changes nothing and returns False off Linux/glibc, when ``$DIFFJAX_MALLOC`` is ``off``, when the user chose
    the allocator (``MALLOC_*`` variables, ``glibc.malloc`` tunables, a preloaded jemalloc/tcmalloc/mimalloc), or
    when JAX's backend has started (its threads have their arenas: too late for the arena limit). Process-wide,
    and not inherited by subprocesses. The cost: the process's resident memory does not shrink after its peak.
    """
    if os.environ.get(MALLOC_ENV, "").lower() in ("off", "0", "false", "no") or _users_allocator():
        return False
    if not sys.platform.startswith("linux") or _backend_started():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): its own allocator, left alone
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS.items()])
