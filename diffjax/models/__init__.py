"""Denoiser networks."""

from diffjax.models.unet import (
    PRESETS,
    UNet,
    UNetConfig,
    count_params,
    dummy_inputs,
    timestep_embedding,
    unet_preset,
)

__all__ = [
    "PRESETS",
    "UNet",
    "UNetConfig",
    "count_params",
    "dummy_inputs",
    "timestep_embedding",
    "unet_preset",
]
