"""Runs for tests: Fashion-MNIST resized to 8×8, the tiniest U-Net (or DiT) and text encoder (a run's time is
mostly compiling the train step and the sampler, much less once the compilation cache holds them;
docs/performance.md)."""

from diffjax import config as defaults


def get_config():
    config = defaults.get_config()
    config.data.image_size = 8
    config.model.unet = defaults.unet_config("tiny", in_channels=1)
    config.model.dit = defaults.dit_config("tiny", in_channels=1)  # with --config.model.name=dit
    config.text.encoder = "tiny"
    config.text.max_length = 16
    config.training.batch_size = 8
    config.training.num_steps = 4
    config.training.log_every = 2
    config.training.eval_every = 0
    config.training.eval_batches = 1
    config.training.sample_every = 0
    config.training.checkpoint_every = 2
    config.training.progress_bar = False
    config.optim.warmup_steps = 0
    config.optim.learning_rate = 1e-2  # a tiny model on a handful of images: fast, visible progress
    config.sampling.num_steps = 4
    config.sampling.images_per_prompt = 1
    config.data.num_threads = 1
    config.data.prefetch_batches = 2
    return config
