"""Experiment configs; ``validate_config`` checks any of them (and command-line overrides) before a run;
``load_config`` reads one from its file with ``KEY=VALUE`` overrides (for scripts without absl flags)."""

import ast
import dataclasses
import importlib.util
from typing import Iterable

import ml_collections

from diffjax import guidance, losses, pipeline, posthoc_ema, samplers, schedules
from diffjax.data.input_pipeline import validate_data_config
from diffjax.models import factory
from diffjax.models.alignment import heads_from_config


def _flat_keys(cfg, prefix=""):
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _flat_keys(value, name + ".")
        else:
            yield name


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise a one-line ValueError naming the first unknown key or bad value."""
    from experiments.configs import default

    known = set(_flat_keys(default.get_config()))
    for key in _flat_keys(config):
        if key not in known:
            raise ValueError(f"unknown config key {key!r} (see experiments/configs/default.py)")
    for key in known - set(_flat_keys(config)):
        raise ValueError(f"config key {key!r} is missing (start experiment configs from default.get_config())")

    def choice(key, value, allowed):
        if value not in allowed:
            raise ValueError(f"config.{key}={value!r}: expected one of {', '.join(map(str, allowed))}")

    d = config.diffusion
    choice("diffusion.schedule", d.schedule, schedules.SCHEDULES)
    choice("diffusion.prediction_type", d.prediction_type, schedules.PREDICTION_TYPES)
    choice("diffusion.loss_weighting", d.loss_weighting, losses.WEIGHTINGS)
    choice("diffusion.timestep_sampling", d.timestep_sampling, losses.TIMESTEP_SAMPLERS)
    if not d.log_normal_std > 0:
        raise ValueError(f"config.diffusion.log_normal_std={d.log_normal_std} must be > 0")
    choice("sampling.sampler", config.sampling.sampler, tuple(samplers.SAMPLERS))
    choice("sampling.timestep_spacing", config.sampling.timestep_spacing, samplers.SPACINGS)
    choice("sampling.guidance_schedule", config.sampling.guidance_schedule, guidance.GUIDANCE_SCHEDULES)
    pipeline.check_guidance_interval(config.sampling.guidance_interval, "config.sampling.guidance_interval")
    heads_from_config(config.alignment, 1, 1)  # λ, the loss, w(t), the heads' sizes and the guidance scale
    choice("optim.lr_schedule", config.optim.lr_schedule, ("constant", "cosine"))
    choice("training.on_nonfinite", config.training.on_nonfinite, ("skip", "stop"))
    choice("training.on_corrupt_checkpoint", config.training.on_corrupt_checkpoint, ("fallback", "fail"))
    if not 0.0 <= d.cond_drop_prob < 1.0:
        raise ValueError(f"config.diffusion.cond_drop_prob={d.cond_drop_prob} must be in [0, 1)")
    if not 1 <= config.sampling.num_steps <= d.num_timesteps:
        raise ValueError(f"config.sampling.num_steps={config.sampling.num_steps} must be in 1..{d.num_timesteps}")
    for key in ("training.batch_size", "training.num_steps", "training.log_every", "training.checkpoint_every",
                "sharding.fsdp", "diffusion.num_timesteps", "training.keep_checkpoints", "training.eval_batches",
                "sampling.images_per_prompt", "text.max_length"):
        section, name = key.split(".")
        if int(config[section][name]) < 1:
            raise ValueError(f"config.{key}={config[section][name]} must be a positive integer")
    for key in ("training.eval_every", "training.sample_every", "optim.warmup_steps", "optim.grad_clip_norm",
                "optim.weight_decay", "optim.learning_rate", "training.max_consecutive_skips",
                "training.loss_spike_sigma"):
        section, name = key.split(".")
        if config[section][name] < 0:
            raise ValueError(f"config.{key}={config[section][name]} must be >= 0")
    name = config.model.name
    choice("model.name", name, tuple(factory.NETWORKS))
    net = _network_config(config.model)
    size = int(config.data.image_size or 0)
    if config.model.pretrained and config.model.autoencoder:
        raise ValueError("config.model.pretrained brings its own autoencoder: leave config.model.autoencoder empty")
    if config.model.pretrained or config.model.autoencoder:
        pass  # the sizes are the loaded model's: the Trainer checks them once it has read the folder
    elif size and size % net.size_multiple:
        what = (f"the DiT's patch size (config.model.dit.patch_size)" if name == "dit" else
                f"the U-Net's downsampling (config.model.unet.channel_mult has {net.num_levels} levels)")
        raise ValueError(f"config.data.image_size={size} is not a multiple of {net.size_multiple}, {what}")
    if not (config.model.pretrained or config.model.autoencoder) and config.data.channels and \
            net.in_channels != config.data.channels:
        raise ValueError(f"config.model.{name}.in_channels={net.in_channels} does not match "
                         f"config.data.channels={config.data.channels}")
    if not 0.0 <= config.ema.decay < 1.0:
        raise ValueError(f"config.ema.decay={config.ema.decay} must be in [0, 1)")
    if config.ema.sigma_rel:
        posthoc_ema.check_sigma_rel(config.ema.sigma_rel, "config.ema.sigma_rel")
    if config.ema.snapshot_every < 0:
        raise ValueError(f"config.ema.snapshot_every={config.ema.snapshot_every} must be >= 0 (0: no snapshots)")
    validate_data_config(config.data)


def _network_config(model_config):
    """The denoiser's config class (UNetConfig or DiTConfig) built from ``config.model``, to check its fields
    before anything runs (the text encoder's width stands in for an unset context_dim)."""
    name = model_config.name
    fields = {k: v for k, v in dict(model_config[name]).items() if k != "preset"}
    fields["context_dim"] = fields.get("context_dim") or 8
    _, cls, _ = factory.NETWORKS[name]
    try:
        cls.preset(model_config[name].get("preset"))
    except ValueError as e:
        raise ValueError(f"config.model.{name}.preset={model_config[name].get('preset')!r}: {e}") from None
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"config.model.{name}: unknown field(s) {', '.join(unknown)}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.model.{name}: {' '.join(str(e).split())}") from None


def load_config(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """``get_config()`` of the config file at ``path``, then each ``"section.key=value"`` override applied.

    A value is read as a Python literal when it is one (``3e-3``, ``(2,)``, ``False``), else as a string
    (``eps``); an int given for a float key becomes a float. An unknown key raises a one-line ValueError."""
    spec = importlib.util.spec_from_file_location("config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        key, sep, text = item.partition("=")
        *path_keys, name = key.split(".")
        section = config
        for part in path_keys:
            section = section.get(part) if isinstance(section, ml_collections.ConfigDict) else None
        if not sep or not isinstance(section, ml_collections.ConfigDict) or name not in section:
            raise ValueError(f"override {item!r}: expected KEY=VALUE with a key of the config, e.g. "
                             f"training.batch_size=32")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(section[name], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        section[name] = value
    return config
