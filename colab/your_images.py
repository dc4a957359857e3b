# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Train or fine-tune on your own captioned images
#
# Written for Google Colab's TPU runtime as it is in late 2026 (Python 3.12, one TPU v5e chip, no TensorFlow);
# it runs on a GPU or CPU runtime too, and in CI on a CPU at tiny sizes (`DIFFJAX_SMOKE=1`).
#
# Your data: a folder of images (any size or mode) and a captions file, JSON Lines
# (`{"file": "cats/001.jpg", "caption": "a cat asleep on a sofa"}`) or CSV with the columns `file,caption`.
# Set `CAPTIONS_FILE` below to yours; left empty, the notebook writes an example folder of tinted
# Fashion-MNIST items ("a red sneaker", "a blue bag", ...). Online, the text encoder is OpenAI's pretrained
# CLIP ViT-B/32 text transformer, frozen; offline (CI), a small CLIP text transformer trained from scratch.

# %%
import os
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules
SMOKE = os.environ.get("DIFFJAX_SMOKE", "0") == "1"
ONLINE = IN_COLAB or os.environ.get("DIFFJAX_ONLINE", "0") == "1"  # may weights be downloaded from the hub?
REPO = os.environ.get("DIFFJAX_REPO", "https://github.com/diffjax/diffjax")
REF = os.environ.get("DIFFJAX_REF", "main")  # the tag or commit to install
CAPTIONS_FILE = ""  # your captions .jsonl / .csv; "" = write the example folder
if IN_COLAB:
    accel = "tpu" if (os.path.exists("/dev/accel0") or os.environ.get("TPU_ACCELERATOR_TYPE")) else (
        "cuda" if subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode == 0 else "")
    if not os.path.isdir("diffjax"):
        subprocess.run(["git", "clone", "-q", REPO, "diffjax"], check=True)
        subprocess.run(["git", "-C", "diffjax", "checkout", "-q", REF], check=True)
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--upgrade-strategy=only-if-needed", "-e", f"./diffjax[{accel}]" if accel else "./diffjax"],
                   check=True)
    subprocess.run(pip + ["--no-deps", "openai-clip==1.0.1"], check=True)  # only its CLIP BPE vocabulary file
    os.chdir("diffjax")  # the recipes (experiments/configs/*.py) are read from the clone

import diffjax  # first: its XLA settings and compilation cache apply from the first array on
import jax

print("backend:", jax.default_backend(), "| devices:", jax.devices())

# %% [markdown]
# ## The example folder (skipped when `CAPTIONS_FILE` names yours)

# %%
import json

import numpy as np
from PIL import Image

from diffjax.data.captions import CLASS_NAMES
from diffjax.data.fashion_mnist import FASHION_MNIST_FILES, find_idx_files, read_idx

WORK = os.environ.get("DIFFJAX_NOTEBOOK_WORKDIR") or os.path.abspath("runs/your_images")
COLOURS = {"red": (1.0, 0.2, 0.2), "green": (0.2, 0.9, 0.2), "blue": (0.3, 0.4, 1.0)}
if not CAPTIONS_FILE:
    idx = find_idx_files(allow_download=IN_COLAB, download_dir=os.path.join(WORK, "idx"))
    pixels = read_idx(os.path.join(idx, FASHION_MNIST_FILES["train"][0]))
    labels = read_idx(os.path.join(idx, FASHION_MNIST_FILES["train"][1]))
    folder = os.path.join(WORK, "images")
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(160 if SMOKE else 3000):
        colour = list(COLOURS)[i % len(COLOURS)]
        rgb = (pixels[i][..., None] * np.asarray(COLOURS[colour])).astype(np.uint8)
        name = f"{i:05d}.png"
        Image.fromarray(rgb).save(os.path.join(folder, name))
        rows.append({"file": name, "caption": f"a {colour} {CLASS_NAMES[labels[i]]}"})
    CAPTIONS_FILE = os.path.join(folder, "captions.jsonl")
    with open(CAPTIONS_FILE, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(len(rows), "images, e.g.", rows[:3])

# %% [markdown]
# ## The config
#
# `experiments/configs/text_to_image_folder.py` (pretrained frozen CLIP, 64 px RGB, v-prediction with zero
# terminal SNR), with sizes for this notebook. The image-folder builder resizes and center-crops every image,
# checks every row first, and writes a tfds dataset once; editing the captions file builds a new one.

# %%
from diffjax.config import load_config, validate

config = load_config("experiments/configs/text_to_image_folder.py")
config.data.captions_file = CAPTIONS_FILE
config.data.data_dir = os.path.join(WORK, "tfds")
config.data.image_size = 16 if SMOKE else 32
config.data.eval_split = "train[:10%]"
config.data.train_split = "train[10%:]"
if ONLINE:
    config.text.encoder = "openai/clip-vit-base-patch32"  # pretrained, frozen (the config's default)
else:
    config.text.encoder, config.text.pretrained, config.text.trainable, config.text.max_length = "tiny", False, True, 16
config.model.unet = load_config("experiments/configs/tiny.py").model.unet if SMOKE else config.model.unet
config.model.unet.in_channels = 3
if not SMOKE:
    config.model.unet.channel_mult = (1, 2, 2)
config.training.batch_size = 8 if SMOKE else 32
config.training.num_steps = 10 if SMOKE else 2000
config.training.checkpoint_every = config.training.num_steps
config.training.log_every = 5 if SMOKE else 100
config.training.sample_every = 0
config.training.eval_every = 0
config.optim.warmup_steps = 0 if SMOKE else 200
config.optim.learning_rate = 1e-2 if SMOKE else 1e-3
if SMOKE:  # 10 steps leave nothing to decay; the fine-tune's Trainer then compiles the very same train step
    config.optim.lr_schedule = "constant"
config.sampling.num_steps = 8 if SMOKE else 25
config.sampling.prompts = "|".join(f"a {c} {n}" for c in COLOURS for n in ("sneaker", "bag"))
validate(config)

# %% [markdown]
# ## Train, with checkpoints
#
# `diffjax.loop.train` is the whole run: it resumes from the workdir's newest checkpoint, trains with the
# sharded trainer on every device, and checkpoints (with the data position) at the end and on SIGTERM.

# %%
from diffjax import loop
from diffjax.data import make_dataset
from diffjax.train import Trainer

workdir = os.path.join(WORK, "run")
trainer = Trainer(config)
state = loop.train(trainer, workdir)
print("trained to step", int(state.step))

# %% [markdown]
# ## Fine-tune: continue from the checkpoint
#
# The same call with a larger `num_steps` resumes from the newest checkpoint (parameters, optimizer, EMA, data
# position) — the same as fine-tuning a model trained earlier in this workdir, or elsewhere and copied here.

# %%
first_steps = int(state.step)
config.training.num_steps = first_steps * 2
config.training.checkpoint_every = config.training.num_steps
trainer = Trainer(config)
state = loop.train(trainer, workdir)
print("fine-tuned to step", int(state.step))

eval_it = make_dataset(config.data, trainer.models.text_encoder, split=config.data.eval_split, seed=0,
                       shuffle=False, global_batch_size=config.training.batch_size)
eval_batch = trainer.shard_batch(next(eval_it))
key = jax.random.PRNGKey(0)
loss_init = float(trainer.eval_step(trainer.init(), eval_batch, key))
loss_trained = float(trainer.eval_step(state, eval_batch, key))
print(f"held-out loss: {loss_init:.4f} untrained -> {loss_trained:.4f} after {int(state.step)} steps")

# %% [markdown]
# ## Sample from the checkpoint

# %%
import matplotlib.pyplot as plt

from diffjax.pipeline import Text2Image
from diffjax.pixels import image_grid

pipe = Text2Image.from_checkpoint(workdir)
prompts = [p for p in config.sampling.prompts.split("|") for _ in range(4)]
images = pipe.generate(prompts, seed=0)
plt.figure(figsize=(4, 6))
plt.imshow(image_grid(images, rows=len(prompts) // 4))
plt.axis("off")
plt.show()

# %% [markdown]
# ## Checks

# %%
assert first_steps == config.training.num_steps // 2 and int(state.step) == config.training.num_steps
assert pipe.step == int(state.step)
assert loss_trained < loss_init, (loss_init, loss_trained)
assert images.shape == (len(prompts), config.data.image_size, config.data.image_size, 3) and images.std() > 0
print("all checks passed")
