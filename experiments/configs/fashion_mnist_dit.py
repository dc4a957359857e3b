"""The embedded default (fashion_mnist.py) with a Diffusion Transformer in place of the U-Net: DiT blocks of
width 64 on 196 tokens of 2x2 patches, cross-attention to the same tiny CLIP text transformer, at the U-Net's
compute per step (XLA's cost analysis: 40 vs 42 GFLOP per step of batch 64) and the same data, schedule,
objective and budget, so that the two denoisers compare at equal compute (benchmarks/RESULTS.md).

    python -m experiments.main --config=experiments/configs/fashion_mnist_dit.py --workdir=runs/fashion_mnist_dit
"""

from diffjax.data.captions import DEFAULT_TEMPLATES
from experiments.configs import default, fashion_mnist


def get_config():
    config = fashion_mnist.get_config()
    # As the U-Net/DiT comparison in RESULTS.md was measured: five caption wordings, no alignment term,
    # guidance 5 (the demo config now has 30 wordings, the term and guidance 2.5).
    config.alignment.weight = 0.0
    config.data.caption_templates = DEFAULT_TEMPLATES
    config.sampling.guidance_scale = 5.0
    config.model.name = "dit"
    config.model.dit = default.dit_config("fashion_mnist")
    return config
