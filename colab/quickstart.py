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
# # diffjax quickstart: a text-to-image model in ten minutes
#
# Written for Google Colab's TPU runtime as it is in late 2026: Python 3.12, one TPU v5e chip, no TensorFlow
# preinstalled, no `jax.tools.colab_tpu.setup_tpu()` (the chip is local to the VM). It runs unchanged on a GPU
# runtime, and on a CPU (that is how CI runs it, at tiny sizes, with `DIFFJAX_SMOKE=1`).
#
# What it does: installs diffjax, builds captioned Fashion-MNIST ("a photo of a sneaker", ...), trains a small
# U-Net with cross-attention on a CLIP text transformer with the sharded trainer on every device, samples with
# classifier-free guidance, saves a self-contained model folder, reloads it and samples again.

# %%
import os
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules
SMOKE = os.environ.get("DIFFJAX_SMOKE", "0") == "1"  # CI: tiny sizes, a few steps
# Where diffjax comes from on Colab: the repository at a pinned tag or commit (set REF to the one you want).
REPO = os.environ.get("DIFFJAX_REPO", "https://github.com/diffjax/diffjax")
REF = os.environ.get("DIFFJAX_REF", "main")

if IN_COLAB:
    # jax's TPU (or CUDA) build at the versions setup.cfg allows; the runtime's other packages are left alone
    # (diffjax's requirements are ranges that Colab's jax/flax/optax satisfy or are upgraded within).
    accel = "tpu" if (os.path.exists("/dev/accel0") or os.environ.get("TPU_ACCELERATOR_TYPE")) else (
        "cuda" if subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode == 0 else "")
    if not os.path.isdir("diffjax"):
        subprocess.run(["git", "clone", "-q", REPO, "diffjax"], check=True)
        subprocess.run(["git", "-C", "diffjax", "checkout", "-q", REF], check=True)
    extra = f"[{accel}]" if accel else ""
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--upgrade-strategy=only-if-needed", "-e", f"./diffjax{extra}"], check=True)
    subprocess.run(pip + ["--no-deps", "openai-clip==1.0.1"], check=True)  # only its CLIP BPE vocabulary file
    os.chdir("diffjax")  # the recipes (experiments/configs/*.py) are read from the clone

# %%
import diffjax  # first: its XLA settings and compilation cache apply from the first array on
import jax

print("jax", jax.__version__, "| backend:", jax.default_backend(), "|", jax.device_count(), "devices:", jax.devices())

# %% [markdown]
# ## A config, with a few keys overridden here
#
# `experiments/configs/fashion_mnist.py` is the demo's recipe (0.79M-parameter U-Net, 600 steps); every key of
# `diffjax/config.py` can be changed below, exactly as `--config.KEY=VALUE` does on the command line.

# %%
from diffjax.config import load_config, validate

WORK = os.environ.get("DIFFJAX_NOTEBOOK_WORKDIR") or os.path.abspath("runs/quickstart")
config = load_config("experiments/configs/tiny.py" if SMOKE else "experiments/configs/fashion_mnist.py")
config.data.name = "fashion_mnist"
config.data.data_dir = os.path.join(WORK, "tfds")
config.data.allow_download = IN_COLAB  # Colab downloads the IDX files; elsewhere Debian's dataset-fashion-mnist
config.training.batch_size = 16 if SMOKE else 64
config.training.num_steps = 40 if SMOKE else 600
config.sampling.num_steps = 8 if SMOKE else 20
validate(config)
print(config.model.unet.preset, "U-Net,", config.training.num_steps, "steps of batch", config.training.batch_size)

# %% [markdown]
# ## The captioned dataset
#
# A tfds builder turns the Fashion-MNIST IDX files into array_record files with one caption per image; grain
# reads them with random access, shuffles, batches and tokenizes — no TensorFlow needed.

# %%
from diffjax.data import describe_dataset, make_dataset

info = describe_dataset(config.data, config.data.train_split)
print(info.name, info.num_examples, "training images of shape", info.image_shape)
print("prompts:", info.prompts()[:3], "...")

# %% [markdown]
# ## Train with the sharded trainer
#
# `Trainer(config)` builds the mesh over every device, the networks, AdamW + EMA, and the jitted, sharded train
# step; here the loop is written out (what `diffjax.loop.train` does, without checkpoints) to plot the loss.

# %%
import time

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from tqdm.auto import tqdm

from diffjax.train import Trainer

trainer = Trainer(config)
state = trainer.init()
it = make_dataset(config.data, trainer.models.text_encoder, split=config.data.train_split, seed=config.seed,
                  global_batch_size=config.training.batch_size)
eval_batch = trainer.shard_batch(next(make_dataset(config.data, trainer.models.text_encoder, split="test",
                                                   seed=1, shuffle=False,
                                                   global_batch_size=config.training.batch_size)))
eval_key = jax.random.PRNGKey(123)
initial_eval_loss = float(trainer.eval_step(state, eval_batch, eval_key))
losses = []
for step in tqdm(range(config.training.num_steps), desc="train"):
    state, metrics = trainer.step(state, trainer.shard_batch(next(it)))
    losses.append(metrics["loss"])
losses = np.asarray(jax.device_get(losses))
final_eval_loss = float(trainer.eval_step(state, eval_batch, eval_key))

plt.figure(figsize=(6, 3))
plt.plot(losses, alpha=0.4, label="train loss")
k = max(len(losses) // 10, 1)
plt.plot(np.arange(k - 1, len(losses)), np.convolve(losses, np.ones(k) / k, "valid"), label=f"mean of {k}")
plt.xlabel("step")
plt.legend()
plt.show()
print(f"held-out loss (EMA parameters): {initial_eval_loss:.4f} at init -> {final_eval_loss:.4f}")

# %% [markdown]
# ## Sample with classifier-free guidance

# %%
from diffjax.pipeline import Text2Image
from diffjax.pixels import image_grid

pipe = Text2Image(trainer.models, state.ema_params["unet"], state.text_params(ema=True), trainer.image_shape,
                  sampler=config.sampling.sampler, num_steps=config.sampling.num_steps,
                  guidance_scale=config.sampling.guidance_scale, timestep_spacing=config.sampling.timestep_spacing,
                  mesh=trainer.mesh)
prompts = [p for p in info.prompts() for _ in range(4)]
images = pipe.generate(prompts, guidance_scale=config.sampling.guidance_scale, seed=0)
plt.figure(figsize=(4, 10))
plt.imshow(image_grid(images, rows=len(info.prompts()))[..., 0], cmap="gray")
plt.axis("off")
plt.show()

# %% [markdown]
# ## Save a model folder, reload it, sample again
#
# The folder holds one JSON config per component and the EMA parameters in safetensors: no optimizer state, no
# experiment config. It loads on any number of devices.

# %%
folder = pipe.save_pretrained(os.path.join(WORK, "model"))
print(sorted(os.listdir(folder)))
reloaded = Text2Image.from_pretrained(folder)
again = reloaded.generate(prompts, guidance_scale=config.sampling.guidance_scale, seed=0)
print("identical images after reloading:", np.array_equal(images, again))

# %% [markdown]
# ## Images per second
#
# The sampling program is compiled once per (sampler, steps, size, batch); the timed call reuses the one of the
# batch above.

# %%
batch = prompts[: max(jax.device_count(), 64)]
reloaded.generate(batch, seed=1)  # compiled already, for `again`; a first call also places the parameters
start = time.perf_counter()
reloaded.generate(batch, seed=2)
seconds = time.perf_counter() - start
print(f"{len(batch) / seconds:.1f} images/s ({config.sampling.num_steps} {config.sampling.sampler} steps, "
      f"guidance {config.sampling.guidance_scale}, {jax.device_count()} {jax.default_backend()} devices)")

# %% [markdown]
# ## Checks
#
# The training loss fell, the trained model denoises held-out images better than the initial one (its samples
# come from a better denoiser), and the reloaded folder gives the same images.

# %%
third = max(len(losses) // 3, 1)
assert losses[-third:].mean() < losses[:third].mean(), (losses[:third].mean(), losses[-third:].mean())
assert final_eval_loss < initial_eval_loss, (initial_eval_loss, final_eval_loss)
assert np.array_equal(images, again)
print("all checks passed")
