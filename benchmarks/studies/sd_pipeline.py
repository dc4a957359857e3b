"""Stable Diffusion sampling and training, diffjax against diffusers' PyTorch pipeline, same weights, same card.

    # CPU: the SD 1.x architecture at reduced width and resolution (the default)
    .venv/bin/python benchmarks/studies/sd_pipeline.py
    # a GPU: the real size, 512x512 in bfloat16, 50 DPM-Solver++ steps with guidance 7.5
    python benchmarks/studies/sd_pipeline.py --width 320 --resolution 512 --dtype bfloat16 \
        --sample-batch 4 --train-batch 8

Both frameworks get the same randomly initialised networks (diffusers' ``UNet2DConditionModel``, ``AutoencoderKL``
and a CLIP ViT-L/14-sized text transformer, converted to diffjax with ``diffjax.diffusers_format``: no download), the same
scheduler (DPM-Solver++(2M), leading spacing) and the same work:

* sampling images/s: prompts → text encoding → ``--steps`` guided U-Net steps → decoded images
  (``Text2Image.generate`` against ``StableDiffusionPipeline.__call__``);
* train step images/s: frozen float32 autoencoder and text encoder, the U-Net's forward and backward with
  activation recomputation (remat / gradient checkpointing) computing in ``--dtype`` from float32 parameters,
  gradient clipping, AdamW and an EMA (``diffjax.train.make_train_step`` through a ``Trainer`` against a PyTorch
  loop doing the same under autocast);
* memory: the diffjax train step's from XLA's memory analysis with and without remat (and on a GPU, PyTorch's
  ``max_memory_allocated``);
* diffjax alone: the same train step on latents precomputed into the dataset (``data.precompute_latents``: the
  batch carries the autoencoder's posterior moments, the step draws a latent from them and does not encode),
  as a ratio to encoding in the step.

Rounds alternate between the frameworks after a warm-up; medians; ratios are diffjax / diffusers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax
import numpy as np

PROMPT = "a photograph of an astronaut riding a horse"


def build_reference(args, directory):
    """A diffusers StableDiffusionPipeline of SD 1.x's architecture (U-Net width ``--width``), saved to ``directory``."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffjax.text import clip_tokenizer

    torch.manual_seed(0)
    w = args.width
    unet = UNet2DConditionModel(sample_size=args.resolution // 8, block_out_channels=(w, 2 * w, 4 * w, 4 * w),
                                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=min(32, w // 4))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                                        pad_token_id=49407))
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(77), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, device, dtype


def torch_sample(pipe, args):
    import torch

    with torch.no_grad():
        images = pipe([PROMPT] * args.sample_batch, num_inference_steps=args.steps, guidance_scale=7.5,
                      height=args.resolution, width=args.resolution, output_type="np").images
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return len(images)


def torch_trainer(directory, args, device, dtype):
    """One PyTorch training step doing diffjax's work: latents from the frozen float32 VAE, float32 text states,
    the U-Net's ε-loss under autocast to ``dtype`` with float32 parameters (diffjax: ``unet.dtype`` compute, float32
    parameters), gradient checkpointing, gradient clipping, AdamW and an EMA of the parameters."""
    import torch
    import torch.nn.functional as F
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(directory, safety_checker=None).to(device)  # float32
    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    unet.train()
    unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-5)
    b, r = args.train_batch, args.resolution
    images = torch.rand(b, 3, r, r, device=device) * 2 - 1
    ids = pipe.tokenizer([PROMPT] * b, padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    alphas = pipe.scheduler.alphas_cumprod.to(device)
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
            states = text(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (b,), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with autocast:
            pred = unet(noisy, t, states).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.9999)
        if device == "cuda":
            torch.cuda.synchronize()
        return b

    return step


def diffjax_pipeline(directory, args):
    from diffjax.pipeline import Text2Image

    pipe = Text2Image.from_diffusers(directory)
    if args.dtype == "bfloat16":
        pipe = pipe.to_dtype("bfloat16")

    def sample():
        return len(pipe.generate([PROMPT] * args.sample_batch, sampler="dpmpp_2m", num_steps=args.steps,
                                 guidance_scale=7.5, batch_size=args.sample_batch))

    return pipe, sample


def diffjax_trainer(directory, args, remat=True, with_state=True, precomputed=False):
    from diffjax import config as defaults
    from diffjax.train import Trainer

    config = defaults.get_config()
    config.model.pretrained = directory
    config.model.unet.remat = remat
    config.model.unet.dtype = args.dtype
    config.text.trainable = False
    config.diffusion.loss_weighting = "none"
    config.diffusion.cond_drop_prob = 0.0  # as the PyTorch loop
    config.optim.learning_rate, config.optim.warmup_steps, config.optim.lr_schedule = 1e-5, 0, "constant"
    config.training.batch_size = args.train_batch
    r = args.resolution
    trainer = Trainer(config, image_shape=(r, r, 3))
    rng = np.random.default_rng(0)
    ids, mask = trainer.models.text_encoder.tokenize([PROMPT] * args.train_batch)
    images = rng.uniform(-1, 1, (args.train_batch, r, r, 3)).astype(np.float32)
    if precomputed:  # what data.precompute_latents reads from the dataset: the posterior moments
        vae = trainer.models.autoencoder
        posterior = vae.apply({"params": trainer.init().frozen["vae"]}, images, method=vae.encode)
        batch = trainer.shard_batch({"latent_mean": np.asarray(posterior.mean),
                                     "latent_logvar": np.asarray(posterior.logvar), "token_ids": ids, "mask": mask})
    else:
        batch = trainer.shard_batch({"image": images, "token_ids": ids, "mask": mask})
    memory = trainer.step.lower(trainer.restore_target(), batch).compile().memory_analysis()
    if not with_state:
        return None, memory
    holder = {"state": trainer.init()}

    def step():
        holder["state"], metrics = trainer.step(holder["state"], batch)
        jax.block_until_ready(metrics)
        return args.train_batch

    return step, memory


def timed(fn) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=64, help="U-Net base width (Stable Diffusion: 320)")
    parser.add_argument("--resolution", type=int, default=128, help="image side in pixels (latents: / 8)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=50, help="sampler steps")
    parser.add_argument("--sample-batch", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as directory:
        ref, device, dtype = build_reference(args, directory)
        pipe, jx_sample = diffjax_pipeline(directory, args)
        jobs = {"sample": {"diffjax": jx_sample, "diffusers": lambda: torch_sample(ref, args)}}
        memory = {}
        if not args.skip_train:
            jx_step, memory["remat"] = diffjax_trainer(directory, args, remat=True)
            _, memory["no remat"] = diffjax_trainer(directory, args, remat=False, with_state=False)
            jobs["train"] = {"diffjax": jx_step, "diffusers": torch_trainer(directory, args, device, dtype)}
            jx_latent_step, memory["remat, precomputed latents"] = diffjax_trainer(directory, args, remat=True,
                                                                                   precomputed=True)
            jobs["precomputed"] = {"diffjax": jx_latent_step}
        for kind in jobs.values():  # warm-up: compile, allocate
            for fn in kind.values():
                fn()
        results = {k: {f: [] for f in v} for k, v in jobs.items()}
        for _ in range(args.rounds):
            for kind, fns in jobs.items():
                for framework, fn in fns.items():
                    results[kind][framework].append(timed(fn))
        from diffjax.models.layers import count_params

        unet_params = count_params(pipe.denoiser_params)
        print(f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform}); jax {jax.__version__}, torch "
              f"{torch.__version__} on {device}; U-Net width {args.width} ({unet_params:,} parameters), "
              f"{args.resolution}x{args.resolution} px, {args.dtype}; medians of {args.rounds} rounds")
        for kind, per in results.items():
            med = {f: statistics.median(v) for f, v in per.items()}
            if kind == "precomputed":
                encoding = statistics.median(results["train"]["diffjax"])
                print(f"train step on precomputed latents (diffjax): {med['diffjax']:.3f} images/s, "
                      f"{med['diffjax'] / encoding:.2f}x encoding in the step")
                continue
            what = (f"sampling ({args.steps} DPM-Solver++ steps, guidance 7.5, batch {args.sample_batch})"
                    if kind == "sample" else f"train step (remat, AdamW, batch {args.train_batch})")
            print(f"{what}: diffjax {med['diffjax']:.3f} images/s, diffusers {med['diffusers']:.3f} images/s, "
                  f"ratio {med['diffjax'] / med['diffusers']:.2f}")
        for name, m in memory.items():
            print(f"diffjax train step memory ({name}): temp {m.temp_size_in_bytes / 2**20:.0f} MiB, arguments "
                  f"{m.argument_size_in_bytes / 2**20:.0f} MiB")
        if device == "cuda":
            print(f"PyTorch max_memory_allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
