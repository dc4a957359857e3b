"""The embedded default (fashion_mnist.py) with a Diffusion Transformer in place of the U-Net: DiT blocks of
width 64 on 196 tokens of 2x2 patches, cross-attention to the same tiny CLIP text transformer, at the U-Net's
compute per step (XLA's cost analysis: 40 vs 42 GFLOP per step of batch 64) and the same data, schedule,
objective and budget, so that the two denoisers compare at equal compute (docs/lab_notebook.md).

    python -m experiments.main --config=experiments/configs/fashion_mnist_dit.py --workdir=runs/fashion_mnist_dit
"""

from diffjax import config as defaults
from experiments.configs import fashion_mnist


def get_config():
    # The recipe the U-Net/DiT comparison in docs/lab_notebook.md was measured with, not the demo's current one.
    config = fashion_mnist.five_wordings_recipe(fashion_mnist.get_config())
    config.model.name = "dit"
    config.model.dit = defaults.dit_config("fashion_mnist")
    return config
