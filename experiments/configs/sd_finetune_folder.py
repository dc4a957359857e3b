"""Fine-tune Stable Diffusion (1.x / 2.x, converted from the diffusers format on the fly) on your captioned
image folder, in latent space: the frozen autoencoder encodes every image once (and its mirror image, for the
random flips) into a tfds dataset of posterior moments beside the prepared images (data.precompute_latents),
the U-Net trains on latents drawn from them, the CLIP text encoder stays frozen. Needs the weights (internet once, or a local diffusers folder / diffjax model folder) and
an accelerator (an 860M-parameter U-Net).

    python -m experiments.main --config=experiments/configs/sd_finetune_folder.py --workdir=runs/sd_mine \
        --config.data.captions_file=/path/captions.jsonl [--config.data.image_size=512 \
        --config.model.pretrained=/path/to/diffusers/folder]
"""

from diffjax import config as defaults


def get_config():
    config = defaults.get_config()
    config.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    config.model.unet.remat = True  # compute settings of the pretrained U-Net: activations recomputed per block
    config.model.unet.dtype = "bfloat16"  # bf16 compute, float32 parameters and optimizer state
    config.text.trainable = False
    config.data.name = "image_folder"
    config.data.captions_file = ""  # required: .jsonl or .csv of (file, caption)
    config.data.image_size = 256
    config.data.channels = 3
    config.data.random_flip = True
    config.data.precompute_latents = True  # encoded once, not in every step
    config.data.train_split = "train[2%:]"
    config.data.eval_split = "train[:2%]"
    config.diffusion.schedule = "scaled_linear"  # the model's own (SD 1.x); a pretrained model keeps its schedule
    config.diffusion.loss_weighting = "none"  # Stable Diffusion's own objective: the plain ε (or v) loss
    config.diffusion.cond_drop_prob = 0.1
    config.optim.learning_rate = 1e-5
    config.optim.lr_schedule = "constant"
    config.optim.warmup_steps = 100
    config.optim.weight_decay = 1e-2
    config.ema.decay = 0.9999
    config.training.batch_size = 16
    config.training.num_steps = 5_000
    config.training.checkpoint_every = 500
    config.training.sample_every = 500
    config.training.eval_every = 500
    config.sampling.sampler = "ddim"
    config.sampling.num_steps = 50
    config.sampling.guidance_scale = 7.5
    config.sampling.timestep_spacing = "leading"
    config.sampling.images_per_prompt = 2
    return config
