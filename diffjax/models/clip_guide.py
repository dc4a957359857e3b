"""A pretrained CLIP as the similarity that alignment guidance follows (GLIDE's CLIP guidance, Nichol et al. 2022).

``CLIPGuide.from_pretrained(path_or_hub_id)`` loads a ``FlaxCLIPModel`` and its processor (tokenizer, image size,
mean and std) from a local folder, or from the Hub when online (``openai/clip-vit-base-patch32``). Its
:meth:`CLIPGuide.similarity` is differentiable in the images: images in [-1, 1] are mapped to [0, 1], grey
images repeated to three channels, resized (bicubic) to the CLIP's input size and normalised as its processor
does (square images: the processor's resize-then-centre-crop is this resize), and the result is CLIP's logit
e^τ cos(E_I(image), E_T(prompt)) per example. Unlike the jointly trained alignment heads, a CLIP never saw
noisy images: it is applied to the denoiser's x̂0 (decoded for a latent model).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.losses import l2_normalize

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class CLIPGuide:
    model: Any  # transformers.FlaxCLIPModel (its module and methods; the parameters are passed separately)
    params: Any
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_length: int

    @classmethod
    def from_pretrained(cls, path: str) -> "CLIPGuide":
        """The CLIP model and processor at ``path`` (a folder with ``config.json``, weights, tokenizer files and
        ``preprocessor_config.json``, or a Hub id); a one-line error naming ``path`` when it cannot be loaded."""
        from transformers import CLIPProcessor, FlaxCLIPModel

        try:
            model = FlaxCLIPModel.from_pretrained(path)
            processor = CLIPProcessor.from_pretrained(path)
        except (OSError, ValueError) as e:
            first = " ".join(str(e).split())[:200]
            raise ValueError(f"alignment guidance: cannot load a Flax CLIP model and processor from {path!r}: "
                             f"{first}") from None
        ip = processor.image_processor
        crop = getattr(ip, "crop_size", None) or {}
        crop = crop if isinstance(crop, dict) else {"height": crop}  # older processors store an int
        size = int(crop.get("height", model.config.vision_config.image_size))
        return cls(model=model, params=model.params, tokenizer=processor.tokenizer, image_size=size,
                   mean=tuple(float(m) for m in ip.image_mean), std=tuple(float(s) for s in ip.image_std),
                   max_length=int(model.config.text_config.max_position_embeddings))

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """CLIP token ids and attention mask (N, max_length), int32."""
        out = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="np")
        return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)

    def pixel_values(self, images: Array) -> Array:
        """Images (B, H, W, 1 or 3) in [-1, 1] → CLIP's normalised input (B, 3, S, S), differentiably."""
        x = (images.astype(jnp.float32) + 1.0) / 2.0
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        s = self.image_size
        if x.shape[1:3] != (s, s):
            x = jax.image.resize(x, (x.shape[0], s, s, 3), method="bicubic")
        x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
        return jnp.transpose(x, (0, 3, 1, 2))

    def similarity(self, params: Any, images: Array, ids: Array, mask: Array) -> Array:
        """CLIP's logit e^τ cos(E_I(image_i), E_T(prompt_i)) per example (B,)."""
        e_i = self.model.get_image_features(pixel_values=self.pixel_values(images), params=params)
        e_t = self.model.get_text_features(input_ids=ids, attention_mask=mask, params=params)
        return jnp.exp(params["logit_scale"]) * jnp.sum(l2_normalize(e_i) * l2_normalize(e_t), axis=-1)
