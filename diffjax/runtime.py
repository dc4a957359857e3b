"""The process-wide JAX settings diffjax makes when it is imported, so that the Python API runs as fast as the
command line without its user knowing about them:

* XLA:CPU's own multi-threaded convolution kernels instead of YNNPACK's one-threaded ones
  (:func:`diffjax.xla_cpu.use_xla_convolutions`; only before JAX's backend starts, i.e. when diffjax is imported
  before the first array is made; ``DIFFJAX_XLA_CPU_CONVOLUTIONS=off`` keeps XLA's default);
* JAX's persistent compilation cache (:func:`enable_compilation_cache`): a program compiled once, by the command
  line, a notebook or a script, is loaded from disk the next time instead of compiled again
  (``DIFFJAX_COMPILATION_CACHE=off`` turns it off).

What cannot be chosen once a process runs is its memory allocator: XLA:CPU's steps run faster under tcmalloc
(:mod:`diffjax.xla_cpu`; docs/performance.md); the command line restarts itself under it, a program or a notebook
kernel has to be started with ``LD_PRELOAD=$(python -c 'from diffjax import xla_cpu; print(xla_cpu.tcmalloc_path())')``.
"""

import logging
import os
import sys

from absl import logging as absl_logging

from diffjax import xla_cpu

DEFAULT_CACHE = os.path.join("~", ".cache", "diffjax", "jax")
OFF = (*xla_cpu.OFF, "", "none")  # the values of $DIFFJAX_COMPILATION_CACHE that turn it off


def enable_compilation_cache() -> str | None:
    """Keep compiled XLA programs on disk (JAX's persistent compilation cache); returns the directory in force.

    A directory the user chose stands: ``$JAX_COMPILATION_CACHE_DIR`` or a ``jax_compilation_cache_dir`` set in
    ``jax.config`` before. Otherwise ``$DIFFJAX_COMPILATION_CACHE``, else ``~/.cache/diffjax/jax``;
    ``DIFFJAX_COMPILATION_CACHE=off`` turns it off (returns None). Before jax is imported this sets
    ``$JAX_COMPILATION_CACHE_DIR``, which jax reads when it is imported (so ``import diffjax`` does not import jax,
    and the processes this one starts share the cache); after, ``jax.config``."""
    jax = sys.modules.get("jax")
    chosen = os.environ.get("JAX_COMPILATION_CACHE_DIR") or (jax is not None and jax.config.jax_compilation_cache_dir)
    if chosen:
        return chosen
    where = os.environ.get("DIFFJAX_COMPILATION_CACHE", DEFAULT_CACHE)
    if where.lower() in OFF:
        return None
    where = os.path.expanduser(where)
    if jax is None:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = where
    else:
        jax.config.update("jax_compilation_cache_dir", where)
    return where


def configure() -> None:
    """Both settings (``diffjax/__init__.py`` calls it once; calling it again changes nothing)."""
    xla_cpu.use_xla_convolutions()
    enable_compilation_cache()


class QuietOrbax(logging.Filter):
    """orbax logs its bookkeeping at INFO (about 15 lines per checkpoint: its managers, handlers, each save's
    phases) through absl's logger. This filter lets through orbax's warnings and errors, and its INFO lines only at
    absl's debug verbosity (the command line's ``--verbosity=1``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.WARNING or absl_logging.get_verbosity() >= absl_logging.DEBUG
                or f"{os.sep}orbax{os.sep}" not in record.pathname)


def quiet_logs() -> None:
    """Install :class:`QuietOrbax` on absl's logger (once): what the command line does, for programs that want its
    quiet logs."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, QuietOrbax) for f in absl_logger.filters):
        absl_logger.addFilter(QuietOrbax())
