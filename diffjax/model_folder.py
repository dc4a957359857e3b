"""A self-contained model folder: everything sampling needs, nothing of the training run.

Layout (one JSON config per component, as diffusers' pipelines are saved)::

    model_index.json                  format version, the components, the image shape (H, W, C), and the
                                      text encoder's token length
    unet/config.json                  every diffjax.models.UNetConfig field
    unet/diffusion_params.safetensors the U-Net's parameters, keys "module/.../param"
      (a DiT instead: transformer/config.json, every DiTConfig field, and transformer/diffusion_params.safetensors)
    vae/config.json, vae/diffusion_params.safetensors
                                      a latent model's autoencoder: every VAEConfig field, its parameters
    alignment/config.json, alignment/diffusion_params.safetensors
                                      image–text alignment heads, when trained (config.alignment.weight > 0):
                                      every AlignmentConfig field, their parameters (alignment guidance uses them)
    text_encoder/                     a transformers directory: config.json, model.safetensors, tokenizer files
                                      (FlaxCLIPTextModel / CLIPTokenizerFast load it too)
    scheduler/scheduler_config.json   the noise schedule and prediction type, and the sampling defaults
                                      (sampler, num_steps, guidance_scale, timestep_spacing, and options
                                      such as steps_offset for the samplers that take them)

The parameters are the ones the pipeline samples with (EMA by default, for an exported training run), in
safetensors: no optimizer state, no experiment config, no pickle. A folder loads on any number of devices
and any mesh, since the arrays are read on the host and then placed with the caller's shardings.

Writing is atomic: the folder is assembled under a temporary name beside the target and renamed into
place, so an interrupted export never leaves a half-written folder under the target name, and an existing
model folder is replaced only once the new one is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from diffjax.models import factory
from diffjax.models.autoencoder import AutoencoderKL, VAEConfig
from diffjax.text import TextEncoder

FORMAT = "diffjax.Text2Image"
FORMAT_VERSION = 3  # 2: transformer/ and vae/ components, sampler_options in scheduler_config.json; 3: alignment/
INDEX = "model_index.json"
NETWORK_CONFIG = "config.json"  # COMPONENT/config.json, COMPONENT "unet" or "transformer"
NETWORK_PARAMS = "diffusion_params.safetensors"
TEXT_ENCODER = "text_encoder"
SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")
SAMPLING_KEYS = ("sampler", "num_steps", "guidance_scale", "timestep_spacing", "sampler_options",
                 "guidance_schedule", "guidance_interval", "alignment_guidance_scale")
VAE = "vae"
ALIGNMENT = "alignment"


def _host(tree: Any) -> Any:
    """Every leaf as a numpy array on this host; a ``jax.Array`` sharded over several processes is gathered
    (a collective: every process calls this)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)


def is_model_folder(directory: str) -> bool:
    """Whether ``directory`` holds a diffjax model folder (its ``model_index.json`` names this format)."""
    try:
        with open(os.path.join(directory, INDEX)) as f:
            return json.load(f).get("_class_name") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save(pipe, directory: str) -> str:
    """Write ``pipe`` (a ``Text2Image``) as a model folder at ``directory``; returns its absolute path.
    ``directory`` must not exist, be empty, or be a diffjax model folder (which is replaced); every process
    takes part in gathering sharded parameters and process 0 writes."""
    directory = os.path.abspath(os.path.expanduser(directory))
    if os.path.exists(directory) and not (os.path.isdir(directory) and (
            not os.listdir(directory) or is_model_folder(directory))):
        raise FileExistsError(f"{directory} exists and is not an empty directory or a diffjax model folder; not "
                              f"overwriting it")
    trees = {pipe.models.component: _host(pipe.denoiser_params), TEXT_ENCODER: _host(pipe.text_params)}
    if pipe.models.autoencoder is not None:
        trees[VAE] = _host(pipe.vae_params)
    if pipe.models.alignment is not None:
        trees[ALIGNMENT] = _host(pipe.alignment_params)
    for name, tree in trees.items():
        bad = [k for k, v in _flatten(tree).items() if not np.all(np.isfinite(v))]
        if bad:
            raise ValueError(f"refusing to export {directory}: {name} parameter {bad[0]} is not finite"
                             + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    if jax.process_index() == 0:
        _write(pipe, directory, trees)
    if jax.process_count() > 1:  # nobody reports success before the folder is in place
        multihost_utils.sync_global_devices("diffjax: model folder written")
    return directory


def _write(pipe, directory: str, trees: dict) -> None:
    parent = os.path.dirname(directory)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise OSError(f"cannot write the model folder {directory}: {e.strerror or e}") from e
    try:
        configs = factory.component_configs(pipe.models)
        networks = [name for name in trees if name != TEXT_ENCODER]  # the denoiser's component, and "vae"
        _write_json(os.path.join(tmp, INDEX), {
            "_class_name": FORMAT, "format_version": FORMAT_VERSION, "image_shape": list(pipe.image_shape),
            "text_max_length": pipe.models.text_encoder.max_length, **{name: name for name in networks},
            "text_encoder": TEXT_ENCODER, "scheduler": "scheduler"})
        for name in networks:
            _write_json(os.path.join(tmp, name, NETWORK_CONFIG), configs[name])
            save_file({k: np.require(v, requirements="C") for k, v in _flatten(trees[name]).items()},
                      os.path.join(tmp, name, NETWORK_PARAMS), metadata={"format": "diffjax"})
        sampling = dict(pipe.defaults, timestep_spacing=pipe.timestep_spacing, sampler_options=pipe.sampler_options)
        if pipe.models.alignment is None:  # a CLIP the pipeline guided with is not saved: no default guidance
            sampling["alignment_guidance_scale"] = 0.0
        _write_json(os.path.join(tmp, SCHEDULER_CONFIG), {**configs["scheduler"], **sampling})
        pipe.models.text_encoder.save_pretrained(os.path.join(tmp, TEXT_ENCODER), trees[TEXT_ENCODER])
        if not os.path.isdir(directory):
            os.replace(tmp, directory)
            return
        # Replace an existing folder: move it aside under a fresh name, put the new one in place, and put the
        # old one back if that fails.
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", suffix=".old", dir=parent)
        os.replace(directory, old)
        try:
            os.replace(tmp, directory)
        except BaseException:
            os.replace(old, directory)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------------------


def _read_json(directory: str, name: str) -> dict:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is missing {name}: not a complete model folder")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({' '.join(str(e).split())})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def check_params(params: dict, abstract: dict, path: str, config_name: str) -> None:
    """One-line ValueError naming ``path`` when ``params`` lacks a parameter of ``abstract``, has one it does
    not, or has one of another shape."""
    got = {k: np.shape(v) for k, v in _flatten(params).items()}
    want = {k: tuple(v.shape) for k, v in _flatten(abstract).items()}

    def some(names):
        names = sorted(names)
        return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")

    if want.keys() - got.keys():
        raise ValueError(f"{path}: missing parameters {some(want.keys() - got.keys())} that {config_name} needs")
    if got.keys() - want.keys():
        raise ValueError(f"{path}: parameters {some(got.keys() - want.keys())} are not in the model of "
                         f"{config_name}")
    for k in sorted(want):
        if got[k] != want[k]:
            raise ValueError(f"{path}: parameter {k} has shape {got[k]}, but {config_name} gives {want[k]}")


_HF_MISMATCH = re.compile(r"weight for \((.*?)\) failed: checkpoint has shape (\(.*?\)) which is incompatible "
                          r"with the model shape (\(.*?\))")


def _load_text_encoder(directory: str, max_length, with_params: bool = True) -> tuple[TextEncoder, Optional[dict]]:
    path = os.path.join(directory, TEXT_ENCODER)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{directory} is missing {os.path.join(TEXT_ENCODER, 'config.json')}: not a "
                                f"complete model folder")
    try:
        encoder, params = TextEncoder.from_pretrained(path, max_length=max_length, load_weights=with_params)
    except ValueError as e:  # transformers' shape check
        m = _HF_MISMATCH.search(str(e))
        if m is None:
            raise ValueError(f"{path}: {' '.join(str(e).split())[:300]}") from None
        key = "/".join(part.strip(" '\"") for part in m.group(1).split(","))
        raise ValueError(f"{os.path.join(path, 'model.safetensors')}: parameter {key} has shape {m.group(2)}, but "
                         f"{TEXT_ENCODER}/config.json gives {m.group(3)}") from None
    return encoder, params


def load(directory: str, place: Optional[Callable[[Any], Any]] = None,
         with_params: bool = True) -> tuple[factory.Models, dict, tuple, dict]:
    """(models, {component: ..., "text": ...[, "vae": ...][, "alignment": ...]}, image_shape, sampling defaults) of
    the model folder at ``directory``. ``place`` maps the parameters' abstract tree to the same tree with target
    shardings (None: numpy arrays on the host); ``with_params=False`` reads the configs only (params ``{}``)."""
    directory = os.path.abspath(os.path.expanduser(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no model folder at {directory}")
    if not os.path.isfile(os.path.join(directory, INDEX)):
        raise FileNotFoundError(f"{directory} is not a diffjax model folder (no {INDEX}; write one with "
                                f"Text2Image.save_pretrained or --mode=export)")
    index = _read_json(directory, INDEX)
    if index.get("_class_name") != FORMAT or int(index.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(f"{os.path.join(directory, INDEX)}: not a {FORMAT} folder of format version <= "
                         f"{FORMAT_VERSION} (_class_name={index.get('_class_name')!r}, "
                         f"format_version={index.get('format_version')!r})")
    shape = index.get("image_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ValueError(f"{os.path.join(directory, INDEX)}: image_shape must be [H, W, C], got {shape!r}")
    components = [c for c in factory.COMPONENTS if c in index]
    if len(components) != 1:
        raise ValueError(f"{os.path.join(directory, INDEX)}: names {' and '.join(components) or 'no denoiser'}; "
                         f"expected exactly one of {', '.join(factory.COMPONENTS)}")
    component = components[0]
    networks = [component] + [name for name in (VAE, ALIGNMENT) if name in index]
    fields = {name: _read_json(directory, os.path.join(name, NETWORK_CONFIG)) for name in networks}
    scheduler = _read_json(directory, SCHEDULER_CONFIG)
    defaults = {k: scheduler.pop(k) for k in SAMPLING_KEYS if k in scheduler}
    encoder, text_params = _load_text_encoder(directory, index.get("text_max_length"), with_params)
    try:
        models = factory.models_from_components(component, fields[component], encoder, scheduler, fields.get(VAE),
                                                fields.get(ALIGNMENT))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{directory}: {' '.join(str(e).split())}") from None
    if int(shape[2]) != models.image_channels:
        raise ValueError(f"{os.path.join(directory, INDEX)}: image_shape {shape} has {shape[2]} channels, "
                         f"{os.path.join(VAE if VAE in fields else component, NETWORK_CONFIG)} in_channels="
                         f"{models.image_channels}")
    if not with_params:
        return models, {}, tuple(shape), defaults
    abstract = models.abstract_params()
    loaded = {}
    for name in networks:
        params_name = os.path.join(name, NETWORK_PARAMS)
        params_path = os.path.join(directory, params_name)
        if not os.path.isfile(params_path):
            raise FileNotFoundError(f"{directory} is missing {params_name}: not a complete model folder")
        try:
            loaded[name] = _unflatten(load_file(params_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{params_path}: not a readable safetensors file ({' '.join(str(e).split())})") from None
        check_params(loaded[name], abstract[name], params_path, os.path.join(name, NETWORK_CONFIG))
    check_params(text_params, abstract["text"], os.path.join(directory, TEXT_ENCODER, "model.safetensors"),
                 os.path.join(TEXT_ENCODER, "config.json"))
    loaded["text"] = text_params
    if place is None:
        params = jax.tree_util.tree_map(lambda x, a: np.asarray(x, a.dtype), loaded, abstract)
    else:
        params = jax.tree_util.tree_map(lambda x, a: jax.device_put(np.asarray(x, a.dtype), a.sharding), loaded,
                                        place(abstract))
    return models, params, tuple(shape), defaults


def load_vae(directory: str, with_params: bool = True) -> tuple[AutoencoderKL, Optional[dict]]:
    """(AutoencoderKL computing in float32, numpy float32 parameters or None) of the model folder's ``vae/``: the
    frozen autoencoder of a latent model trained from scratch (``config.model.autoencoder``)."""
    fields = _read_json(directory, os.path.join(VAE, NETWORK_CONFIG))
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(VAEConfig)})
    if unknown:
        raise ValueError(f"{os.path.join(directory, VAE, NETWORK_CONFIG)}: unknown field(s) {', '.join(unknown)}")
    vae = AutoencoderKL(VAEConfig(**{**fields, "dtype": "float32", "param_dtype": "float32"}))  # frozen, float32
    if not with_params:
        return vae, None
    params_path = os.path.join(directory, VAE, NETWORK_PARAMS)
    if not os.path.isfile(params_path):
        raise FileNotFoundError(f"{directory} is missing {os.path.join(VAE, NETWORK_PARAMS)}")
    params = _unflatten(load_file(params_path))
    f, c = vae.config.downsample_factor, vae.config.in_channels
    abstract = jax.eval_shape(lambda k: vae.init(k, jax.numpy.zeros((1, f, f, c)))["params"], jax.random.PRNGKey(0))
    check_params(params, abstract, params_path, os.path.join(VAE, NETWORK_CONFIG))
    return vae, factory.cast_floating(params, "float32")
