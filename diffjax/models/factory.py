"""The one place where a config becomes networks: denoiser, text encoder, noise schedule, ``model_fn``.

Two kinds of config describe the same model:

* an experiment's ``ml_collections`` config (``config.model``, ``config.text``, ``config.diffusion``), read by
  :func:`build_models` for training, evaluation and sampling from a training checkpoint;
* the component configs of a saved model folder (``unet/config.json``: every :class:`UNetConfig` field;
  ``scheduler/scheduler_config.json``: :class:`SchedulerConfig`; ``text_encoder/``: a transformers
  directory), read by :func:`models_from_components`, with no experiment config at all.

Both give a :class:`Models`, whose :meth:`Models.denoiser` is the adapter that every loss, sampler and
guidance function calls, ``model_fn(x_t, t, cond) -> prediction`` with ``cond`` a ``text.TextEncoding``
(the structure of score_sde's ``get_model_fn`` and EDM's preconditioning wrappers: one function maps the raw
network to what the diffusion math expects).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from diffjax import schedules as sch
from diffjax.models.unet import UNet, UNetConfig
from diffjax.text import TextEncoder

Array = jax.Array

# The UNetConfig fields that the text encoder fills in (an experiment config leaves them None).
_TEXT_FIELDS = ("context_dim", "pooled_dim")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The forward process and the parameterisation of the network's output: ``scheduler_config.json``."""

    schedule: str = "cosine"  # a name of schedules.SCHEDULES
    num_timesteps: int = 1000
    rescale_to_zero_snr: bool = False
    prediction_type: str = "eps"  # eps | x0 | v

    def __post_init__(self):
        if self.schedule not in sch.SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {', '.join(sch.SCHEDULES)}")
        if self.prediction_type not in sch.PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of "
                             f"{', '.join(sch.PREDICTION_TYPES)}")

    def build(self) -> sch.NoiseSchedule:
        return sch.get_schedule(self.schedule, int(self.num_timesteps), rescale_to_zero_snr=self.rescale_to_zero_snr)


@dataclasses.dataclass(frozen=True, eq=False)
class Models:
    """The networks and the schedule of a text-to-image diffusion model (parameters live outside)."""

    unet: UNet
    text_encoder: TextEncoder
    scheduler: SchedulerConfig
    schedule: sch.NoiseSchedule = dataclasses.field(init=False)  # built here, never inside a trace

    def __post_init__(self):
        object.__setattr__(self, "schedule", self.scheduler.build())

    @property
    def prediction_type(self) -> str:
        return self.scheduler.prediction_type

    @property
    def use_pooled(self) -> bool:
        """Whether the pooled text embedding is added to the timestep embedding."""
        return self.unet.config.pooled_dim is not None

    def denoiser(self, unet_params, train: bool = False, dropout_rng: Optional[Array] = None):
        """``model_fn(x_t, t, cond)`` for losses/guidance/samplers, with cond a ``text.TextEncoding``."""
        rngs = {"dropout": dropout_rng} if (train and dropout_rng is not None) else None

        def model_fn(x_t, t, cond):
            return self.unet.apply({"params": unet_params}, x_t, t, cond.hidden_states, cond.mask,
                                   pooled=cond.pooled if self.use_pooled else None, train=train, rngs=rngs)

        return model_fn

    def init_unet(self, rng: Array, image_shape=(32, 32)) -> Any:
        """Fresh U-Net parameters (they do not depend on the spatial size; ``image_shape[:2]`` is only the
        size of the dummy input)."""
        h, w = tuple(image_shape)[:2]
        x = jnp.zeros((1, h, w, self.unet.config.in_channels), jnp.float32)
        d, length = self.text_encoder.hidden_size, self.text_encoder.max_length
        return self.unet.init({"params": rng, "dropout": rng}, x, jnp.zeros((1,)), jnp.zeros((1, length, d)),
                              jnp.ones((1, length), bool), pooled=jnp.zeros((1, d)) if self.use_pooled else None
                              )["params"]

    def abstract_params(self) -> dict:
        """``{"unet": ..., "text": ...}`` as ``jax.ShapeDtypeStruct`` trees (nothing is computed)."""
        size = self.unet.config.downsample_factor
        return jax.eval_shape(lambda k: {"unet": self.init_unet(k, (size, size)), "text": self.text_encoder.init(k)},
                              jax.random.PRNGKey(0))


# ------------------------------------------------------------------------------------------------------
# Experiment config → Models.
# ------------------------------------------------------------------------------------------------------


def unet_config_fields(preset: str = "small", **overrides) -> dict:
    """Every UNetConfig field of a preset with overrides, and the preset's name, as a plain dict: what an
    experiment config holds under ``config.model.unet`` (each field overridable on the command line).
    ``context_dim`` and ``pooled_dim`` stay None unless given: the text encoder fills them in."""
    fields = dataclasses.asdict(UNetConfig.preset(preset, **overrides))
    for key in _TEXT_FIELDS:
        fields[key] = overrides.get(key)
    return {"preset": preset, **fields}


def unet_config(fields, text_hidden_size: int, use_pooled: bool) -> UNetConfig:
    """The :class:`UNetConfig` of ``config.model.unet`` (see :func:`unet_config_fields`) for a text encoder of
    width ``text_hidden_size``: cross-attention on its states, and its pooled embedding when ``use_pooled``."""
    fields = {k: v for k, v in dict(fields).items() if k != "preset"}
    context_dim = fields.get("context_dim") or text_hidden_size
    if context_dim != text_hidden_size:
        raise ValueError(f"config.model.unet.context_dim={context_dim} does not match the text encoder's "
                         f"hidden size {text_hidden_size}")
    fields.update(context_dim=context_dim, pooled_dim=text_hidden_size if use_pooled else None)
    known = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"config.model.unet: unknown field(s) {', '.join(unknown)}")
    return UNetConfig(**fields)


def text_encoder(text_config, seed: int = 0, with_params: bool = True) -> tuple[TextEncoder, Optional[dict]]:
    """The ``TextEncoder`` of ``config.text`` and its parameters (pretrained, or initialised from ``seed``);
    with ``with_params=False`` only its config and tokenizer are read (no weights loaded or initialised; params
    None), for parameters restored from a checkpoint."""
    tc = text_config
    if tc.pretrained:
        encoder, params = TextEncoder.from_pretrained(tc.encoder, load_weights=with_params)
        return encoder.replace(trainable=tc.trainable, max_length=tc.max_length), params
    return TextEncoder.from_config(tc.encoder, seed=seed, max_length=tc.max_length, trainable=tc.trainable,
                                   init=with_params)


def scheduler_config(diffusion_config) -> SchedulerConfig:
    dc = diffusion_config
    return SchedulerConfig(schedule=dc.schedule, num_timesteps=int(dc.num_timesteps),
                           rescale_to_zero_snr=bool(dc.rescale_to_zero_snr), prediction_type=dc.prediction_type)


def build_models(config, with_text_params: bool = True) -> tuple[Models, Optional[dict]]:
    """(Models, text encoder parameters) from ``config.model``, ``config.text`` and ``config.diffusion``."""
    encoder, text_params = text_encoder(config.text, seed=config.seed, with_params=with_text_params)
    ucfg = unet_config(config.model.unet, encoder.hidden_size, bool(config.model.use_pooled_text))
    return Models(UNet(ucfg), encoder, scheduler_config(config.diffusion)), text_params


# ------------------------------------------------------------------------------------------------------
# Component configs (a model folder) → Models.
# ------------------------------------------------------------------------------------------------------


def models_from_components(unet_fields: dict, encoder: TextEncoder, scheduler_fields: dict) -> Models:
    """Models from the JSON dicts of ``unet/config.json`` and ``scheduler/scheduler_config.json`` and a loaded
    text encoder. A field that is not one of the config class's raises a one-line ValueError."""
    for what, cls, fields in (("unet/config.json", UNetConfig, unet_fields),
                              ("scheduler/scheduler_config.json", SchedulerConfig, scheduler_fields)):
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{what}: unknown field(s) {', '.join(unknown)}")
    ucfg = UNetConfig(**unet_fields)
    if ucfg.context_dim != encoder.hidden_size:
        raise ValueError(f"unet/config.json: context_dim={ucfg.context_dim} does not match the text encoder's "
                         f"hidden size {encoder.hidden_size}")
    return Models(UNet(ucfg), encoder, SchedulerConfig(**scheduler_fields))


def component_configs(models: Models) -> dict:
    """The JSON-serialisable component configs: ``{"unet": ..., "scheduler": ...}`` (the text encoder writes
    its own, transformers' ``config.json``)."""
    return {"unet": dataclasses.asdict(models.unet.config), "scheduler": dataclasses.asdict(models.scheduler)}
