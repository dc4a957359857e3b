"""diffjax: text-to-image diffusion in JAX/Flax."""

__version__ = "0.1.0.dev0"

# XLA:CPU's convolution kernels and the persistent compilation cache, as the command line has them (see
# diffjax/runtime.py for what it sets and how to opt out).
from diffjax import runtime as _runtime  # noqa: E402

_runtime.configure()
