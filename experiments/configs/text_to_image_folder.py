"""Your own captioned images with a pretrained, frozen CLIP text encoder (needs the weights: internet, or a
local copy of ``openai/clip-vit-base-patch32``):

    python -m experiments.main --config=experiments/configs/text_to_image_folder.py --workdir=runs/mine \
        --config.data.captions_file=/path/captions.jsonl --config.data.image_size=64
"""

from diffjax import config as defaults


def get_config():
    config = defaults.get_config()
    config.data.name = "image_folder"
    config.data.captions_file = ""  # required: .jsonl or .csv of (file, caption)
    config.data.image_size = 64
    config.data.channels = 3
    config.data.random_flip = True
    config.data.eval_split = "train[:2%]"
    config.data.train_split = "train[2%:]"
    config.model.unet = defaults.unet_config("small", in_channels=3, channel_mult=(1, 2, 2, 4), dropout=0.1)
    config.text.encoder = "openai/clip-vit-base-patch32"
    config.text.pretrained = True
    config.text.trainable = False
    config.diffusion.schedule = "scaled_linear"
    config.diffusion.prediction_type = "v"
    config.diffusion.rescale_to_zero_snr = True
    config.sampling.timestep_spacing = "trailing"
    config.sampling.prompts = "a photo of a dog|a painting of a house"
    config.training.batch_size = 32
    config.training.num_steps = 50_000
    return config
