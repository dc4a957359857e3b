"""``Models``: the networks and the schedule of a text-to-image diffusion model, and the adapter from the raw
network to the ``model_fn`` every loss, sampler and guidance function calls.

The denoiser is a U-Net (``diffjax.models.unet``) or a Diffusion Transformer (``diffjax.models.dit``), chosen
by ``config.model.name``; both have the same call signature, so nothing downstream depends on which. Its
parameters live under the name of its component, as in diffusers' pipelines: ``"unet"`` or ``"transformer"``
(:data:`COMPONENTS`), beside the text encoder's ``"text"``.

Two kinds of config describe the same model: an experiment's ``ml_collections`` config, which
``diffjax.build.models_from_config`` turns into a :class:`Models` (this module gives it the denoisers' presets,
:func:`denoiser_config_fields`), and the component configs of a saved model folder (``unet/config.json``: every
:class:`UNetConfig` field, or ``transformer/config.json``: every :class:`DiTConfig` field;
``scheduler/scheduler_config.json``: :class:`SchedulerConfig`; ``text_encoder/``: a transformers directory),
read by :func:`models_from_components` and written from :func:`component_configs`.

:meth:`Models.model_fn` gives ``model_fn(x_t, t, cond) -> prediction`` with ``cond`` a ``text.TextEncoding`` (the
structure of score_sde's ``get_model_fn`` and EDM's preconditioning wrappers: one function maps the raw network
to what the diffusion math expects).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from diffjax import schedules as sch
from diffjax.models.alignment import AlignmentConfig, AlignmentHeads
from diffjax.models.autoencoder import AutoencoderKL, VAEConfig
from diffjax.models.dit import DiT, DiTConfig
from diffjax.models.unet import UNet, UNetConfig
from diffjax.text import TextEncoder

Array = jax.Array

# config.model.name → (denoiser class, its config class, the component: folder and parameter name).
DENOISERS = {"unet": (UNet, UNetConfig, "unet"), "dit": (DiT, DiTConfig, "transformer")}
COMPONENTS = {component: name for name, (_, _, component) in DENOISERS.items()}

# The network config fields that the text encoder fills in (an experiment config leaves them None).
_TEXT_FIELDS = ("context_dim", "pooled_dim")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The forward process and the parameterisation of the network's output: ``scheduler_config.json``."""

    schedule: str = "cosine"  # a name of schedules.SCHEDULES
    num_timesteps: int = 1000
    rescale_to_zero_snr: bool = False
    prediction_type: str = "eps"  # eps | x0 | v
    beta_start: Optional[float] = None  # linear / scaled_linear: β_1 and β_T (None: the schedule's defaults)
    beta_end: Optional[float] = None

    def __post_init__(self):
        if self.schedule not in sch.SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {', '.join(sch.SCHEDULES)}")
        if self.prediction_type not in sch.PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of "
                             f"{', '.join(sch.PREDICTION_TYPES)}")

    def build(self) -> sch.NoiseSchedule:
        betas = {k: float(v) for k, v in (("beta_start", self.beta_start), ("beta_end", self.beta_end)) if v is not None}
        return sch.get_schedule(self.schedule, int(self.num_timesteps), rescale_to_zero_snr=self.rescale_to_zero_snr,
                                **betas)


@dataclasses.dataclass(frozen=True, eq=False)
class Models:
    """The networks and the schedule of a text-to-image diffusion model (parameters live outside).

    ``denoiser`` is a :class:`UNet` or a :class:`DiT`; its parameters are ``params[models.component]``. With an
    ``autoencoder`` (latent diffusion) the denoiser works on its scaled latents and its parameters are
    ``params["vae"]``. With ``alignment`` heads (``config.alignment.weight`` > 0) the image–text alignment term is
    trained and alignment guidance can follow it; their parameters are ``params["alignment"]``."""

    denoiser: UNet | DiT
    text_encoder: TextEncoder
    scheduler: SchedulerConfig
    autoencoder: Optional[AutoencoderKL] = None
    alignment: Optional[AlignmentHeads] = None
    schedule: sch.NoiseSchedule = dataclasses.field(init=False)  # built here, never inside a trace

    def __post_init__(self):
        object.__setattr__(self, "schedule", self.scheduler.build())

    @property
    def name(self) -> str:
        """``config.model.name`` of the network: ``"unet"`` or ``"dit"``."""
        return "dit" if isinstance(self.denoiser, DiT) else "unet"

    @property
    def component(self) -> str:
        """The network's component name: its parameters' key and its model-folder directory."""
        return DENOISERS[self.name][2]

    @property
    def denoiser_config(self) -> UNetConfig | DiTConfig:
        return self.denoiser.config

    @property
    def prediction_type(self) -> str:
        return self.scheduler.prediction_type

    @property
    def in_channels(self) -> int:
        return self.denoiser.config.in_channels

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (the U-Net's downsampling, the DiT's patch, times the
        autoencoder's downsampling for a latent model)."""
        return self.denoiser.config.size_multiple * self.latent_factor

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent pixel along a side (1 without an autoencoder)."""
        return 1 if self.autoencoder is None else self.autoencoder.config.downsample_factor

    @property
    def image_channels(self) -> int:
        """Channels of the images (the autoencoder's, or the network's for a pixel-space model)."""
        return self.in_channels if self.autoencoder is None else self.autoencoder.config.in_channels

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        """(h, w, c) the network works on for images of ``image_shape`` (H, W, ...)."""
        h, w = tuple(image_shape)[:2]
        return h // self.latent_factor, w // self.latent_factor, self.in_channels

    @property
    def learns_variance(self) -> bool:
        """Whether the network also outputs its reverse-process variance (``DiTConfig.learn_sigma``)."""
        return bool(getattr(self.denoiser.config, "learn_sigma", False))

    @property
    def use_pooled(self) -> bool:
        """Whether the pooled text embedding is added to the timestep embedding."""
        return self.denoiser.config.pooled_dim is not None

    def model_fn(self, params, train: bool = False, dropout_rng: Optional[Array] = None,
                 with_variance: bool = False):
        """``model_fn(x_t, t, cond)`` for losses/guidance/samplers, with cond a ``text.TextEncoding`` and
        ``params`` the network's (``params[self.component]``). A learned-variance network's variance channels
        are dropped unless ``with_variance`` (for its training loss and DDPM's ``learned_range`` variance)."""
        rngs = {"dropout": dropout_rng} if (train and dropout_rng is not None) else None
        keep = None if (with_variance or not self.learns_variance) else self.denoiser.config.prediction_channels

        def model_fn(x_t, t, cond):
            out = self.denoiser.apply({"params": params}, x_t, t, cond.hidden_states, cond.mask,
                                     pooled=cond.pooled if self.use_pooled else None, train=train, rngs=rngs)
            return out if keep is None else out[..., :keep]

        return model_fn

    def init_denoiser(self, rng: Array, image_shape=(32, 32)) -> Any:
        """Fresh network parameters (the U-Net's do not depend on the spatial size, nor do the DiT's: its
        position embeddings are computed, not learned; ``image_shape[:2]`` is only the dummy input's size)."""
        h, w = tuple(image_shape)[:2]
        d, length = self.text_encoder.hidden_size, self.text_encoder.max_length

        def init(rng):
            x = jnp.zeros((1, h, w, self.in_channels), jnp.float32)
            return self.denoiser.init({"params": rng, "dropout": rng}, x, jnp.zeros((1,)), jnp.zeros((1, length, d)),
                                     jnp.ones((1, length), bool),
                                     pooled=jnp.zeros((1, d)) if self.use_pooled else None)["params"]

        # One program: called outside jit, Flax's init would run the network's forward pass op by op (a compiled
        # kernel per operation, hundreds for the U-Net). Inside a traced function this jit is inlined.
        return jax.jit(init)(rng)

    def abstract_params(self) -> dict:
        """``{component: ..., "text": ...[, "vae": ...]}`` as ``jax.ShapeDtypeStruct`` trees (nothing is
        computed)."""
        size = self.denoiser.config.size_multiple

        def init(k):
            out = {self.component: self.init_denoiser(k, (size, size)), "text": self.text_encoder.init(k)}
            if self.autoencoder is not None:
                f, c = self.latent_factor, self.autoencoder.config.in_channels
                out["vae"] = self.autoencoder.init(k, jnp.zeros((1, f, f, c)))["params"]
            if self.alignment is not None:
                out["alignment"] = self.alignment.init_params(k, (size, size, self.in_channels))
            return out

        return jax.eval_shape(init, jax.random.PRNGKey(0))


def in_dtype(network, dtype: str, param_dtype: Optional[str] = None):
    """The same network (U-Net, DiT or autoencoder) computing in ``dtype``, its parameters in ``param_dtype``
    (default: ``dtype``)."""
    return type(network)(network.config.replace(dtype=dtype, param_dtype=param_dtype or dtype))


def cast_floating(tree: Any, dtype) -> Any:
    """Every floating leaf of ``tree`` (numpy or jax arrays) as ``dtype``, the other leaves as they are
    (``jnp.issubdtype``: numpy does not count bfloat16 as floating). The jax arrays are cast by one compiled
    program (keeping their shardings), not one per leaf."""
    dtype = jnp.dtype(dtype)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    cast = [i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype]
    on_device = [i for i in cast if isinstance(leaves[i], jax.Array)]
    if on_device:
        done = jax.jit(lambda xs: [x.astype(dtype) for x in xs])([leaves[i] for i in on_device])
        for i, x in zip(on_device, done):
            leaves[i] = x
    for i in set(cast) - set(on_device):
        leaves[i] = leaves[i].astype(dtype)
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ------------------------------------------------------------------------------------------------------
# Network presets: what an experiment config holds under config.model.unet / config.model.dit
# (diffjax.build turns that section into a network).
# ------------------------------------------------------------------------------------------------------


def denoiser_config_fields(name: str = "unet", preset: Optional[str] = None, **overrides) -> dict:
    """Every field of network ``name``'s config class for a preset (default: ``"small"`` for the U-Net,
    ``"fashion_mnist"`` for the DiT) with overrides, and the preset's name, as a plain dict: what an experiment
    config holds under ``config.model.unet`` / ``config.model.dit`` (each field overridable on the command
    line). ``context_dim`` and ``pooled_dim`` stay None unless given: the text encoder fills them in."""
    _, cls, _ = denoiser_class(name)
    preset = preset or {"unet": "small", "dit": "fashion_mnist"}[name]
    fields = dataclasses.asdict(cls.preset(preset, **overrides))
    for key in _TEXT_FIELDS:
        fields[key] = overrides.get(key)
    return {"preset": preset, **fields}


def denoiser_class(name: str):
    """(network class, its config class, its component name) of ``config.model.name`` ``name``; a one-line
    ValueError naming the key otherwise."""
    if name not in DENOISERS:
        raise ValueError(f"config.model.name={name!r}: expected one of {', '.join(DENOISERS)}")
    return DENOISERS[name]


# ------------------------------------------------------------------------------------------------------
# Component configs (a model folder) → Models.
# ------------------------------------------------------------------------------------------------------


def models_from_components(component: str, network_fields: dict, encoder: TextEncoder,
                           scheduler_fields: dict, vae_fields: Optional[dict] = None,
                           alignment_fields: Optional[dict] = None) -> Models:
    """Models from the JSON dicts of ``COMPONENT/config.json`` (``component``: ``"unet"`` or ``"transformer"``),
    ``scheduler/scheduler_config.json``, (a latent model) ``vae/config.json`` and (alignment heads)
    ``alignment/config.json``, and a loaded text encoder. A field that is not one of the config class's raises a
    one-line ValueError."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown denoiser component {component!r}; expected one of {', '.join(COMPONENTS)}")
    net_cls, cfg_cls, _ = DENOISERS[COMPONENTS[component]]
    checks = [(f"{component}/config.json", cfg_cls, network_fields),
              ("scheduler/scheduler_config.json", SchedulerConfig, scheduler_fields)]
    if vae_fields is not None:
        checks.append(("vae/config.json", VAEConfig, vae_fields))
    if alignment_fields is not None:
        checks.append(("alignment/config.json", AlignmentConfig, alignment_fields))
    for what, cls, fields in checks:
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{what}: unknown field(s) {', '.join(unknown)}")
    ncfg = cfg_cls(**network_fields)
    if ncfg.context_dim != encoder.hidden_size:
        raise ValueError(f"{component}/config.json: context_dim={ncfg.context_dim} does not match the text "
                         f"encoder's hidden size {encoder.hidden_size}")
    vae = None
    if vae_fields is not None:
        vcfg = VAEConfig(**vae_fields)
        if vcfg.latent_channels != ncfg.in_channels:
            raise ValueError(f"vae/config.json: latent_channels={vcfg.latent_channels} but {component}/config.json "
                             f"has in_channels={ncfg.in_channels}")
        vae = AutoencoderKL(vcfg)
    heads = None
    if alignment_fields is not None:
        acfg = AlignmentConfig(**alignment_fields)
        if (acfg.in_channels, acfg.text_dim) != (ncfg.in_channels, encoder.hidden_size):
            raise ValueError(f"alignment/config.json: in_channels={acfg.in_channels}, text_dim={acfg.text_dim} do not "
                             f"match the denoiser's {ncfg.in_channels} channels and the text encoder's "
                             f"{encoder.hidden_size}")
        heads = AlignmentHeads(acfg)
    return Models(net_cls(ncfg), encoder, SchedulerConfig(**scheduler_fields), vae, heads)


def component_configs(models: Models) -> dict:
    """The JSON-serialisable component configs: ``{models.component: ..., "scheduler": ...[, "vae": ...][,
    "alignment": ...]}`` (the
    text encoder writes its own, transformers' ``config.json``)."""
    out = {models.component: dataclasses.asdict(models.denoiser_config),
           "scheduler": dataclasses.asdict(models.scheduler)}
    if models.autoencoder is not None:
        out["vae"] = dataclasses.asdict(models.autoencoder.config)
    if models.alignment is not None:
        out["alignment"] = dataclasses.asdict(models.alignment.config)
    return out
