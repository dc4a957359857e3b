"""DDPM's CIFAR-10 setup (Ho et al. 2020, Appendix B), for accelerators: the 35.7M-parameter U-Net (its attention
blocks as cross-attention transformers), linear β 1e-4 → 0.02 over T = 1000, ε-prediction with the simple
loss, Adam 2e-4 with 5000 warmup steps, batch 128, EMA 0.9999, random flips, 800k steps; prompts are the
class names in caption templates ("a photo of a frog"), with a base-size CLIP text encoder trained jointly.

Needs the tfds ``cifar10`` dataset prepared under ``data.data_dir`` (``tfds build cifar10`` with internet).
"""

from diffjax import config as defaults


def get_config():
    config = defaults.get_config()
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.channels = 3
    config.data.random_flip = True
    config.model.unet = defaults.unet_config("ddpm_cifar10")
    config.text.encoder = "base"
    config.diffusion.schedule = "linear"
    config.diffusion.prediction_type = "eps"
    config.diffusion.loss_weighting = "none"
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.lr_schedule = "constant"
    config.ema.decay = 0.9999
    config.training.batch_size = 128
    config.training.num_steps = 800_000
    config.training.log_every = 100
    config.training.eval_every = 10_000
    config.training.sample_every = 10_000
    config.training.checkpoint_every = 10_000
    config.sampling.sampler = "ddim"
    config.sampling.num_steps = 100
    return config
