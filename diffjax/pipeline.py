"""Text-to-image generation from trained parameters: prompts → text states → guided sampling → uint8 images.

``Text2Image`` holds the networks, the schedule and the parameters of a run (``from_checkpoint(workdir)``
rebuilds them from a training checkpoint alone) and offers the three pipelines users know from diffusers:

* ``generate(prompts)``: text-to-image with classifier-free guidance (Ho & Salimans 2021) and an optional
  negative prompt in place of the empty one;
* ``img2img(prompts, image, strength)``: SDEdit (Meng et al. 2022): the image is forward-noised to the
  noise level of step ``(1 - strength) · num_steps`` and denoised from there with the prompt;
* ``inpaint(prompts, image, mask)``: the known pixels (mask 0) are re-imposed, forward-noised to the
  current noise level, after every sampler step (the replacement method of Song et al. 2021 /
  Lugmayr et al. 2022, without RePaint's resampling), so they come back exactly at the end.

Each call is served by a compiled sampling program (``diffjax.sampling``: one ``lax.scan``, compiled once per
sampler, steps, pipeline, guided or not, ...); prompts, seeds, guidance scales and images are its inputs. Prompts are
processed in chunks of ``batch_size`` (a multiple of the device count), each chunk sharded over all devices along
the batch; the same seed and prompts give the same images on any number of devices and in any chunking (only the
stochastic samplers' per-step noise, DDPM and DDIM with η > 0, is drawn per chunk).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import types
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from diffjax import build, checkpoints, diffusers_format, guidance, model_folder, posthoc_ema, sharding
from diffjax.checkpoints import abstract_with_shardings
from diffjax.models.clip_guide import CLIPGuide
from diffjax.models.factory import Models, cast_floating, in_dtype
from diffjax.models.layers import canonical_dtype
from diffjax.guidance import check_guidance_interval
from diffjax.pixels import from_uint8, to_uint8
from diffjax.sampling import SamplingInputs, SamplingSpec, resolve_sampler_options, sampling_program
from diffjax.text import check_prompts

Array = jax.Array
DEFAULT = object()  # a keyword left to the pipeline's default (where None is a value of its own)


class Text2Image:
    """Text-to-image, image-to-image and inpainting with a trained diffjax denoiser (U-Net or DiT) and text
    encoder.

    Args:
      models: ``diffjax.models.factory.Models`` (denoiser, text encoder, schedule and prediction type).
      denoiser_params, text_params: the parameters to sample with (usually the EMA ones).
      image_shape: (H, W, C) the model was trained at (the default output size; pixels, also for a latent model).
      sampler, num_steps, guidance_scale, timestep_spacing: the defaults of every call.
      guidance_schedule, guidance_interval: how the guidance scale varies with the noise level
        (``diffjax.guidance.guidance_scale_fn``): ``"constant"``, ``"linear"`` or ``"cosine"`` over the
        timesteps, and (σ_lo, σ_hi) outside which no guidance is applied and the steps run the conditional
        branch alone (None: everywhere); defaults of every call, which also takes them as keywords. The
        interval's ends are traced: changing them (or the scale) does not recompile.
      sampler_options: further defaults (e.g. ``steps_offset``, DDIM's ``final_alpha_cumprod``), each given to
        the samplers that take it.
      mesh: devices to shard each chunk's batch over (default: all devices on one ``data`` axis).
      vae_params: a latent model's autoencoder parameters (``models.autoencoder``).
      alignment_params, alignment_guidance_scale: the parameters of the image–text alignment heads
        (``models.alignment``, trained with ``config.alignment.weight`` > 0) and the default scale s of alignment
        guidance (``diffjax.guidance.alignment_guidance``: each step also ascends the similarity of x̂0 with its
        prompt; 0: off). :meth:`with_alignment_clip` guides with a pretrained CLIP instead of the heads.

    A latent model (Rombach et al. 2022) samples the autoencoder's scaled latents and decodes them; img2img and
    inpainting encode the image first (the posterior mean), inpainting works on the mask max-pooled to the latent
    grid (a latent pixel is regenerated when any of its image pixels is) and keeps the unmasked image pixels
    exactly in the decoded result. ``output_type="latent"`` returns the final latents undecoded.

    Build one with :meth:`from_pretrained` (a model folder written by :meth:`save_pretrained`) or
    :meth:`from_checkpoint` (a training run's workdir).
    """

    def __init__(self, models: Models, denoiser_params: Any, text_params: Any, image_shape: Sequence[int], *,
                 sampler: str = "dpmpp_2m", num_steps: int = 25, guidance_scale: float = 3.0,
                 timestep_spacing: Optional[str] = None, sampler_options: Optional[dict] = None, mesh=None,
                 vae_params: Any = None, guidance_schedule: str = "constant",
                 guidance_interval: Optional[Sequence[float]] = None, alignment_params: Any = None,
                 alignment_guidance_scale: float = 0.0):
        self.models = models
        self.denoiser_params, self.text_params, self.vae_params = denoiser_params, text_params, vae_params
        self.alignment_params = alignment_params
        self.alignment_clip = None  # a diffjax.models.clip_guide.CLIPGuide (with_alignment_clip)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.defaults = dict(sampler=sampler, num_steps=int(num_steps), guidance_scale=float(guidance_scale),
                             guidance_schedule=guidance.check_guidance_schedule(guidance_schedule),
                             guidance_interval=check_guidance_interval(guidance_interval),
                             alignment_guidance_scale=check_alignment_scale(alignment_guidance_scale))
        self.timestep_spacing = timestep_spacing
        self.sampler_options = dict(sampler_options or {})
        self.mesh = sharding.create_mesh(1) if mesh is None else mesh
        self.config, self.step = None, None  # the experiment config and step, when loaded from a checkpoint
        self.ema_sigma_rel = None  # the post-hoc EMA's width, when built from a run's snapshots
        self._programs: dict[SamplingSpec, Any] = {}

    @property
    def prediction_type(self) -> str:
        return self.models.prediction_type

    def with_params(self, denoiser_params: Any, text_params: Any, vae_params: Any = None,
                    alignment_params: Any = None) -> "Text2Image":
        """The same pipeline with other parameters (of the same shapes), sharing the compiled programs (the
        autoencoder's and the alignment heads' stay unless given)."""
        other = copy.copy(self)
        other.denoiser_params, other.text_params = denoiser_params, text_params
        if vae_params is not None:
            other.vae_params = vae_params
        if alignment_params is not None:
            other.alignment_params = alignment_params
        return other

    def with_alignment_clip(self, clip_model: str) -> "Text2Image":
        """The same pipeline whose alignment guidance follows a pretrained CLIP (``FlaxCLIPModel`` and processor
        at ``clip_model``: a local folder, or a Hub id when online) on the decoded x̂0, instead of the alignment
        heads (``diffjax.models.clip_guide``)."""
        other = copy.copy(self)
        guide = CLIPGuide.from_pretrained(clip_model)
        # Its parameters are placed on the mesh once (replicated), not sent with every chunk.
        other.alignment_clip = dataclasses.replace(guide, params=jax.device_put(guide.params,
                                                                                sharding.replicated(self.mesh)))
        other._programs = {}
        return other

    def to_dtype(self, dtype) -> "Text2Image":
        """The same pipeline with its parameters stored and its networks computing in ``dtype`` (``"bfloat16"``:
        half the parameter memory and the accelerators' fast matmuls; ``"float32"`` back). What stays float32:
        the noise schedule, the sampler's update arithmetic (the network's output is promoted), GroupNorm
        statistics and the final clipping; with ``"float16"`` also the autoencoder (Stable Diffusion's overflows
        in float16, which is why diffusers upcasts it). The compiled programs are not shared (they depend on the
        dtype)."""
        name = canonical_dtype(dtype, "dtype")
        vae_name = "float32" if name == "float16" else name
        models = self.models
        models = dataclasses.replace(
            models, denoiser=in_dtype(models.denoiser, name),
            text_encoder=models.text_encoder.replace(dtype=jnp.dtype(name)),
            autoencoder=None if models.autoencoder is None else in_dtype(models.autoencoder, vae_name))
        other = copy.copy(self)
        other.models = models
        other.denoiser_params = cast_floating(self.denoiser_params, name)
        other.text_params = cast_floating(self.text_params, name)
        other.vae_params = None if self.vae_params is None else cast_floating(self.vae_params, vae_name)
        other._programs = {}
        return other

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, workdir: str, step: Optional[int] = None, use_ema: bool = True,
                        mesh=None, ema_sigma_rel: Optional[float] = None) -> "Text2Image":
        """The pipeline of the training run in ``workdir``: config, networks and (EMA) parameters from its
        checkpoint at ``step`` (default: the latest), on ``mesh`` (default: all devices), whatever the
        mesh, device count and batch size of the training run. Only the parameters it needs are read
        (orbax partial restore: no optimizer state, no raw parameters when ``use_ema``); no dataset.
        With ``ema_sigma_rel`` the parameters are the power-function EMA of that relative width at ``step``,
        built after training from the run's EMA snapshots (``diffjax.posthoc_ema``; ``use_ema`` is then
        unused)."""
        from diffjax.config import sampling_defaults  # the experiment schema imports the input pipeline (tfds, grain)

        if os.path.exists(workdir) and not os.path.isdir(workdir):
            raise NotADirectoryError(f"{os.path.abspath(workdir)} is a file, not a training run's workdir")
        ckpt_dir = os.path.join(workdir, "checkpoints")
        ckpt = checkpoints.Checkpointer.existing(ckpt_dir)
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoint in {os.path.abspath(ckpt_dir)} (train first with "
                                    f"--mode=train --workdir={workdir})")
        if step is not None and int(step) not in ckpt.steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt.directory}; steps: {ckpt.steps()}")
        mesh = sharding.create_mesh(1) if mesh is None else mesh
        # The newest readable step (a damaged newest one is named in a warning), or the step asked for.
        for candidate in ([int(step)] if step is not None else sorted(ckpt.steps(), reverse=True)):
            try:
                config, models, params, trained = _read_checkpoint(ckpt, candidate, mesh, use_ema,
                                                                   ema_sigma_rel is not None)
                step = candidate
                break
            except Exception as e:  # orbax and tensorstore raise many types for damaged files
                where = checkpoints.damage(e, os.path.join(ckpt.directory, str(candidate)))
                if where is None:
                    raise
                if step is not None:
                    raise ValueError(f"checkpoint step {candidate} cannot be read: {where}") from None
                logging.warning("checkpoint step %d cannot be read (%s); using the previous one", candidate, where)
        else:
            raise ValueError(f"no checkpoint in {ckpt.directory} can be read (steps {ckpt.steps()} are damaged)")
        ckpt.close()
        if ema_sigma_rel is not None:
            built, residual = posthoc_ema.reconstruct(workdir, step, ema_sigma_rel, trained, config.ema)
            params.update(built)
            logging.info("post-hoc EMA of sigma_rel %g at step %d (profile fit: relative residual %.2g)",
                         ema_sigma_rel, step, residual)
        size = int(config.data.image_size) or 32  # the parameters do not depend on the spatial size
        logging.info("loaded step %d from %s (%s parameters)", step, ckpt_dir,
                     "raw" if not use_ema and ema_sigma_rel is None else "EMA")
        pipe = cls(models, params[models.component], params["text"], (size, size, models.image_channels), mesh=mesh,
                   vae_params=params.get("vae"), alignment_params=params.get("alignment"),
                   **sampling_defaults(config.sampling, config.get("alignment", {}).get("guidance_scale", 0.0)))
        pipe.config, pipe.step = config, step
        pipe.ema_sigma_rel = ema_sigma_rel
        clip_model = config.get("alignment", {}).get("clip_model", "")
        return pipe.with_alignment_clip(clip_model) if clip_model else pipe

    @classmethod
    def load(cls, model: Optional[str] = None, workdir: Optional[str] = None, *, step: Optional[int] = None,
             use_ema: bool = True, ema_sigma_rel: Optional[float] = None, dtype=None,
             alignment_clip: Optional[str] = None) -> "Text2Image":
        """:meth:`from_pretrained` of the model folder ``model``, else :meth:`from_checkpoint` of the run in
        ``workdir`` (its ``step``, EMA or raw or post-hoc EMA parameters), in ``dtype``, guided by the CLIP
        ``alignment_clip`` when given: what the command line's ``--model`` / ``--workdir`` flags load."""
        sigma_rel = posthoc_ema.check_sigma_rel(ema_sigma_rel, "ema_sigma_rel")
        if model and sigma_rel is not None:
            raise ValueError("ema_sigma_rel needs a training run's snapshots (a workdir), not a model folder")
        if model:
            pipe = cls.from_pretrained(model, dtype=dtype)
        else:
            pipe = cls.from_checkpoint(workdir, step=step, use_ema=use_ema, ema_sigma_rel=sigma_rel)
            pipe = pipe if dtype is None else pipe.to_dtype(dtype)
        return pipe.with_alignment_clip(alignment_clip) if alignment_clip else pipe

    def save_pretrained(self, directory: str) -> str:
        """Write a self-contained model folder (see :mod:`diffjax.model_folder`); returns its path."""
        return model_folder.save(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str, mesh=None, dtype=None) -> "Text2Image":
        """The pipeline saved by :meth:`save_pretrained` in ``directory``, on ``mesh`` (default: all
        devices); needs no experiment config, dataset or optimizer. ``dtype``: see :meth:`to_dtype` (default: the
        dtype the folder was saved in, e.g. ``bfloat16`` for a pipeline saved after ``to_dtype("bfloat16")``)."""
        mesh = sharding.create_mesh(1) if mesh is None else mesh
        models, params, image_shape, defaults = model_folder.load(directory, lambda tree: _with_shardings(tree, mesh))
        pipe = cls(models, params[models.component], params["text"], image_shape, mesh=mesh,
                   vae_params=params.get("vae"), alignment_params=params.get("alignment"), **defaults)
        if dtype is not None:
            return pipe.to_dtype(dtype)
        saved = models.denoiser_config.param_dtype  # a folder saved after to_dtype: every network in its dtype
        return pipe if saved == "float32" else pipe.to_dtype(saved)

    @classmethod
    def from_diffusers(cls, path_or_hub_id: str, mesh=None, dtype=None, **hub_kwargs) -> "Text2Image":
        """A Stable Diffusion pipeline (1.x / 2.x: U-Net, KL autoencoder, CLIP text encoder, scheduler) from a
        diffusers folder or Hugging Face Hub id, its weights converted (``diffjax.diffusers_format``; safetensors read
        with numpy, no torch), on ``mesh`` (default: all devices), in ``dtype`` (default float32; see
        :meth:`to_dtype`).
        ``save_pretrained`` then writes a diffjax model folder::

            pipe = Text2Image.from_diffusers("stable-diffusion-v1-5/stable-diffusion-v1-5")   # downloads once
            images = pipe.generate(["an astronaut riding a horse"], num_steps=50, guidance_scale=7.5)
        """
        mesh = sharding.create_mesh(1) if mesh is None else mesh
        models, params, image_shape, defaults = diffusers_format.load_diffusers(path_or_hub_id, **hub_kwargs)
        target = _with_shardings(models.abstract_params(), mesh)
        params = jax.tree_util.tree_map(lambda x, a: jax.device_put(np.asarray(x, a.dtype), a.sharding), params,
                                        target)
        pipe = cls(models, params["unet"], params["text"], image_shape, mesh=mesh, vae_params=params["vae"],
                   **defaults)
        return pipe if dtype is None else pipe.to_dtype(dtype)

    # ----------------------------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str], *, negative_prompt: str = "", sampler: Optional[str] = None,
                 num_steps: Optional[int] = None, guidance_scale: Optional[float] = None, seed: int = 0,
                 height: Optional[int] = None, width: Optional[int] = None, batch_size: int = 64,
                 progress: bool = False, output_type: str = "uint8", guidance_schedule: Optional[str] = None,
                 guidance_interval: Any = DEFAULT, alignment_guidance_scale: Optional[float] = None,
                 **sampler_options) -> np.ndarray:
        """uint8 images (N, H, W, C), one per prompt, sampled with classifier-free guidance
        ε̃ = ε(x, ∅') + w (ε(x, c) - ε(x, ∅')), ∅' the negative prompt (default ""); w = 1 runs the
        conditional model alone. ``output_type``: ``"uint8"``, ``"float"`` (float32 in [-1, 1]) or, for a latent
        model, ``"latent"`` (the sampled latents, not decoded). ``guidance_interval=(σ_lo, σ_hi)`` (None: guidance at
        every noise level), ``guidance_schedule=`` and ``alignment_guidance_scale=`` (here and in ``img2img`` /
        ``inpaint``) override the pipeline's defaults; other keywords are sampler options. Alignment guidance (scale
        s > 0) needs the model's alignment heads or a CLIP (:meth:`with_alignment_clip`); it is a program of its own
        (compiled at the first s > 0), in which s is traced: other values of s do not recompile."""
        call = _Call(negative_prompt, sampler, num_steps, guidance_scale, seed, batch_size, progress, output_type,
                     guidance_schedule, guidance_interval, alignment_guidance_scale, sampler_options)
        return self._run("txt2img", prompts, self._output_shape(height, width), call)

    def img2img(self, prompts: str | Sequence[str], image, *, strength: float = 0.75, negative_prompt: str = "",
                sampler: Optional[str] = None, num_steps: Optional[int] = None,
                guidance_scale: Optional[float] = None, seed: int = 0, batch_size: int = 64,
                progress: bool = False, output_type: str = "uint8", guidance_schedule: Optional[str] = None,
                guidance_interval: Any = DEFAULT, alignment_guidance_scale: Optional[float] = None,
                **sampler_options) -> np.ndarray:
        """SDEdit: ``image`` (uint8 (H, W, C) or (N, H, W, C), or float in [-1, 1]) noised to the level of step
        N - ⌊strength · N⌋ and denoised with the prompts from there, as diffusers' img2img pipelines do.
        ``strength`` 0 returns the image, 1 ignores it (plain text-to-image from the same seed)."""
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        prompts = check_prompts(prompts)
        x0 = self._check_image(image, len(prompts), "image")
        n = self._num_steps(num_steps)
        start = n - min(int(n * float(strength)), n)
        kind = "txt2img" if start == 0 else "img2img"  # strength 1: from pure noise, the image is unused
        if start == n and output_type != "latent":  # strength 0 (or < 1/n): no step to take, the image itself
            return self._finish(x0, self._check_output_type(output_type))
        call = _Call(negative_prompt, sampler, n, guidance_scale, seed, batch_size, progress, output_type,
                     guidance_schedule, guidance_interval, alignment_guidance_scale, sampler_options)
        return self._run(kind, prompts, x0.shape[1:], call, x0=x0, start_step=start)

    def inpaint(self, prompts: str | Sequence[str], image, mask, *, negative_prompt: str = "",
                sampler: Optional[str] = None, num_steps: Optional[int] = None,
                guidance_scale: Optional[float] = None, seed: int = 0, batch_size: int = 64,
                progress: bool = False, output_type: str = "uint8", guidance_schedule: Optional[str] = None,
                guidance_interval: Any = DEFAULT, alignment_guidance_scale: Optional[float] = None,
                **sampler_options) -> np.ndarray:
        """Fill the pixels where ``mask`` is 1/True (diffusers' convention: white is repainted) and keep the
        others exactly. ``mask``: (H, W), (H, W, 1) or (N, H, W[, 1]), bool or {0, 1} or uint8 {0, 255}."""
        prompts = check_prompts(prompts)
        x0 = self._check_image(image, len(prompts), "image")
        fill = self._check_mask(mask, x0.shape)
        call = _Call(negative_prompt, sampler, num_steps, guidance_scale, seed, batch_size, progress, output_type,
                     guidance_schedule, guidance_interval, alignment_guidance_scale, sampler_options)
        return self._run("inpaint", prompts, x0.shape[1:], call, x0=x0, fill=fill)

    # ----------------------------------------------------------------------------------------------
    def check_alignment_guidance(self, scale) -> float:
        """``scale`` as a float if this pipeline can guide with it (0, or heads / a CLIP to follow); one line
        naming the problem otherwise."""
        scale = check_alignment_scale(scale)
        self._alignment_source(scale)
        return scale

    def _alignment_source(self, scale: float) -> str:
        """What alignment guidance at ``scale`` follows: "" (off), "clip" (with_alignment_clip) or "heads"; a
        one-line ValueError when it is asked of a model with neither."""
        if scale == 0:
            return ""
        if self.alignment_clip is not None:
            return "clip"
        if self.models.alignment is not None:
            if self.alignment_params is None:
                raise ValueError(f"alignment_guidance_scale={scale:g}: this pipeline has alignment heads but no "
                                 f"parameters for them (alignment_params)")
            return "heads"
        raise ValueError(f"alignment_guidance_scale={scale:g} needs alignment heads (train with "
                         f"config.alignment.weight > 0) or a CLIP (Text2Image.with_alignment_clip, "
                         f"--alignment_clip), and this model has neither")

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the U-Net's total downsampling or the DiT's patch (times
        the autoencoder's downsampling)."""
        return self.models.size_multiple

    def _check_output_type(self, output_type: str) -> str:
        allowed = ("uint8", "float") + (("latent",) if self.models.autoencoder is not None else ())
        if output_type not in allowed:
            raise ValueError(f"output_type={output_type!r}: expected one of {', '.join(allowed)}")
        return output_type

    @staticmethod
    def _finish(x, output_type: str) -> np.ndarray:
        return to_uint8(x) if output_type == "uint8" else np.asarray(x, np.float32)

    def _num_steps(self, num_steps) -> int:
        """``num_steps`` (default: the pipeline's) as a positive int; a one-line ValueError otherwise."""
        return check_num_steps(self.defaults["num_steps"] if num_steps is None else num_steps)

    def _output_shape(self, height, width) -> tuple[int, int, int]:
        h0, w0, c = self.image_shape
        h, w = int(height or h0), int(width or w0)
        factor = self.size_multiple
        if h < 1 or w < 1 or h % factor or w % factor:
            what = "DiT patch size" if self.models.name == "dit" else "U-Net downsampling"
            if self.models.autoencoder is not None:
                what += " times the autoencoder's"
            raise ValueError(f"height={h}, width={w}: both must be positive multiples of {factor} (the {what})")
        return h, w, c

    def _check_image(self, image, n: int, what: str) -> np.ndarray:
        """float32 (n, H, W, C) in [-1, 1] from uint8 or float images; one line naming the problem otherwise."""
        if hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image
            image = np.asarray(image)
        x = np.asarray(image)
        c = self.image_shape[2]
        if x.ndim == 2 and c == 1:
            x = x[..., None]
        if x.ndim == 3:
            x = x[None]
        factor = self.size_multiple
        if x.ndim != 4 or x.shape[-1] != c or x.shape[0] not in (1, n) or x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"{what} has shape {np.shape(image)}; expected (H, W, {c}) or ({n}, H, W, {c}) with H "
                             f"and W multiples of {factor}")
        if x.dtype == np.uint8:
            x = from_uint8(x)
        else:
            x = np.asarray(x, np.float32)
            if x.size and (x.min() < -1.0 - 1e-6 or x.max() > 1.0 + 1e-6):
                raise ValueError(f"{what} is float with values in [{x.min():.3g}, {x.max():.3g}]; give uint8 "
                                 f"in [0, 255] or float in [-1, 1]")
        return np.broadcast_to(x, (n,) + x.shape[1:]).astype(np.float32)

    @staticmethod
    def _check_mask(mask, image_shape) -> np.ndarray:
        n, h, w, c = image_shape
        m = np.asarray(mask)
        if m.ndim >= 3 and m.shape[-1] == 1:
            m = m[..., 0]
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or m.shape[1:] != (h, w) or m.shape[0] not in (1, n):
            raise ValueError(f"mask has shape {np.shape(mask)}; expected ({h}, {w}), ({h}, {w}, 1) or "
                             f"({n}, {h}, {w}) to match the image")
        fill = m > (127 if m.dtype == np.uint8 and m.max() > 1 else 0)
        return np.broadcast_to(fill[..., None], (n, h, w, c)).astype(bool)

    @property
    def programs(self) -> Mapping[SamplingSpec, Any]:
        """The compiled sampling programs this pipeline built, by spec (``diffjax.sampling``); read-only."""
        return types.MappingProxyType(self._programs)

    def _program(self, spec: SamplingSpec):
        if spec not in self._programs:
            self._programs[spec] = sampling_program(self.models, spec, self.alignment_clip)
        return self._programs[spec]

    def _spec(self, kind: str, call: "_Call", start_step: int) -> tuple[SamplingSpec, float, tuple, float]:
        """(the program's spec, guidance scale, guidance interval (σ_lo, σ_hi), alignment guidance scale) of a call,
        its values checked; one line naming the problem otherwise."""
        sampler = call.sampler or self.defaults["sampler"]
        num_steps = self._num_steps(call.num_steps)
        scale = check_guidance_scale(self.defaults["guidance_scale"] if call.guidance_scale is None
                                     else call.guidance_scale)
        schedule = guidance.check_guidance_schedule(self.defaults["guidance_schedule"] if call.guidance_schedule is None
                                                    else call.guidance_schedule)
        interval = check_guidance_interval(self.defaults["guidance_interval"] if call.guidance_interval is DEFAULT
                                           else call.guidance_interval)
        align_scale = check_alignment_scale(self.defaults["alignment_guidance_scale"]
                                            if call.alignment_guidance_scale is None else call.alignment_guidance_scale)
        options = resolve_sampler_options(self.models, sampler, self.sampler_options, call.sampler_options,
                                          self.timestep_spacing)
        spec = SamplingSpec(kind, sampler, num_steps, scale != 1.0, start_step, options,
                            call.output_type == "latent", schedule, interval is not None,
                            self._alignment_source(align_scale))
        return spec, scale, interval or (-1.0, math.inf), align_scale

    def _run(self, kind: str, prompts, shape, call: "_Call", x0=None, fill=None, start_step=0) -> np.ndarray:
        """Sample ``prompts`` in chunks of ``call.batch_size`` (a multiple of the device count), each chunk one call
        of the spec's program, sharded over the mesh along the batch."""
        output_type = self._check_output_type(call.output_type)
        if self.models.autoencoder is not None and self.vae_params is None:
            raise ValueError("this latent model's pipeline has no autoencoder parameters (vae_params)")
        prompts = check_prompts(prompts)
        if not isinstance(call.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {type(call.negative_prompt).__name__}")
        if not isinstance(call.seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {call.seed!r}")
        spec, scale, interval, align_scale = self._spec(kind, call, start_step)
        fn = self._program(spec)
        n = len(prompts)
        ndev = self.mesh.devices.size
        chunk = max(ndev, -(-min(int(call.batch_size), n) // ndev) * ndev)
        enc = self.models.text_encoder
        ids, mask = enc.tokenize(prompts)
        neg_ids, neg_mask = enc.tokenize([call.negative_prompt])
        align_params = None
        clip_ids, clip_mask = ids, mask  # unused unless a CLIP guides
        if spec.alignment == "heads":
            align_params = self.alignment_params
        elif spec.alignment == "clip":
            align_params = self.alignment_clip.params
            clip_ids, clip_mask = self.alignment_clip.tokenize(prompts)
        if x0 is None:
            x0 = np.zeros((n,) + tuple(shape), np.float32)
        if fill is None:
            fill = np.ones(x0.shape, bool)
        rows = np.arange(n)
        batch_sh, rep = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)

        def put(a, sh):
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])

        seed_key = jax.random.PRNGKey(int(call.seed))
        out = []
        starts = range(0, n, chunk)
        if call.progress and len(starts) > 1 and jax.process_index() == 0:
            starts = tqdm(starts, desc=kind, unit="batch")
        for s in starts:
            take = np.minimum(np.arange(s, s + chunk), n - 1)  # pad the last chunk by repeating its last row
            x = fn(SamplingInputs(
                self.denoiser_params, self.text_params, self.vae_params, put(ids[take], batch_sh),
                put(mask[take], batch_sh), put(neg_ids, rep), put(neg_mask, rep), put(rows[take], batch_sh), seed_key,
                jnp.float32(scale), jnp.asarray(interval, jnp.float32), put(x0[take], batch_sh),
                put(fill[take], batch_sh), jnp.float32(align_scale), align_params, put(clip_ids[take], batch_sh),
                put(clip_mask[take], batch_sh)))
            if jax.process_count() > 1:
                x = multihost_utils.process_allgather(x, tiled=True)
            out.append(self._finish(x, output_type)[: min(chunk, n - s)])
        return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class _Call:
    """The keywords common to generate, img2img and inpaint (None: the pipeline's default)."""

    negative_prompt: str
    sampler: Optional[str]
    num_steps: Optional[int]
    guidance_scale: Optional[float]
    seed: int
    batch_size: int
    progress: bool
    output_type: str
    guidance_schedule: Optional[str]
    guidance_interval: Any  # DEFAULT: the pipeline's; None: guidance at every noise level
    alignment_guidance_scale: Optional[float]
    sampler_options: dict


def check_num_steps(num_steps, what: str = "num_steps") -> int:
    """``num_steps`` as a positive int; a one-line ValueError naming ``what`` otherwise."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"{what} must be a positive integer, got {num_steps!r}")
    return int(num_steps)


def check_guidance_scale(scale, what: str = "guidance_scale") -> float:
    """The classifier-free guidance scale as a finite float >= 0 (1: no guidance); a one-line ValueError naming
    ``what`` otherwise."""
    return _finite_nonnegative(scale, what, "1: no guidance")


def check_alignment_scale(scale, what: str = "alignment_guidance_scale") -> float:
    """``scale`` as a finite float >= 0 (0: no alignment guidance); a one-line ValueError naming ``what`` otherwise."""
    return _finite_nonnegative(scale, what, "0: off")


def _finite_nonnegative(scale, what: str, meaning: str) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0 ({meaning}), got {scale!r}")
    return value


def _with_shardings(abstract: Any, mesh) -> Any:
    """``jax.ShapeDtypeStruct`` leaves laid out over ``mesh`` by the FSDP rule (replicated when the mesh has no
    fsdp axis of size > 1): where loaded parameters go."""
    return abstract_with_shardings(abstract, sharding.state_shardings(mesh, abstract))


def _read_checkpoint(ckpt, step: int, mesh, use_ema: bool, posthoc: bool):
    """(config, models, model parameters, the trained parameters' abstract tree) of a training checkpoint; with
    ``posthoc`` only the frozen parameters are read (the trained ones are built from the EMA snapshots)."""
    config = ml_collections.ConfigDict(ckpt.restore_config(step))
    models, _ = build.models_from_config(config, with_params=False)
    trained, frozen = checkpoints.split_trained(_with_shardings(models.abstract_params(), mesh),
                                                models.text_encoder.trainable)
    return config, models, checkpoints.read_model_params(ckpt, step, None if posthoc else trained, frozen, use_ema), \
        trained
