"""Denoiser networks: the U-Net and the Diffusion Transformer."""

from diffjax.models.dit import DIT_PRESETS, DiT, DiTConfig, dit_preset
from diffjax.models.layers import count_params, timestep_embedding
from diffjax.models.unet import PRESETS, UNet, UNetConfig, dummy_inputs, unet_preset

__all__ = [
    "DIT_PRESETS",
    "DiT",
    "DiTConfig",
    "dit_preset",
    "PRESETS",
    "UNet",
    "UNetConfig",
    "count_params",
    "dummy_inputs",
    "timestep_embedding",
    "unet_preset",
]
