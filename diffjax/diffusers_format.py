"""The diffusers format: its weights → diffjax parameter trees, and a diffusers pipeline folder → a diffjax model.

A diffusers Stable Diffusion folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``; weights as safetensors or PyTorch ``.bin``) becomes:

* ``unet/``: :func:`unet_config_from_diffusers` (``UNet2DConditionModel``'s config.json → :class:`UNetConfig`) and
  :func:`unet_params_from_diffusers` (its state dict → the U-Net's parameter tree);
* ``vae/``: :func:`vae_config_from_diffusers` and :func:`vae_params_from_diffusers` (``AutoencoderKL``);
* ``text_encoder/`` + ``tokenizer/``: loaded by transformers' ``FlaxCLIPTextModel`` (which reads PyTorch-format
  safetensors without torch) into ``diffjax.text.TextEncoder``;
* ``scheduler/``: :func:`scheduler_from_diffusers`: the β schedule, prediction type and zero-SNR option, and the
  sampling defaults (timestep spacing, steps offset, DDIM's final ᾱ).

Every tensor of a state dict is mapped and every parameter of the target tree filled, with its shape checked:
a key that maps nowhere, a parameter that nothing fills, or a shape mismatch raises one ``ConversionError`` line
naming the key and both shapes; nothing is written before the whole conversion succeeded
(``Text2Image.from_diffusers`` / ``--mode=convert``).

Layouts: convolution kernels OIHW → HWIO, linear weights (out, in) → (in, out) (a 1×1 convolution used as a
projection becomes a Dense kernel), norm ``weight`` → ``scale``; diffusers' GEGLU projection (one Linear of
twice the width: value, then gate) becomes the two Dense layers ``proj_value`` / ``proj_gate``; its up-blocks
count from the lowest resolution, diffjax's ``up_{level}`` from the highest.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Callable, Optional

import jax
import numpy as np
from safetensors.numpy import load_file

from diffjax.models.autoencoder import AutoencoderKL, VAEConfig
from diffjax.models.factory import Models, SchedulerConfig
from diffjax.models.unet import UNet, UNetConfig, dummy_inputs
from diffjax.text import TextEncoder


class ConversionError(ValueError):
    """A diffusers model that does not convert: the message names the key, the file and the shapes."""


# ------------------------------------------------------------------------------------------------------
# Reading weights.
# ------------------------------------------------------------------------------------------------------

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                 "pytorch_model.bin")


def read_state_dict(directory: str) -> tuple[dict[str, np.ndarray], str]:
    """(name → float32 numpy array, the file read) of a diffusers/transformers component directory: safetensors
    read with numpy (no torch); a PyTorch ``.bin`` needs torch. Sharded safetensors (an ``.index.json``) are
    read shard by shard."""
    for name in _WEIGHT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            if name.endswith(".safetensors"):
                try:
                    return {k: _as_float32(v) for k, v in load_file(path).items()}, path
                except Exception as e:
                    raise ConversionError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})")
            try:
                import torch  # optional: only a PyTorch .bin needs it
            except ImportError:
                raise ConversionError(f"{path} is a PyTorch file: reading it needs torch (pip install torch), or "
                                      f"convert it to safetensors") from None
            state = torch.load(path, map_location="cpu", weights_only=True)
            return {k: v.detach().float().numpy() for k, v in state.items()}, path
        sharded = os.path.join(directory, name + ".index.json")
        if name.endswith(".safetensors") and os.path.isfile(sharded):
            with open(sharded) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in files:
                state.update({k: _as_float32(v) for k, v in load_file(os.path.join(directory, shard)).items()})
            return state, sharded
    raise ConversionError(f"{directory} has no weights (none of {', '.join(_WEIGHT_FILES)})")


def _as_float32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32) if x.dtype != np.float32 else x


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{directory} has no config.json")
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------------
# State dict → parameter tree.
# ------------------------------------------------------------------------------------------------------


def _flat_paths(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) or hasattr(value, "items"):
            out.update(_flat_paths(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _leaf(module: tuple, torch_leaf: str, array: np.ndarray, want: dict, key: str, source: str):
    """(diffjax path, array) of one torch tensor of a module, laid out for the diffjax parameter there."""
    if torch_leaf == "bias":
        return module + ("bias",), array
    if torch_leaf != "weight":
        raise ConversionError(f"{source}: {key}: no diffjax parameter corresponds to {torch_leaf!r}")
    if module + ("kernel",) in want:
        target = want[module + ("kernel",)]
        if array.ndim == 4 and len(target.shape) == 4:
            return module + ("kernel",), array.transpose(2, 3, 1, 0)  # OIHW → HWIO
        if array.ndim == 4 and array.shape[2:] == (1, 1) and len(target.shape) == 2:
            return module + ("kernel",), array[:, :, 0, 0].T  # a 1×1 convolution as a Dense layer
        if array.ndim == 2:
            return module + ("kernel",), array.T  # (out, in) → (in, out)
    if module + ("scale",) in want and array.ndim == 1:
        return module + ("scale",), array
    if module + ("embedding",) in want and array.ndim == 2:
        return module + ("embedding",), array
    raise ConversionError(f"{source}: {key} {tuple(array.shape)} has no counterpart under "
                          f"{'/'.join(module) or 'the root'} of the diffjax model")


def convert_state_dict(state: dict[str, np.ndarray], abstract: Any, rename: Callable[[str], Optional[tuple]],
                       source: str, special: Optional[Callable] = None) -> dict:
    """The diffjax parameter tree (numpy) of ``state`` for a model whose parameters have the shapes of ``abstract``.

    ``rename(torch_module_path) -> diffjax module path`` (None: unknown). ``special(key, array, want)`` may
    return a list of (path, array) for tensors that are not a one-to-one rename (GEGLU's split projection)."""
    want = {path: leaf for path, leaf in _flat_paths(abstract).items()}
    tree: dict = {}
    filled: dict[tuple, str] = {}
    for key in sorted(state):
        array = state[key]
        pieces = special(key, array, want) if special is not None else None
        if pieces is None:
            module_key, _, torch_leaf = key.rpartition(".")
            module = rename(module_key)
            if module is None:
                raise ConversionError(f"{source}: unknown key {key} {tuple(array.shape)}: not part of the "
                                      f"architecture diffjax converts")
            pieces = [_leaf(module, torch_leaf, array, want, key, source)]
        for path, value in pieces:
            if path not in want:
                raise ConversionError(f"{source}: {key} maps to {'/'.join(path)}, which the diffjax model lacks")
            if path in filled:
                raise ConversionError(f"{source}: {key} and {filled[path]} both map to {'/'.join(path)}")
            if tuple(value.shape) != tuple(want[path].shape):
                raise ConversionError(f"{source}: {key} has shape {tuple(array.shape)} → {tuple(value.shape)}, but "
                                      f"{'/'.join(path)} has shape {tuple(want[path].shape)}")
            _set(tree, path, np.ascontiguousarray(value, np.float32))
            filled[path] = key
    missing = sorted("/".join(p) for p in want if p not in filled)
    if missing:
        raise ConversionError(f"{source}: nothing fills the diffjax parameter(s) {', '.join(missing[:3])}"
                              + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""))
    return tree


def _rules(pairs: list[tuple[str, Any]]) -> Callable[[str], Optional[tuple]]:
    compiled = [(re.compile(pattern + r"$"), target) for pattern, target in pairs]

    def rename(module: str) -> Optional[tuple]:
        for pattern, target in compiled:
            m = pattern.match(module)
            if m:
                out = target(m) if callable(target) else m.expand(target)
                return tuple(part for part in out.split("/") if part)
        return None

    return rename


# ------------------------------------------------------------------------------------------------------
# The autoencoder.
# ------------------------------------------------------------------------------------------------------

_VAE_ATTN = r"(?:\.(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn))"
_VAE_ATTN_NAMES = {"group_norm": "group_norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out",
                   "query": "q", "key": "k", "value": "v", "proj_attn": "out"}
_VAE_RULES = _rules([
    (r"(encoder|decoder)\.(conv_in|conv_out)", r"\1/\2"),
    (r"(encoder|decoder)\.conv_norm_out", r"\1/norm_out"),
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut|nin_shortcut)",
     lambda m: f"encoder/down_{m[1]}_res_{m[2]}/{'conv_shortcut' if m[3] == 'nin_shortcut' else m[3]}"),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", r"encoder/down_\1_downsample"),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut|nin_shortcut)",
     lambda m: f"decoder/up_{m[1]}_res_{m[2]}/{'conv_shortcut' if m[3] == 'nin_shortcut' else m[3]}"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", r"decoder/up_\1_upsample"),
    (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(norm1|conv1|norm2|conv2|conv_shortcut)", r"\1/mid_res_\2/\3"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0" + _VAE_ATTN,
     lambda m: f"{m[1]}/mid_attn/{_VAE_ATTN_NAMES[m[2]]}"),
    (r"(quant_conv|post_quant_conv)", r"\1"),
])


def vae_config_from_diffusers(config: dict, source: str = "vae/config.json") -> VAEConfig:
    """:class:`VAEConfig` of a diffusers ``AutoencoderKL`` config; an architecture diffjax does not have raises
    ConversionError naming the key."""
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ConversionError(f"{source}: _class_name {cls!r}: only AutoencoderKL converts")
    for key, allowed in (("down_block_types", ("DownEncoderBlock2D",)), ("up_block_types", ("UpDecoderBlock2D",)),
                         ("act_fn", "silu")):
        value = config.get(key)
        if value is None:
            continue
        ok = value == allowed if isinstance(allowed, str) else all(v in allowed for v in value)
        if not ok:
            raise ConversionError(f"{source}: {key}={value!r} is not an architecture diffjax converts")
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise ConversionError(f"{source}: {key} is set: per-channel latent statistics are not supported")
    return VAEConfig(
        in_channels=int(config.get("in_channels", 3)), out_channels=int(config.get("out_channels", 3)),
        latent_channels=int(config.get("latent_channels", 4)),
        block_out_channels=tuple(config.get("block_out_channels", (64,))),
        layers_per_block=int(config.get("layers_per_block", 1)), norm_num_groups=int(config.get("norm_num_groups", 32)),
        mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
        use_quant_conv=bool(config.get("use_quant_conv", True)),
        use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
        scaling_factor=float(config.get("scaling_factor", 0.18215)),
        shift_factor=None if config.get("shift_factor") is None else float(config["shift_factor"]))


def vae_params_from_diffusers(state: dict[str, np.ndarray], config: VAEConfig, source: str = "vae") -> dict:
    """The :class:`AutoencoderKL` parameter tree of a diffusers ``AutoencoderKL`` state dict."""
    size = config.downsample_factor
    abstract = jax.eval_shape(
        lambda k: AutoencoderKL(config).init(k, jax.numpy.zeros((1, size, size, config.in_channels)))["params"],
        jax.random.key(0))
    return convert_state_dict(state, abstract, _VAE_RULES, source)


# ------------------------------------------------------------------------------------------------------
# The U-Net.
# ------------------------------------------------------------------------------------------------------

_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_UNSUPPORTED_UNET = {  # config key: the value (or values) diffjax's U-Net has
    "center_input_sample": (False,), "class_embed_type": (None,), "addition_embed_type": (None,),
    "time_embedding_type": ("positional",), "act_fn": ("silu",), "dual_cross_attention": (False,),
    "only_cross_attention": (False,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "encoder_hid_dim": (None,), "num_class_embeds": (None,), "projection_class_embeddings_input_dim": (None,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "resnet_skip_time_act": (False,), "timestep_post_act": (None,),
    "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,), "time_embedding_act_fn": (None,), "attention_type": ("default",),
    "reverse_transformer_layers_per_block": (None,), "resnet_out_scale_factor": (1.0, 1), "addition_time_embed_dim": (None,),
}


def _per_level(value, levels: int, key: str, source: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise ConversionError(f"{source}: {key}={value!r} does not have one entry per level ({levels})")
    return values


def unet_config_from_diffusers(config: dict, source: str = "unet/config.json") -> UNetConfig:
    """:class:`UNetConfig` of a diffusers ``UNet2DConditionModel`` config (Stable Diffusion 1.x / 2.x style).

    diffusers' legacy ``attention_head_dim`` is the number of heads when ``num_attention_heads`` is not set; the
    heads must be constant over the levels or have a constant width (SD 2.x: 5/10/20/20 heads of 64). The
    numerics follow diffusers: exact GELU in the GEGLU, GroupNorm ε = 1e-6 in the spatial transformers, and
    cross-attention over every text token, padding included (``use_text_mask=False``)."""
    cls = config.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        raise ConversionError(f"{source}: _class_name {cls!r}: only UNet2DConditionModel converts")
    for key, allowed in _UNSUPPORTED_UNET.items():
        if key in config and config[key] not in allowed:
            raise ConversionError(f"{source}: {key}={config[key]!r} is not an architecture diffjax converts "
                                  f"(supported: {allowed[0]!r})")
    widths = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(widths)
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    unknown = [t for t in down if t not in _DOWN_TYPES] + [t for t in up if t not in _UP_TYPES]
    if unknown or len(down) != levels or len(up) != levels:
        raise ConversionError(f"{source}: down_block_types={down!r}, up_block_types={up!r}: expected {levels} of "
                              f"{', '.join(_DOWN_TYPES)} and their mirror images")
    attention = [_DOWN_TYPES[t] for t in down]
    if [_UP_TYPES[t] for t in reversed(up)] != attention:
        raise ConversionError(f"{source}: up_block_types={up!r} do not mirror down_block_types={down!r}")
    base = widths[0]
    if any(w % base for w in widths):
        raise ConversionError(f"{source}: block_out_channels={widths} are not multiples of the first")
    heads_key = "num_attention_heads" if config.get("num_attention_heads") is not None else "attention_head_dim"
    heads = _per_level(config.get(heads_key, 8), levels, heads_key, source)
    depth = set(_per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block",
                           source))
    cross = _per_level(config.get("cross_attention_dim", 1280), levels, "cross_attention_dim", source)
    if len(depth) != 1 or len(set(cross)) != 1:
        raise ConversionError(f"{source}: transformer_layers_per_block / cross_attention_dim differ across levels "
                              f"({config.get('transformer_layers_per_block')!r}, {config.get('cross_attention_dim')!r})")
    used = [i for i in range(levels) if attention[i]] + [levels - 1]  # the middle block attends too
    if len({heads[i] for i in used}) == 1:
        num_heads, head_dim = int(heads[used[0]]), None
    elif len({widths[i] // heads[i] for i in used}) == 1:
        num_heads, head_dim = None, int(widths[used[0]] // heads[used[0]])
    else:
        raise ConversionError(f"{source}: {heads_key}={config.get(heads_key)!r}: neither the heads nor their width "
                              f"are constant over the levels")
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ConversionError(f"{source}: resnet_time_scale_shift={shift!r} is not supported")
    return UNetConfig(
        in_channels=int(config.get("in_channels", 4)), out_channels=int(config.get("out_channels", 4)),
        channels=base, channel_mult=tuple(w // base for w in widths),
        num_res_blocks=int(config.get("layers_per_block", 2)),
        attention_levels=tuple(i for i in range(levels) if attention[i]), mid_attention=True,
        num_heads=num_heads, head_dim=head_dim, transformer_depth=int(depth.pop()), context_dim=int(cross[0]),
        ff_mult=4, dropout=float(config.get("dropout", 0.0)), norm_groups=int(config.get("norm_num_groups", 32)),
        norm_eps=float(config.get("norm_eps", 1e-5)), use_scale_shift_norm=shift == "scale_shift",
        flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)), freq_shift=float(config.get("freq_shift", 0)),
        gelu_approximate=False, transformer_norm_eps=1e-6, use_text_mask=False)


def _unet_rules(levels: int) -> Callable[[str], Optional[tuple]]:
    def up(m):
        return f"up_{levels - 1 - int(m[1])}"

    resnet = r"(norm1|conv1|norm2|conv2|time_emb_proj|conv_shortcut)"
    res_names = {"time_emb_proj": "temb_proj", "conv_shortcut": "skip"}
    transformer = (r"(?:\.(norm|proj_in|proj_out)|\.transformer_blocks\.(\d+)\.(norm1|norm2|norm3|ff\.net\.2|"
                   r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)))")

    def attn_tail(m, first):
        norm, block, leaf, attn, proj = m[first], m[first + 1], m[first + 2], m[first + 3], m[first + 4]
        if norm:
            return norm
        if attn:
            return (f"block_{block}/{'self_attn' if attn == 'attn1' else 'cross_attn'}/"
                    f"{ {'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out.0': 'out'}[proj] }")
        return f"block_{block}/" + ("ff/proj_out" if leaf == "ff.net.2" else leaf)

    return _rules([
        (r"(conv_in|conv_out)", r"\1"),
        (r"conv_norm_out", "norm_out"),
        (r"time_embedding\.linear_(1|2)", lambda m: f"time_mlp_{int(m[1]) - 1}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\." + resnet,
         lambda m: f"down_{m[1]}_res_{m[2]}/{res_names.get(m[3], m[3])}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)" + transformer,
         lambda m: f"down_{m[1]}_attn_{m[2]}/{attn_tail(m, 3)}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv", r"down_\1_downsample/conv"),
        (r"mid_block\.resnets\.(\d)\." + resnet, lambda m: f"mid_res_{m[1]}/{res_names.get(m[2], m[2])}"),
        (r"mid_block\.attentions\.0" + transformer, lambda m: f"mid_attn/{attn_tail(m, 1)}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\." + resnet, lambda m: f"{up(m)}_res_{m[2]}/{res_names.get(m[3], m[3])}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)" + transformer, lambda m: f"{up(m)}_attn_{m[2]}/{attn_tail(m, 3)}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv", lambda m: f"{up(m)}_upsample/conv"),
    ])


_GEGLU = re.compile(r"(.*)\.ff\.net\.0\.proj\.(weight|bias)$")


def unet_params_from_diffusers(state: dict[str, np.ndarray], config: UNetConfig, source: str = "unet") -> dict:
    """The :class:`UNet` parameter tree of a diffusers ``UNet2DConditionModel`` state dict."""
    rename = _unet_rules(config.num_levels)
    abstract = jax.eval_shape(lambda k: UNet(config).init(k, *dummy_inputs(config, config.downsample_factor))["params"],
                              jax.random.key(0))

    def geglu(key, array, want):
        m = _GEGLU.match(key)
        if m is None:
            return None
        module = rename(m[1] + ".ff.net.2")
        if module is None:
            raise ConversionError(f"{source}: unknown key {key} {tuple(array.shape)}")
        ff = module[:-1]
        value, gate = np.split(array, 2, axis=0)  # diffusers: hidden, gate = proj(x).chunk(2)
        if m[2] == "weight":
            value, gate, leaf = value.T, gate.T, "kernel"
        else:
            leaf = "bias"
        return [(ff + ("proj_value", leaf), value), (ff + ("proj_gate", leaf), gate)]

    return convert_state_dict(state, abstract, rename, source, special=geglu)


# ------------------------------------------------------------------------------------------------------
# The scheduler.
# ------------------------------------------------------------------------------------------------------

_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_SAMPLERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmpp_2m",
             "EulerDiscreteScheduler": "euler", "HeunDiscreteScheduler": "heun", "PNDMScheduler": "ddim",
             "LMSDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler",
             "UniPCMultistepScheduler": "dpmpp_2m"}


# diffusers' timestep_spacing when a scheduler config has none (the class's default; "linspace" for the others).
_DEFAULT_SPACING = {"DDIMScheduler": "leading", "DDPMScheduler": "leading", "PNDMScheduler": "leading"}
# Schedulers diffjax samples with a near relative (PNDM's pseudo-linear multistep → DDIM, ancestral Euler and LMS →
# Euler, UniPC → DPM-Solver++(2M)), and scheduler options diffjax's samplers do not have (with their neutral values).
_APPROXIMATE = ("PNDMScheduler", "LMSDiscreteScheduler", "EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler")
_NOT_CARRIED = {"use_karras_sigmas": False, "clip_sample": False, "thresholding": False, "solver_order": 2,
                "algorithm_type": "dpmsolver++"}


def scheduler_from_diffusers(config: dict, source: str = "scheduler/scheduler_config.json") -> tuple[dict, dict]:
    """(the fields of ``factory.SchedulerConfig``, the sampling defaults) of a diffusers scheduler config.

    The sampler is the diffusers scheduler's diffjax counterpart (PNDM, which diffjax does not have, → DDIM, as
    diffusers' own pipelines are often switched); ``steps_offset`` and ``set_alpha_to_one`` become the samplers'
    ``steps_offset`` and DDIM's final ᾱ."""
    schedule = config.get("beta_schedule", "linear")
    if schedule not in _SCHEDULES:
        raise ConversionError(f"{source}: beta_schedule={schedule!r} is not one of {', '.join(_SCHEDULES)}")
    if config.get("trained_betas") is not None:
        raise ConversionError(f"{source}: trained_betas are not supported")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise ConversionError(f"{source}: prediction_type={prediction!r} is not one of {', '.join(_PREDICTIONS)}")
    fields = dict(schedule=_SCHEDULES[schedule], num_timesteps=int(config.get("num_train_timesteps", 1000)),
                  rescale_to_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
                  prediction_type=_PREDICTIONS[prediction])
    if schedule != "squaredcos_cap_v2":
        fields.update(beta_start=float(config.get("beta_start", 0.0001)), beta_end=float(config.get("beta_end", 0.02)))
    cls = config.get("_class_name")
    approximated = [f"{k}={config[k]!r}" for k, default in _NOT_CARRIED.items() if k in config and config[k] != default]
    if cls not in _SAMPLERS or cls in _APPROXIMATE:
        approximated.insert(0, f"_class_name={cls!r} (sampled with {_SAMPLERS.get(cls, 'ddim')})")
    if approximated:
        logging.warning("%s: not carried over: %s", source, ", ".join(approximated))
    sampling = dict(sampler=_SAMPLERS.get(cls, "ddim"),
                    timestep_spacing=config.get("timestep_spacing", _DEFAULT_SPACING.get(cls, "linspace")),
                    steps_offset=int(config.get("steps_offset", 0)),
                    final_alpha_cumprod=None if config.get("set_alpha_to_one", True) else "first")
    return fields, sampling



# ------------------------------------------------------------------------------------------------------
# A whole pipeline folder.
# ------------------------------------------------------------------------------------------------------

PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _pipeline_directory(path_or_hub_id: str, with_params: bool = True, **hub_kwargs) -> str:
    """The local folder of a diffusers pipeline: ``path_or_hub_id`` itself, or the Hub snapshot of that model id
    (downloaded by huggingface_hub: configs, tokenizer files and, ``with_params``, the safetensors weights of the
    five components)."""
    path = os.path.expanduser(os.fspath(path_or_hub_id))
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.count("/") != 1 or path.startswith((".", "/")):
        raise ConversionError(f"{path_or_hub_id}: no such directory (and not a Hugging Face Hub model id)")
    from huggingface_hub import snapshot_download  # only a Hub id, never a local folder, downloads

    patterns = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*"]
    if with_params:
        patterns += ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                     "text_encoder/model.safetensors"]
    return snapshot_download(path_or_hub_id, allow_patterns=patterns, **hub_kwargs)


def load_diffusers(path_or_hub_id: str, with_params: bool = True, **hub_kwargs):
    """(Models, {"unet", "text", "vae"} numpy parameter trees, image shape, sampling defaults) of a diffusers
    Stable Diffusion folder or Hub id (e.g. ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``, downloaded with
    ``huggingface_hub`` when it is not a local folder); ``with_params=False`` reads the configs only (params
    ``{}``). Raises one ConversionError line for a folder that is not a diffusers pipeline, a missing component, an
    architecture diffjax does not have or a shape mismatch."""
    directory = _pipeline_directory(path_or_hub_id, with_params, **hub_kwargs)
    index_path = os.path.join(directory, "model_index.json")
    if not os.path.isfile(index_path):
        raise ConversionError(f"{directory} is not a diffusers pipeline folder (no model_index.json)")
    for name in PIPELINE_COMPONENTS:
        if not os.path.isdir(os.path.join(directory, name)):
            raise ConversionError(f"{directory} is missing {name}/: a Stable Diffusion pipeline needs "
                                  f"{', '.join(PIPELINE_COMPONENTS)}")
    unet_json = read_config(os.path.join(directory, "unet"))
    ucfg = unet_config_from_diffusers(unet_json, os.path.join(directory, "unet", "config.json"))
    vcfg = vae_config_from_diffusers(read_config(os.path.join(directory, "vae")),
                                     os.path.join(directory, "vae", "config.json"))
    sched_path = os.path.join(directory, "scheduler", "scheduler_config.json")
    if not os.path.isfile(sched_path):
        raise ConversionError(f"{directory} is missing scheduler/scheduler_config.json")
    with open(sched_path) as f:
        fields, sampling = scheduler_from_diffusers(json.load(f), sched_path)
    try:
        encoder, text_params = TextEncoder.from_pretrained(directory, subfolder="text_encoder",
                                                           tokenizer_subfolder="tokenizer", load_weights=with_params)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{os.path.join(directory, 'text_encoder')}: {' '.join(str(e).split())[:300]}") from None
    # diffusers encodes prompts without the padding mask unless the config asks for it (absent means no).
    encoder.config.use_attention_mask = bool(getattr(encoder.config, "use_attention_mask", False))
    if ucfg.context_dim != encoder.hidden_size:
        raise ConversionError(f"{os.path.join(directory, 'unet', 'config.json')}: cross_attention_dim="
                              f"{ucfg.context_dim}, but the text encoder's hidden_size is {encoder.hidden_size}")
    if vcfg.latent_channels != ucfg.in_channels:
        raise ConversionError(f"{os.path.join(directory, 'vae', 'config.json')}: latent_channels="
                              f"{vcfg.latent_channels}, but the U-Net takes in_channels={ucfg.in_channels}")
    params = {}
    if with_params:
        unet_state, unet_file = read_state_dict(os.path.join(directory, "unet"))
        params = {"unet": unet_params_from_diffusers(unet_state, ucfg, unet_file),
                  "vae": vae_params_from_diffusers(*_vae_state(directory, vcfg)),
                  "text": jax_to_numpy(text_params)}
    models = Models(UNet(ucfg), encoder, SchedulerConfig(**fields), AutoencoderKL(vcfg))
    final = sampling.pop("final_alpha_cumprod")
    options = {"steps_offset": sampling.pop("steps_offset")}
    if final == "first":  # DDIM's set_alpha_to_one=False: the last step goes to ᾱ_0, not 1
        options["final_alpha_cumprod"] = float(models.schedule.alphas_cumprod[0])
    size = int(unet_json.get("sample_size", 64)) * vcfg.downsample_factor
    defaults = dict(sampling, num_steps=50, guidance_scale=7.5, sampler_options=options)
    return models, params, (size, size, vcfg.in_channels), defaults


def _vae_state(directory: str, config: VAEConfig) -> tuple[dict, VAEConfig, str]:
    state, path = read_state_dict(os.path.join(directory, "vae"))
    return state, config, path


def load_diffusers_vae(path_or_hub_id: str, with_params: bool = True, **hub_kwargs):
    """(VAEConfig, numpy parameters or None) of the ``vae/`` of a diffusers pipeline folder or Hub id."""
    directory = _pipeline_directory(path_or_hub_id, with_params, **hub_kwargs)
    if not os.path.isdir(os.path.join(directory, "vae")):
        raise ConversionError(f"{directory} has no vae/: not a latent diffusion pipeline")
    vcfg = vae_config_from_diffusers(read_config(os.path.join(directory, "vae")),
                                     os.path.join(directory, "vae", "config.json"))
    return vcfg, (vae_params_from_diffusers(*_vae_state(directory, vcfg)) if with_params else None)


def jax_to_numpy(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)
