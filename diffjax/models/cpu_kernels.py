"""Kernels for XLA:CPU only: :func:`banded_conv`, a convolution whose weight gradient XLA:CPU computes fast
(``UNetConfig.conv_impl="banded"``; chosen by :func:`diffjax.models.layers.conv_general_dilated`). On other
backends, and on the CPU with XLA's own convolution kernels (:mod:`diffjax.xla_cpu`), XLA's convolution is used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["banded_conv"]

Array = jax.Array

_BAND_ROWS = 7  # output rows per band of banded_conv's weight gradient


def _conv_nhwc(x, w, padding, precision=None):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def banded_conv(x: Array, w: Array, padding: tuple, precision=None) -> Array:
    r"""Stride-1 NHWC/HWIO convolution whose weight gradient is summed over bands of output rows.

    The forward pass is XLA's convolution; :math:`\partial L/\partial x` is the forward convolution of the
    output gradient with the kernel flipped in space and transposed in its channels (padding ``k - 1 - p``), the
    same numbers as XLA's transposed convolution. Written out because inside a while loop (a sampler's
    ``lax.scan`` taking ``∇_x`` at every step, as alignment guidance does) XLA:CPU folds that kernel transpose
    into the convolution's dimension labels (``01oi``) and lowers it to a generic convolution, many times slower
    than the fused one it emits outside loops (``benchmarks/studies/alignment_cost.py``'s probe). The weight gradient

    .. math:: \frac{\partial L}{\partial w_{ijcd}} = \sum_{b,h,w} x^{\mathrm{pad}}_{b,h+i,w+j,c}\,
              g_{b,h,w,d}

    is split over bands of ~``_BAND_ROWS`` output rows ``h``, each band's term being the weight gradient of
    the convolution of its rows (plus the ``kh - 1`` halo rows) with no vertical padding. The sum is the
    same; only the summation order differs. Why: XLA:CPU lowers the weight gradient to a convolution
    whose window is the whole B x H x W output, and that is many times slower than the forward pass for
    some shapes; summed over bands of 7 rows it is not (``benchmarks/studies/conv_grad.py`` measures both; the
    figures: docs/performance.md). The batch dimension is left whole, so a batch sharded across devices stays sharded.
    """
    return _conv_nhwc(x, w, padding, precision)


def _banded_conv_fwd(x, w, padding, precision):
    return _conv_nhwc(x, w, padding, precision), (x, w)


def _banded_conv_bwd(padding, precision, res, g):
    x, w = res
    dx = _conv_input_grad(g, w, padding, precision, x)
    (top, bottom), horizontal = padding
    kh, rows = w.shape[0], g.shape[1]
    xp = jnp.pad(x, ((0, 0), (top, bottom), (0, 0), (0, 0)))
    n = max(1, round(rows / _BAND_ROWS))
    edges = [round(k * rows / n) for k in range(n + 1)]
    acc = jnp.promote_types(w.dtype, jnp.float32)  # the bands' partial sums, added in at least float32
    dw = jnp.zeros(w.shape, acc)
    for r0, r1 in zip(edges[:-1], edges[1:]):
        band = xp[:, r0:r1 + kh - 1]
        part = jax.vjp(lambda w_: _conv_nhwc(band, w_, ((0, 0), horizontal), precision), w)[1](g[:, r0:r1])[0]
        dw = dw + part.astype(acc)
    return dx, dw.astype(w.dtype)


banded_conv.defvjp(_banded_conv_fwd, _banded_conv_bwd)


def _conv_input_grad(g, w, padding, precision, x):
    """∂L/∂x of the stride-1 convolution ``_conv_nhwc(x, w, padding)`` given its output gradient ``g``:
    ``g`` convolved with ``w`` flipped in space, input and output channels swapped, padded ``k - 1 - p``."""
    (kh, kw), ((top, bottom), (left, right)) = w.shape[:2], padding
    pad = ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
    if min(v for pair in pad for v in pair) < 0:  # padding wider than the kernel: XLA's own transpose
        return jax.vjp(lambda x_: _conv_nhwc(x_, w, padding, precision), x)[1](g)[0]
    return _conv_nhwc(g, jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2)), pad, precision).astype(x.dtype)
