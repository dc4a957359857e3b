"""The one place where an experiment config becomes networks and starting parameters.

:func:`models_from_config` reads ``config.model``, ``config.text``, ``config.diffusion`` and ``config.alignment``
and returns a :class:`Start`: the :class:`~diffjax.models.factory.Models` (networks, text encoder, schedule) and
the parameters that do not come from a fresh initialisation of the denoiser:

* from scratch: a random or pretrained text encoder's (``{"text": ...}``), and with ``config.model.autoencoder``
  (latent diffusion) the frozen autoencoder's (``"vae"``) from a diffjax model folder or a diffusers pipeline;
* with ``config.model.pretrained`` (a model folder or diffusers pipeline to fine-tune): every network and its
  parameters come from there, their compute settings (:data:`RUNTIME_FIELDS`) from ``config.model.<name>``.

The training run (``diffjax.train.Trainer``) and sampling from a training checkpoint
(``Text2Image.from_checkpoint``) both build their models here; a saved model folder needs no experiment config
(``diffjax.model_folder.load``). The structure follows score_sde's ``models/utils.py``: one config → model file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import NamedTuple, Optional

import jax

from diffjax import diffusers_format, model_folder
from diffjax.models import factory
from diffjax.models.alignment import heads_from_config
from diffjax.models.autoencoder import AutoencoderKL
from diffjax.text import TextEncoder

# The fields of a network config that change how it computes, not its parameters: with config.model.pretrained
# they come from the config's section of that network.
RUNTIME_FIELDS = ("dtype", "remat", "remat_policy", "attention_impl", "conv_impl")


class Start(NamedTuple):
    """What an experiment starts from: its models, and the parameters that a fresh initialisation does not give
    (``{"text"[, "vae"]}``, or every component's with ``config.model.pretrained``; ``{}`` when built without
    parameters)."""

    models: factory.Models
    params: dict


def denoiser_config(name: str, fields, text_hidden_size: int, use_pooled: bool):
    """The config of the denoiser ``name`` (``"unet"``: ``UNetConfig``, ``"dit"``: ``DiTConfig``) from its section of
    ``config.model`` (see ``factory.denoiser_config_fields``), for a text encoder of width ``text_hidden_size``:
    cross-attention on its states, and its pooled embedding when ``use_pooled``."""
    _, cls, _ = factory.denoiser_class(name)
    fields = {k: v for k, v in dict(fields).items() if k != "preset"}
    context_dim = fields.get("context_dim") or text_hidden_size
    if context_dim != text_hidden_size:
        raise ValueError(f"config.model.{name}.context_dim={context_dim} does not match the text encoder's "
                         f"hidden size {text_hidden_size}")
    fields.update(context_dim=context_dim, pooled_dim=text_hidden_size if use_pooled else None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"config.model.{name}: unknown field(s) {', '.join(unknown)}")
    return cls(**fields)


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


def scheduler_config(diffusion_config) -> factory.SchedulerConfig:
    """The ``SchedulerConfig`` of ``config.diffusion``."""
    dc = diffusion_config
    return factory.SchedulerConfig(schedule=dc.schedule, num_timesteps=int(dc.num_timesteps),
                                   rescale_to_zero_snr=bool(dc.rescale_to_zero_snr),
                                   prediction_type=dc.prediction_type)


def load_pretrained(path: str, with_params: bool = True) -> tuple[factory.Models, dict, tuple, dict]:
    """``model_folder.load`` of a diffjax model folder, or ``diffusers_format.load_diffusers`` of a diffusers
    pipeline folder or Hugging Face Hub id: (models, numpy parameters, image shape, sampling defaults)."""
    if model_folder.is_model_folder(os.path.expanduser(path)):
        return model_folder.load(os.path.expanduser(path), with_params=with_params)
    return diffusers_format.load_diffusers(path, with_params=with_params)


def load_autoencoder(path: str, with_params: bool = True) -> tuple[AutoencoderKL, Optional[dict]]:
    """(AutoencoderKL computing in float32, numpy float32 parameters or None) of the ``vae/`` of a diffjax model
    folder or a diffusers pipeline (folder or Hub id)."""
    directory = os.path.expanduser(path)
    if model_folder.is_model_folder(directory):
        return model_folder.load_vae(directory, with_params)
    cfg, params = diffusers_format.load_diffusers_vae(path, with_params=with_params)
    return AutoencoderKL(cfg), params


def _log_ignored_schedule(config, models) -> None:
    """A fine-tuned model keeps its own schedule and prediction type: say which config.diffusion keys differ."""
    keys = ("schedule", "num_timesteps", "rescale_to_zero_snr", "prediction_type")
    wanted = dataclasses.asdict(scheduler_config(config.diffusion))
    differ = [f"{k}={wanted[k]!r}" for k in keys if wanted[k] != getattr(models.scheduler, k)]
    if differ:
        logging.warning("config.model.pretrained=%s keeps its own schedule (%s): config.diffusion.%s ignored",
                        config.model.pretrained, ", ".join(f"{k}={getattr(models.scheduler, k)!r}" for k in keys),
                        ", config.diffusion.".join(differ))


def _fine_tune(config, with_params: bool) -> Start:
    """config.model.pretrained: the folder's architecture, the config's compute settings."""
    models, params, _, _ = load_pretrained(config.model.pretrained, with_params)
    _log_ignored_schedule(config, models)
    # Parameters are trained in float32 whatever the folder holds (a bfloat16 export's would lose most small
    # updates).
    section = config.model.get(models.name, {})
    runtime = {k: section[k] for k in RUNTIME_FIELDS if k in section}
    denoiser = type(models.denoiser)(models.denoiser_config.replace(**runtime, param_dtype="float32"))
    encoder = models.text_encoder.replace(trainable=config.text.trainable, dtype=jax.numpy.float32)
    vae = None if models.autoencoder is None else factory.in_dtype(models.autoencoder, "float32")
    # Alignment heads: the folder's (and their parameters) when it has them, else fresh ones of config.alignment;
    # none when config.alignment.weight is 0.
    heads = heads_from_config(config.get("alignment"), models.in_channels, encoder.hidden_size)
    if heads is not None and models.alignment is not None:
        heads = models.alignment
    else:
        params.pop(model_folder.ALIGNMENT, None)
    return Start(dataclasses.replace(models, denoiser=denoiser, text_encoder=encoder, autoencoder=vae,
                                     alignment=heads), factory.cast_floating(params, "float32"))


def models_from_config(config, with_params: bool = True) -> Start:
    """The :class:`Start` of an experiment config (see the module docstring); ``with_params=False`` reads configs
    only (params ``{}``, no weights loaded or initialised)."""
    mc = config.model
    if mc.get("pretrained"):
        return _fine_tune(config, with_params)
    name = mc.get("name", "unet")
    net_cls, _, _ = factory.denoiser_class(name)
    encoder, text_params = text_encoder(config.text, seed=config.seed, with_params=with_params)
    ncfg = denoiser_config(name, mc[name], encoder.hidden_size, bool(mc.use_pooled_text))
    heads = heads_from_config(config.get("alignment"), ncfg.in_channels, encoder.hidden_size)
    models = factory.Models(net_cls(ncfg), encoder, scheduler_config(config.diffusion), alignment=heads)
    params = {"text": text_params} if with_params else {}
    if mc.get("autoencoder"):
        vae, vae_params = load_autoencoder(mc.autoencoder, with_params)
        if vae.config.latent_channels != models.in_channels:
            raise ValueError(f"config.model.autoencoder {mc.autoencoder}: latent_channels="
                             f"{vae.config.latent_channels}, but config.model.{name}.in_channels="
                             f"{models.in_channels}")
        models = dataclasses.replace(models, autoencoder=vae)
        if with_params:
            params["vae"] = vae_params
    return Start(models, params)
