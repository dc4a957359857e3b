"""XLA:CPU's choices: its convolution kernels and the process's memory allocator (made before it starts), the
compile options that keep remat's recomputation apart (per program), and the train step's count of kernels.

jaxlib 0.10's XLA:CPU hands convolutions to YNNPACK by default, and YNNPACK runs each convolution on one thread,
where XLA's own convolution kernel keeps every core busy. The flag
``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` leaves the matmuls with YNNPACK (they use
every core there) and gives the convolutions back to XLA; the suite's train step and sampler run faster with it,
measured side by side with ``benchmarks/suite/ab.py --old-env`` (the figures: docs/performance.md).
With XLA's kernels the weight gradients of convolutions are no longer slow either, so the U-Net's automatic
``conv_impl`` follows :func:`convolutions_from_xla` (XLA's own transposed convolution instead of the bands).

XLA reads ``$XLA_FLAGS`` once, when JAX's first backend starts (the first array or compilation), not at
``import jax``: :func:`use_xla_convolutions` must run before that, as importing diffjax does (diffjax/runtime.py).
Its effect is process-wide (every CPU program compiled afterwards) and inherited by subprocesses.

The memory allocator. XLA:CPU allocates each call's temporaries with ``malloc`` and frees them at the call's end;
glibc returns blocks that large to the kernel, so every call faults its temporaries in again as fresh zeroed
pages, and a train step spends a good share of its CPU time in the kernel (PyTorch's allocator keeps its memory).
glibc's own settings that keep the memory (one arena, a high mmap threshold) remove the faults but serialise the
threads' allocations, which slowed the demo's step down. tcmalloc keeps freed pages in per-thread and central
caches, and the train steps run faster with it preloaded (``benchmarks/suite/ab.py --old-env LD_PRELOAD=...``;
the figures: docs/performance.md).
A process cannot change its allocator once started, so :func:`exec_with_tcmalloc` starts the program again with
``LD_PRELOAD`` naming tcmalloc (Debian's ``libtcmalloc-minimal4``) when the library is installed, as the command
line does first thing.

Remat. ``jax.checkpoint`` (``nn.remat``) recomputes a block's forward pass in the backward pass behind an
optimisation barrier, so that the compiler does not merge the recomputation with the original and keep the
activations after all. XLA:CPU's pipeline removes the barriers (its ``cse_barrier_expander`` pass) before the
common-subexpression elimination that follows layout assignment, which then merges them, and remat saves almost
no memory. :func:`compiler_options` leaves that pass out of a program's compilation, and XLA:CPU compiles and runs
the barriers as they are: remat then trades the recomputation's time for the memory, as on an accelerator
(``benchmarks/suite/run.py --sections memory``; the figures: docs/performance.md). ``train.Trainer`` compiles its
step with them.

Compile time. XLA:CPU compiles every fusion as a kernel of its own and does not fuse independent reductions
together, so a train step's compile time grows with its count of parameter arrays: the gradient's global norm
was one reduction kernel per array. :func:`norm_concat_below` has the ``Trainer`` sum the small gradients as one
concatenated vector (``train.global_norm``) where the parameters are replicated.
"""

import os
import re
import sys

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
ENV = "DIFFJAX_XLA_CPU_CONVOLUTIONS"  # "off" keeps XLA's default (YNNPACK convolutions)
OFF = ("off", "0", "false", "no")  # the values of $DIFFJAX_XLA_CPU_CONVOLUTIONS / $DIFFJAX_MALLOC that turn it off


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
    if os.environ.get(ENV, "").lower() in OFF or _jaxlib_version() != (0, 10):
        return False
    if _backend_started():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True


MALLOC_ENV = "DIFFJAX_MALLOC"  # "system" keeps glibc's malloc; a path names the tcmalloc library to preload
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def tcmalloc_path() -> str | None:
    """The tcmalloc library to preload: ``$DIFFJAX_MALLOC`` when it names a file, else the first of
    :data:`TCMALLOC_NAMES` in :data:`LIBRARY_DIRS`; None when there is none or ``$DIFFJAX_MALLOC`` is ``system``."""
    choice = os.environ.get(MALLOC_ENV, "")
    if choice.lower() in ("system", *OFF):
        return None
    if choice:
        if not os.path.isfile(choice):
            raise FileNotFoundError(f"${MALLOC_ENV}={choice!r} is neither 'system' nor an existing library file")
        return choice
    for d in LIBRARY_DIRS:
        for name in TCMALLOC_NAMES:
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
    return None


def malloc_in_use() -> str:
    """'tcmalloc' when this process was started with tcmalloc (or ``$DIFFJAX_MALLOC``'s library) preloaded, else
    'system'."""
    preloaded = os.environ.get("LD_PRELOAD", "")
    chosen = os.environ.get(MALLOC_ENV, "")
    return "tcmalloc" if "tcmalloc" in preloaded or (chosen and chosen in preloaded.split()) else "system"


def exec_with_tcmalloc(argv: list[str] | None = None) -> None:
    """Start this program again, in the same process (``os.execve``), with tcmalloc in ``LD_PRELOAD``.

    Returns without doing anything when tcmalloc is preloaded already (so it runs once; subprocesses inherit the
    variable), when :func:`tcmalloc_path` finds no library (install Debian's ``libtcmalloc-minimal4``, or set
    ``$DIFFJAX_MALLOC`` to the library's path), when ``$DIFFJAX_MALLOC`` is ``system``, or off Linux. Call it
    first thing in a command-line entry point, before anything runs whose work would be lost: ``argv`` (default
    the interpreter's own command line, ``sys.orig_argv``) is run again from the start.
    """
    if not sys.platform.startswith("linux") or malloc_in_use() == "tcmalloc":
        return
    path = tcmalloc_path()
    if path is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [path, env.get("LD_PRELOAD", "")]))
    args = list(argv if argv is not None else sys.orig_argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args[1:]], env)


BARRIER_PASS = "cse_barrier_expander"  # XLA:CPU's pass that drops optimisation barriers before its CSE


def compiler_options(platform: str) -> dict | None:
    """``jax.jit(..., compiler_options=...)`` for a program that differentiates through ``remat``, compiled for
    ``platform``: on ``"cpu"``, XLA's ``xla_disable_hlo_passes`` with :data:`BARRIER_PASS` added to those that
    ``$XLA_FLAGS`` disables already (the option replaces the flag's list for the program); None elsewhere (the GPU
    and TPU pipelines keep the barriers past their CSE). A program without barriers compiles as it would without.
    """
    if platform != "cpu":
        return None
    found = re.findall(r"--xla_disable_hlo_passes=(\S+)", os.environ.get("XLA_FLAGS", ""))
    passes = [p for flag in found for p in flag.strip("'\"").split(",") if p]  # XLA adds up repeated flags
    return {"xla_disable_hlo_passes": ",".join(dict.fromkeys([*passes, BARRIER_PASS]))}


NORM_CONCAT_BELOW = 2**16


def norm_concat_below(platform: str, fsdp: int) -> int:
    """``train.global_norm``'s ``concat_below`` for a train step on ``platform`` with an ``fsdp`` axis of that size:
    :data:`NORM_CONCAT_BELOW` on the CPU with replicated parameters (``fsdp == 1``), where one sum over the small
    gradients concatenated compiles as one kernel instead of one per array; 0 elsewhere (sharded arrays would be
    gathered to be concatenated, and the compile time it saves was measured on XLA:CPU only)."""
    return NORM_CONCAT_BELOW if platform == "cpu" and fsdp == 1 else 0
