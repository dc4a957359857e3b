"""The compiled sampling program: a frozen :class:`SamplingSpec` and a pytree of :class:`SamplingInputs` → images.

One program per spec (what changes the trace: the pipeline kind, the sampler and its options, the number of
steps, whether guidance is on, the guidance schedule, whether a guidance interval bounds it, the alignment
guidance source), compiled once as one ``lax.scan`` over the sampler's steps (``diffjax.samplers.sample``);
everything else (parameters, token ids, seeds, guidance scales and interval ends, init images and masks) is an
input, so changing it never recompiles. ``diffjax.pipeline.Text2Image`` chooses the spec, chunks and shards the
inputs, and keeps the programs it built (``Text2Image.programs``); the structure is that of diffusers'
``pipeline_flax_stable_diffusion.py``, whose compiled function also lives apart from the pipeline class.

In the program, with ``root, sampler_rng = split(seed_key)``, example ``i`` starts from
``x_T = normal(fold_in(root, index[i]))`` (and inpainting's noise at step j is
``normal(fold_in(fold_in(root, index[i]), j + 1))``), so images do not depend on how the batch is chunked or
sharded; only the stochastic samplers' per-step noise (``sampler_rng``) is drawn per call.

* ``txt2img``: classifier-free guidance (Ho & Salimans 2021), ε̃ = ε(x, ∅') + w (ε(x, c) - ε(x, ∅')) with ∅' the
  negative prompt, its scale following ``diffjax.guidance.guidance_scale_fn`` (schedule and interval);
* ``img2img``: SDEdit (Meng et al. 2022), the sampler started at ``start_step`` from x0 forward-noised there;
* ``inpaint``: the known pixels (``fill`` False) re-imposed, forward-noised to the current level, after every step
  (the replacement method of Song et al. 2021 / Lugmayr et al. 2022, without RePaint's resampling).

A latent model (Rombach et al. 2022) samples the autoencoder's scaled latents and decodes them; img2img and
inpainting encode the image first (the posterior mean), inpainting works on the mask max-pooled to the latent grid
and keeps the unmasked image pixels exactly in the decoded result.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from diffjax import guidance, samplers
from diffjax import schedules as sch
from diffjax.models.autoencoder import decode_latents, encode_latents
from diffjax.models.factory import Models

Array = jax.Array

KINDS = ("txt2img", "img2img", "inpaint")
ALIGNMENT_SOURCES = ("", "heads", "clip")  # alignment guidance off, by the model's heads, by a CLIP


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """What one compiled sampling program is for (hashable: the key of ``Text2Image.programs``).

    ``sampler_options`` are the keyword arguments the sampler gets (``timestep_spacing``, ``steps_offset``, η, ...)
    as sorted (name, value) pairs (:func:`resolve_sampler_options` makes them, with DDPM's learned variance for a
    network that learns one); the program adds the clipping of x̂0 for a pixel-space model. ``guidance_interval`` says whether an interval bounds the
    guidance (its ends are inputs); ``latent_out`` returns a latent model's latents undecoded."""

    kind: str
    sampler: str
    num_steps: int
    guided: bool
    start_step: int = 0
    sampler_options: tuple = ()
    latent_out: bool = False
    guidance_schedule: str = "constant"
    guidance_interval: bool = False
    alignment: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.alignment not in ALIGNMENT_SOURCES:
            raise ValueError(f"alignment={self.alignment!r}: expected one of {ALIGNMENT_SOURCES}")


class SamplingInputs(NamedTuple):
    """The arguments of a sampling program (a pytree; ``b`` the batch, ``L`` the token length).

    ``index`` (b,) are the examples' positions in the whole request (their noise is drawn from them);
    ``scale`` the guidance scale w, ``interval`` (σ_lo, σ_hi) of guidance ((-1, inf) without one); ``x0`` (b, H, W, C)
    the init images in [-1, 1] (zeros for txt2img) and ``fill`` (b, H, W, C) where inpainting regenerates (True);
    ``align_scale``, ``align_params`` the alignment guidance scale and the heads' or the CLIP's parameters;
    ``clip_ids``, ``clip_mask`` the prompts in the CLIP's tokens (the prompt's own when the heads guide)."""

    denoiser_params: Any
    text_params: Any
    vae_params: Any
    ids: Array
    mask: Array
    neg_ids: Array
    neg_mask: Array
    index: Array
    seed_key: Array
    scale: Array
    interval: Array
    x0: Array
    fill: Array
    align_scale: Array
    align_params: Any
    clip_ids: Array
    clip_mask: Array


def resolve_sampler_options(models: Models, sampler: str, defaults: dict, options: dict,
                            timestep_spacing: Optional[str] = None) -> tuple:
    """The sorted (name, value) options the sampler gets: the pipeline's ``defaults`` it takes (others are for
    other samplers), the call's ``options`` over them, the timestep spacing unless given, and
    ``variance_type="learned_range"`` for DDPM on a network that learns its variance unless told otherwise."""
    takes = inspect.signature(samplers.get_sampler(sampler)).parameters
    opts = {k: v for k, v in defaults.items() if k in takes}
    opts.update(options)
    if timestep_spacing and "timestep_spacing" not in opts:
        opts["timestep_spacing"] = timestep_spacing
    if models.learns_variance and sampler == "ddpm" and opts.get("variance_type") in (None, "learned_range"):
        opts["variance_type"] = "learned_range"
    # Hashable values (a spec is a dictionary key): lists, e.g. from JSON, become tuples.
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in opts.items()))


def _guided_model(models: Models, spec: SamplingSpec, inputs: SamplingInputs, denoiser, cond, clip):
    """model(x, t) → the guided prediction: classifier-free guidance (when ``spec.guided``) and alignment guidance
    (when ``spec.alignment``) around the conditional denoiser."""
    encoder = models.text_encoder
    if spec.guided:
        b = inputs.ids.shape[0]
        neg = encoder.encode(inputs.text_params, jnp.broadcast_to(inputs.neg_ids, (b,) + inputs.neg_ids.shape[1:]),
                             jnp.broadcast_to(inputs.neg_mask, (b,) + inputs.neg_mask.shape[1:]), trainable=False)
        scale_fn = guidance.guidance_scale_fn(inputs.scale, models.schedule, spec.guidance_schedule, inputs.interval)
        # Outside a guidance interval the steps run the conditional branch alone (half the work).
        model = guidance.classifier_free_guidance(denoiser, cond, neg, inputs.scale, scale_fn=scale_fn,
                                                  skip_unguided=spec.guidance_interval)
    else:
        def model(x, t):
            return denoiser(x, t, cond)

    if not spec.alignment:
        return model

    def similarity(x, t):
        """sim(x_t, t): the conditional x̂0's similarity with its prompt, by the heads or the CLIP."""
        pred = denoiser(x, t, cond)[..., :models.in_channels].astype(jnp.float32)
        a, s = guidance.vp_coefficients(models.schedule, t, x.ndim)
        x0 = sch.x0_from_prediction(pred, x, jnp.maximum(a, guidance.MIN_ALPHA), s, models.prediction_type)
        if spec.alignment == "heads":
            return models.alignment.similarity(inputs.align_params, x0, cond.pooled)
        images = x0 if models.autoencoder is None else decode_latents(models.autoencoder, inputs.vae_params, x0)
        return clip.similarity(inputs.align_params, images, inputs.clip_ids, inputs.clip_mask)

    return guidance.alignment_guidance(model, similarity, models.schedule, models.prediction_type,
                                       inputs.align_scale)


def sampling_program(models: Models, spec: SamplingSpec, clip=None) -> Callable[[SamplingInputs], Array]:
    """``jit(program)``: :class:`SamplingInputs` → float32 images in [-1, 1] (b, H, W, C), or a latent model's
    final latents with ``spec.latent_out``. ``clip``: the ``diffjax.models.clip_guide.CLIPGuide`` that alignment
    guidance follows when ``spec.alignment == "clip"`` (its parameters are ``inputs.align_params``)."""
    vae = models.autoencoder
    opts = dict(spec.sampler_options)
    if vae is None:  # pixels: x̂0 is clipped to the data range at every step
        opts.setdefault("denoised_fn", guidance.clip_x0)
    learned = opts.get("variance_type") == "learned_range" and models.learns_variance

    def program(inputs: SamplingInputs) -> Array:
        cond = models.text_encoder.encode(inputs.text_params, inputs.ids, inputs.mask, trainable=False)
        denoiser = models.model_fn(inputs.denoiser_params, with_variance=learned)
        model = _guided_model(models, spec, inputs, denoiser, cond, clip)
        x0, fill = inputs.x0, inputs.fill
        z0, z_fill = x0, fill  # the sampler's space: pixels, or the autoencoder's scaled latents
        if vae is not None:
            n, h, w, c = x0.shape
            f = models.latent_factor
            z0 = (encode_latents(vae, inputs.vae_params, x0) if spec.kind != "txt2img"
                  else jnp.zeros((n, h // f, w // f, models.in_channels), jnp.float32))
            pooled = jnp.any(fill.reshape(n, h // f, f, w // f, f, c), axis=(2, 4, 5))
            z_fill = jnp.broadcast_to(pooled[..., None], z0.shape)
        example_root, sampler_rng = jax.random.split(inputs.seed_key)
        keys = jax.vmap(lambda i: jax.random.fold_in(example_root, i))(inputs.index)
        x_T = jax.vmap(lambda k: jax.random.normal(k, z0.shape[1:]))(keys)
        extra = {}
        if spec.kind == "img2img":
            extra = dict(x0_init=z0, start_step=spec.start_step)
        elif spec.kind == "inpaint":
            def post_step(x, sc, sg, i):
                eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1), x.shape[1:]))(keys)
                return jnp.where(z_fill, x, sc * z0 + sg * eps)

            extra = dict(post_step=post_step)
        out = samplers.sample(model, x_T, models.schedule, spec.sampler, spec.num_steps, rng=sampler_rng,
                              prediction_type=models.prediction_type, **opts, **extra)
        if vae is None:
            return jnp.clip(out, -1.0, 1.0)
        if spec.latent_out:
            return out
        images = jnp.clip(decode_latents(vae, inputs.vae_params, out), -1.0, 1.0)
        return jnp.where(fill, images, x0) if spec.kind == "inpaint" else images

    return jax.jit(program)
