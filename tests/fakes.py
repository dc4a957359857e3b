"""Small stand-ins for real data and trained models, shared by the tests and tests/train_worker.py."""

import os
import subprocess

import jax
import numpy as np

from diffjax import data
from diffjax.data import fashion_mnist

GLOBAL_BATCH = 8


def write_fake_fashion_mnist(directory, n_train=40, n_test=20, seed=0):
    """Random 28×28 uint8 images with labels 0..9 as Fashion-MNIST's four IDX .gz files in ``directory``;
    returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        img_name, lbl_name = fashion_mnist.FASHION_MNIST_FILES[split]
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        imgs[:, 0, 0] = 0  # exact extremes present
        imgs[:, 0, 1] = 255
        labels = (np.arange(n) * 7 % 10).astype(np.uint8)
        data.write_idx(os.path.join(directory, img_name), imgs)
        data.write_idx(os.path.join(directory, lbl_name), labels)
        out[split] = (imgs, labels)
    return out


def write_image_folder(folder, size=16, n=16):
    """``n`` RGB ``size``² images in four flat colours, one caption per colour, and ``captions.jsonl``."""
    import json

    from PIL import Image

    colours = {"a red square": (255, 0, 0), "a green square": (0, 255, 0), "a blue square": (0, 0, 255),
               "a white square": (255, 255, 255)}
    rows = []
    for i in range(n):
        caption, rgb = list(colours.items())[i % 4]
        Image.new("RGB", (size, size), rgb).save(os.path.join(folder, f"{i}.png"))
        rows.append({"file": f"{i}.png", "caption": caption})
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return os.path.join(folder, "captions.jsonl")


def image_folder_config(captions_file, data_dir, size=16, **model):
    """tiny_config() on a captioned RGB image folder at ``size`` px, with ``config.model`` keys set."""
    config = tiny_config()
    config.data.name, config.data.captions_file = "image_folder", str(captions_file)
    config.data.data_dir, config.data.image_size, config.data.channels = str(data_dir), size, 3
    config.data.train_split, config.data.eval_split = "train", "train"
    for key, value in model.items():
        config.model[key] = value
    return config


def tiny_config():
    """experiments/configs/tiny.py with the tests' global batch."""
    from experiments.configs import tiny

    config = tiny.get_config()
    config.training.batch_size = GLOBAL_BATCH
    return config


def perturbed(tree, seed=0, scale=0.1):
    """``tree`` plus N(0, scale²) noise: the U-Net's zero-initialised output layers would make a freshly
    initialised model predict ε = 0 whatever the prompt. The noise is drawn with numpy (a jitted draw per leaf
    took XLA:CPU 15 s to compile) and each leaf goes back where it was, in its dtype."""
    rng = np.random.default_rng(seed)

    def add(x):
        host = np.asarray(x)
        out = (host.astype(np.float32) + scale * rng.standard_normal(host.shape, np.float32)).astype(host.dtype)
        return jax.device_put(out, x.sharding) if isinstance(x, jax.Array) else out

    return jax.tree_util.tree_map(add, tree)


def random_text2image(mesh=None):
    """The tiny config's U-Net and text encoder with perturbed random weights, as a Text2Image (8×8×1)."""
    from diffjax.build import models_from_config
    from diffjax.pipeline import Text2Image

    config = tiny_config()
    models, params = models_from_config(config)
    text_params = params["text"]
    net_params = models.init_denoiser(jax.random.PRNGKey(0), (8, 8))
    sc = config.sampling
    return Text2Image(models, perturbed(net_params), perturbed(text_params, seed=1), (8, 8, 1),
                      sampler=sc.sampler, num_steps=sc.num_steps, guidance_scale=sc.guidance_scale,
                      timestep_spacing=sc.timestep_spacing, mesh=mesh)


def write_local_clip(directory, image_size=32):
    """A small FlaxCLIPModel initialised from a config (seed 0) with its processor (the offline CLIP tokenizer,
    max length 16), saved at ``directory``: what a user's downloaded CLIP folder holds. Returns the model."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPProcessor, FlaxCLIPModel

    from diffjax.text import TextEncoder

    encoder, _ = TextEncoder.from_config("tiny", max_length=16)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=16),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=image_size, patch_size=8),
                        projection_dim=16)
    model = FlaxCLIPModel(config, seed=0)
    model.save_pretrained(str(directory))
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=encoder.tokenizer).save_pretrained(str(directory))
    return model


def flat(tree):
    """Every leaf of a (device) pytree, as one float32 vector: parameters compared at a glance."""
    leaves = jax.tree_util.tree_leaves(jax.device_get(tree))
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in leaves])


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (for a jax.distributed coordinator)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_main_in_process(args) -> subprocess.CompletedProcess:
    """``experiments.main.run(args)`` in this process, with its stdout, stderr and log records captured, as a
    CompletedProcess (conftest.py's ``run_main`` and tests/train_worker.py use it)."""
    import contextlib
    import io
    import logging

    from experiments import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main.run(list(args))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess(["experiments.main", *args], code, out.getvalue(), err.getvalue())
