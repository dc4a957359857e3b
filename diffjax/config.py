"""The experiment schema: every key of a diffjax experiment with its default and a one-line comment
(:func:`get_config`), :func:`validate` (a one-line error naming the first unknown key or bad value),
:func:`load_config` (a recipe file with ``KEY=VALUE`` overrides) and :func:`sampling_defaults` (``config.sampling``
as Text2Image's keyword defaults).

Recipes (experiments/configs/: fashion_mnist.py, tiny.py, cifar10.py, text_to_image_folder.py, ...) start from
``get_config()`` here and override a few keys; any key can be overridden on the command line:
``--config.training.batch_size=64``. A key that is not here fails at start, naming the key. The ``data`` section's
keys and checks are the input pipeline's (:func:`diffjax.data.default_data_config`, :func:`validate_data_config`).
"""

import ast
import dataclasses
import importlib.util
from typing import Iterable, Mapping

import ml_collections

from diffjax import guidance, losses, posthoc_ema, samplers, schedules
from diffjax.data import default_data_config, validate_data_config
from diffjax.models import factory
from diffjax.models.alignment import heads_from_config


def unet_config(preset: str = "small", **overrides) -> ml_collections.ConfigDict:
    """All UNetConfig fields of a preset (so each can be overridden by flag, tuples as
    ``--config.model.unet.channel_mult='(1,2,2)'``), plus the preset's name; context_dim and pooled_dim are
    filled from the text encoder when None (``diffjax.build.denoiser_config``)."""
    return ml_collections.ConfigDict(factory.denoiser_config_fields("unet", preset, **overrides), type_safe=False)


def dit_config(preset: str = "fashion_mnist", **overrides) -> ml_collections.ConfigDict:
    """All DiTConfig fields of a preset (``diffjax.models.dit.DIT_PRESETS``) plus its name, as unet_config."""
    return ml_collections.ConfigDict(factory.denoiser_config_fields("dit", preset, **overrides), type_safe=False)


def get_config() -> ml_collections.ConfigDict:
    """Every key of an experiment with its default: what recipes start from and :func:`validate` checks against."""
    # One piece: the schema, read top to bottom, every key with its default and comment.
    config = ml_collections.ConfigDict()
    config.seed = 0  # seeds parameters, the data order and the diffusion noise

    config.data = default_data_config()  # input pipeline (diffjax.data.default_data_config)

    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"  # the denoiser: unet (config.model.unet) | dit (config.model.dit)
    # The denoisers' architectures: every field of a preset (.preset records which; to start from another preset
    # build the section with unet_config(NAME) / dit_config(NAME) in a config file), each overridable by flag.
    config.model.unet = unet_config("small")  # U-Net: diffjax.models.unet.UNetConfig
    config.model.dit = dit_config("fashion_mnist")  # DiT: diffjax.models.dit.DiTConfig
    config.model.use_pooled_text = True  # add the pooled text embedding to the timestep embedding
    # Fine-tuning: a diffjax model folder, or a diffusers pipeline folder / Hub id, whose networks (denoiser, text
    # encoder, autoencoder), schedule and weights the run starts from ("" = train the networks above from scratch).
    config.model.pretrained = ""
    # Latent diffusion from scratch: the model folder / diffusers pipeline whose frozen autoencoder (vae/) encodes
    # the images; the denoiser's in_channels must be its latent channels ("" = diffusion on pixels).
    config.model.autoencoder = ""

    config.text = ml_collections.ConfigDict()
    config.text.encoder = "tiny"  # TextEncoder size (from_config) or, with pretrained, a hub id / local dir
    config.text.pretrained = False  # load config.text.encoder with from_pretrained
    config.text.trainable = True  # train the text encoder jointly (LDM) rather than freezing it
    config.text.max_length = 77  # tokens per prompt (CLIP: 77)

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.schedule = "cosine"  # linear | scaled_linear | cosine | sigmoid
    config.diffusion.num_timesteps = 1000  # T
    config.diffusion.rescale_to_zero_snr = False  # Lin et al. 2023 (use with prediction_type="v")
    config.diffusion.prediction_type = "eps"  # eps | x0 | v
    config.diffusion.loss_weighting = "min_snr"  # none | min_snr | p2
    config.diffusion.min_snr_gamma = 5.0  # γ of Min-SNR-γ
    config.diffusion.p2_gamma = 1.0  # γ of P2 weighting
    config.diffusion.p2_k = 1.0  # k of P2 weighting
    config.diffusion.cond_drop_prob = 0.1  # fraction of prompts replaced by "" (classifier-free guidance)
    config.diffusion.timestep_sampling = "uniform"  # uniform | log_normal (EDM: ln σ ~ N(mean, std²)) in training
    config.diffusion.log_normal_mean = -1.2  # P_mean of the log-normal noise levels
    config.diffusion.log_normal_std = 1.2  # P_std of the log-normal noise levels

    # The image–text alignment term (diffjax.models.alignment): L = denoising + weight · mean w(t) ℓ(g_img(x̂0), g_txt(c))
    config.alignment = ml_collections.ConfigDict()
    config.alignment.weight = 0.0  # λ (0: off: no heads, the train step as without it)
    config.alignment.loss = "contrastive"  # contrastive (CLIP's symmetric InfoNCE over the batch) | cosine (1 - cos)
    config.alignment.weighting = "alpha_cumprod"  # w(t): alpha_cumprod (ᾱ_t: ~0 where x0 is unrecoverable) | none
    # The contrastive term's positives besides each pair itself: prompt (examples with identical prompts) | label
    # (examples of the same class: labelled datasets; the wording of a caption is then no negative) | none
    config.alignment.positives = "prompt"
    config.alignment.channels = (32, 64, 64)  # the image head: one stride-2 3×3 convolution per entry
    config.alignment.embed_dim = 64  # width of the joint image–text embedding
    config.alignment.init_temperature = 0.07  # initial temperature of the contrastive logits (learned)
    config.alignment.guidance_scale = 0.0  # sampling: alignment guidance scale (0: off; the heads' or a CLIP's)
    config.alignment.clip_model = ""  # sampling: a FlaxCLIPModel dir / hub id to guide with instead of the heads

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 2e-4  # peak learning rate
    config.optim.warmup_steps = 500  # linear warmup from 0
    config.optim.lr_schedule = "cosine"  # constant | cosine (decay to end_lr_factor at training.num_steps)
    config.optim.end_lr_factor = 0.1  # final learning rate / peak for the cosine schedule
    config.optim.b1 = 0.9  # Adam β1
    config.optim.b2 = 0.999  # Adam β2
    config.optim.eps = 1e-8  # Adam ε
    config.optim.weight_decay = 0.0  # AdamW decoupled weight decay
    config.optim.grad_clip_norm = 1.0  # clip gradients to this global norm (0: off)

    config.ema = ml_collections.ConfigDict()
    config.ema.decay = 0.9995  # EMA decay of the parameters used for sampling and evaluation
    config.ema.warmup = True  # decay_t = min(decay, (1 + t) / (10 + t))
    # > 0: a power-function EMA of this relative width instead (Karras et al. 2024; diffjax.posthoc_ema): an
    # average over the last fraction of training whatever its length; decay and warmup are then unused.
    config.ema.sigma_rel = 0.0
    # > 0: every this many steps save the parameters and their EMA into WORKDIR/ema_snapshots, from which
    # --mode=eval/sample/export --ema_sigma_rel=S builds the power-function EMA of any width S after training.
    config.ema.snapshot_every = 0

    config.training = ml_collections.ConfigDict()
    config.training.batch_size = 64  # global batch size (all devices and processes)
    config.training.num_steps = 10_000  # total optimizer steps
    config.training.log_every = 50  # steps between metric writes
    config.training.eval_every = 1000  # steps between held-out loss evaluations (0: off)
    config.training.eval_batches = 4  # batches per evaluation
    config.training.sample_every = 1000  # steps between sample grids (0: off); also at the end
    config.training.checkpoint_every = 1000  # steps between checkpoints; also at the end
    config.training.keep_checkpoints = 3  # checkpoints kept on disk (and the newest, until a later update confirms it)
    config.training.on_corrupt_checkpoint = "fallback"  # unreadable newest checkpoint: fallback (move it aside, resume from the previous) | fail
    config.training.progress_bar = True  # tqdm progress bar on process 0
    config.training.on_nonfinite = "skip"  # a NaN/inf loss or gradient: skip that update | stop the run
    config.training.max_consecutive_skips = 25  # stop after this many skipped updates in a row (0: never)
    config.training.loss_spike_sigma = 0.0  # also skip updates whose loss exceeds the running mean by this many σ (0: off)

    config.sharding = ml_collections.ConfigDict()
    config.sharding.fsdp = 1  # size of the mesh's fsdp axis (parameter sharding); data axis = devices / fsdp

    config.sampling = ml_collections.ConfigDict()
    config.sampling.sampler = "dpmpp_2m"  # ddpm | ddim | dpmpp_2m | euler | heun
    config.sampling.num_steps = 25  # sampler steps
    config.sampling.guidance_scale = 3.0  # classifier-free guidance scale w
    config.sampling.timestep_spacing = "trailing"  # leading | trailing | linspace
    config.sampling.guidance_schedule = "constant"  # constant | linear | cosine: w over the timesteps, mean w
    config.sampling.guidance_interval = ""  # "sigma_lo,sigma_hi": guide only there (Kynkäänniemi 2024); "" = always
    config.sampling.prompts = ""  # '|'-separated prompts for sample grids ("" = one per class of the data)
    config.sampling.images_per_prompt = 4  # columns of the sample grid

    config.evaluation = ml_collections.ConfigDict()  # --mode=eval (labelled datasets)
    config.evaluation.classifier_workdir = "runs/fashion_mnist_classifier"  # feature network (--mode=train_classifier)
    config.evaluation.images_per_class = 50  # images generated per class (prompts cycle the caption templates)
    config.evaluation.batch_size = 100  # images generated per compiled call (a multiple of the device count)
    config.evaluation.use_ema = True  # evaluate the EMA parameters
    config.evaluation.inception_weights = ""  # pytorch-fid pt_inception-2015-12-05 .pth file: also report FID
    config.evaluation.clip_model = ""  # local dir or hub id of a CLIP model: also report the CLIP score
    config.evaluation.prompt_templates = ()  # wordings ("{}" = the class) instead of data.caption_templates
    return config



def _flat_keys(cfg, prefix=""):
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _flat_keys(value, name + ".")
        else:
            yield name


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise a one-line ValueError naming the first unknown key or bad value. Every network section of
    ``config.model`` is checked, the one ``config.model.name`` picks and the others alike."""
    known = set(_flat_keys(get_config()))
    for key in _flat_keys(config):
        if key not in known:
            raise ValueError(f"unknown config key {key!r} (see diffjax/config.py)")
    for key in known - set(_flat_keys(config)):
        raise ValueError(f"config key {key!r} is missing (start experiment configs from diffjax.config.get_config())")

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
    guidance.check_guidance_interval(config.sampling.guidance_interval, "config.sampling.guidance_interval")
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
    choice("model.name", name, tuple(factory.DENOISERS))
    net = _network_config(config.model, name)
    for other in factory.DENOISERS:  # the sections not chosen are checked too: a later --config.model.name uses them
        if other != name and other in config.model:
            _network_config(config.model, other)
    size = int(config.data.image_size or 0)
    if config.model.pretrained and config.model.autoencoder:
        raise ValueError("config.model.pretrained brings its own autoencoder: leave config.model.autoencoder empty")
    if config.model.pretrained or config.model.autoencoder:
        pass  # the sizes are the loaded model's: the Trainer checks them once it has read the folder
    elif size and size % net.size_multiple:
        what = ("the DiT's patch size (config.model.dit.patch_size)" if name == "dit" else
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


def _network_config(model_config, name: str):
    """Network ``name``'s config class (UNetConfig or DiTConfig) built from its section of ``config.model``, to check
    its fields before anything runs (the text encoder's width stands in for an unset context_dim)."""
    fields = {k: v for k, v in dict(model_config[name]).items() if k != "preset"}
    fields["context_dim"] = fields.get("context_dim") or 8
    _, cls, _ = factory.DENOISERS[name]
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


# config.sampling's keys that are Text2Image keywords of the same name (prompts and images_per_prompt are the
# training run's sample grids', not the pipeline's).
SAMPLING_KEYWORDS = ("sampler", "num_steps", "guidance_scale", "timestep_spacing", "guidance_schedule",
                     "guidance_interval")


def sampling_defaults(sampling: Mapping, alignment_guidance_scale=None, where: str = "config.sampling.") -> dict:
    """Text2Image's keyword defaults (its constructor's, or any call's) from a ``config.sampling`` section:
    its :data:`SAMPLING_KEYWORDS`, the guidance interval as (σ_lo, σ_hi) or None (a one-line ValueError naming
    ``where`` + ``guidance_interval`` otherwise), and ``alignment_guidance_scale`` (``config.alignment``'s) when
    given. Keys that are absent or None are left out, so that Text2Image's own defaults stand: a run's config from
    before a key existed, or the command line's flags (``where="--"``), of which only those given count."""
    kw = {k: sampling[k] for k in SAMPLING_KEYWORDS if sampling.get(k) is not None}
    if "guidance_interval" in kw:
        kw["guidance_interval"] = guidance.check_guidance_interval(kw["guidance_interval"],
                                                                   f"{where}guidance_interval")
    if alignment_guidance_scale is not None:
        kw["alignment_guidance_scale"] = alignment_guidance_scale
    return kw
