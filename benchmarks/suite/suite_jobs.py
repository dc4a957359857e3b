"""The timed jobs of benchmarks/suite/run.py: one text-conditioned U-Net, built equal in diffjax, diffusers-Flax and
diffusers-PyTorch, trained and sampled as each framework's users do.

Each builder returns a :class:`Job`: ``run()`` does one unit of work and waits for it (one train step, or one
sampling call of ``spec.sample_batch`` images), ``images`` is the number of images that unit covers, ``info``
what the framework reports about it (parameters, compile/first-call seconds, FLOPs per unit from the framework's
own counter). benchmarks/suite/run.py builds each job in a process of its own and times them in alternating rounds.

Matched work (per train step, all three): the frozen CLIP text transformer encodes the batch's token ids (the
same ``CLIPTextConfig``), q_sample at uniform timesteps of the same scaled-linear schedule, the U-Net's ε
prediction and its MSE, the backward pass, global-norm clipping at 1.0, AdamW (lr 1e-4, weight decay 1e-2) and an
EMA of the U-Net's parameters (decay 0.9999). diffjax's step (``Trainer.step``: the library's real
``make_train_step``) also drops 10% of the prompts for classifier-free guidance, masks the text padding and checks
the update for non-finite values; the peers do not. Per sampling call: the prompts and the empty prompt encoded,
50 DDIM steps ("leading" spacing), each evaluating the U-Net once on the concatenated [uncond; cond] batch,
guidance scale 7.5.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # its Flax classes log a deprecation note per module

PROMPTS = ("a photo of a t-shirt", "a photo of a trouser", "a pullover", "a photo of a dress", "a coat",
           "a photo of a sandal", "a shirt", "a sneaker", "a photo of a bag", "an ankle boot")
GUIDANCE, SAMPLE_STEPS, LR, WEIGHT_DECAY, EMA_DECAY, CLIP_NORM = 7.5, 50, 1e-4, 1e-2, 0.9999, 1.0


@dataclasses.dataclass(frozen=True)
class Spec:
    """One architecture and workload, buildable in all three frameworks. The transformers' inner width is the
    level's channel count (diffusers' convention), ``heads`` heads; ``text`` names a ``diffjax.text`` size."""
    image_size: int = 32
    in_channels: int = 1
    channels: int = 64
    mult: tuple = (1, 2, 2)
    res_blocks: int = 1
    attn_levels: tuple = (1, 2)  # the two lower-resolution levels (16x16 and 8x8 of a 32x32 input)
    heads: int = 4
    norm_groups: int = 32
    text: str = "small"  # width 256, 6 layers
    text_len: int = 16
    batch: int = 16
    sample_batch: int = 16
    dtype: str = "float32"

    def levels(self):
        n = len(self.mult)
        down = tuple("CrossAttnDownBlock2D" if i in self.attn_levels else "DownBlock2D" for i in range(n))
        up = tuple("CrossAttnUpBlock2D" if i in self.attn_levels else "UpBlock2D" for i in reversed(range(n)))
        return down, up


# The matched CPU comparison (6,941,505 U-Net parameters in each framework), diffjax's presets as diffusers can build
# them (for the GPU script), and a tiny one for trying the suite.
SPECS = {
    "matched": Spec(),
    "tiny": Spec(image_size=16, channels=32, mult=(1, 2), attn_levels=(1,), heads=2, text="tiny", batch=4,
                 sample_batch=4),
    "small": Spec(channels=32, mult=(1, 2, 2), res_blocks=2, attn_levels=(1, 2), heads=4, norm_groups=16,
                  batch=64, sample_batch=64),
    "ddpm_cifar10": Spec(in_channels=3, channels=128, mult=(1, 2, 2, 2), res_blocks=2, attn_levels=(1,), heads=4,
                         text="base", text_len=77, batch=64, sample_batch=64),
    "sd": Spec(image_size=64, in_channels=4, channels=320, mult=(1, 2, 4, 4), res_blocks=2, attn_levels=(0, 1, 2),
               heads=8, text="large", text_len=77, batch=8, sample_batch=8),
}


@dataclasses.dataclass
class Job:
    run: Callable[[], Any]
    images: int
    info: dict


def spec_from(name: str, **overrides) -> Spec:
    if name not in SPECS:
        raise ValueError(f"unknown spec {name!r}; valid: {', '.join(SPECS)}")
    return dataclasses.replace(SPECS[name], **overrides)


def _text_config(spec: Spec):
    from diffjax.text import text_config

    return text_config(spec.text, max_position_embeddings=max(77, spec.text_len))


def _batch(spec: Spec, n: int, seed: int = 0):
    """n images in [-1, 1] (NHWC) and their prompts, tokenized by diffjax's CLIP tokenizer (the same ids for all)."""
    from diffjax.text import TextEncoder

    rng = np.random.default_rng(seed)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    enc, _ = TextEncoder.from_config(spec.text, max_length=spec.text_len, init=False)
    ids, mask = enc.tokenize(prompts)
    uids, umask = enc.tokenize([""] * n)
    image = rng.uniform(-1, 1, (n, spec.image_size, spec.image_size, spec.in_channels)).astype(np.float32)
    return image, prompts, np.asarray(ids), np.asarray(mask), np.asarray(uids), np.asarray(umask)


def _timed_first(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------------------
# diffjax
# ------------------------------------------------------------------------------------------------------------------

def diffjax_config(spec: Spec, remat: bool = False):
    """The experiment config of the spec: diffjax's own train step with the matched recipe."""
    from diffjax import config as defaults

    config = defaults.get_config()
    # The batches are synthetic, of the trainer's image_shape: 4 channels (the SD U-Net's latents) are no image
    # dataset's, so the data section leaves its channels to them (0) where they are not 1 or 3.
    config.data.image_size, config.data.channels = spec.image_size, spec.in_channels * (spec.in_channels in (1, 3))
    config.model.unet = defaults.unet_config(
        "small", in_channels=spec.in_channels, channels=spec.channels, channel_mult=tuple(spec.mult),
        num_res_blocks=spec.res_blocks, attention_levels=tuple(spec.attn_levels), num_heads=spec.heads,
        context_dim=None, norm_groups=spec.norm_groups, dropout=0.0, flip_sin_to_cos=True, freq_shift=0.0,
        dtype=spec.dtype, remat=remat)
    config.model.use_pooled_text = False  # diffusers' text-to-image U-Net takes the token states only
    config.text.encoder, config.text.max_length, config.text.trainable = spec.text, spec.text_len, False
    config.diffusion.schedule = "scaled_linear"
    config.diffusion.prediction_type = "eps"
    config.diffusion.loss_weighting = "none"
    config.diffusion.cond_drop_prob = 0.1
    config.optim.learning_rate, config.optim.warmup_steps, config.optim.lr_schedule = LR, 0, "constant"
    config.optim.weight_decay, config.optim.grad_clip_norm = WEIGHT_DECAY, CLIP_NORM
    config.ema.decay, config.ema.warmup = EMA_DECAY, False
    config.training.batch_size = spec.batch
    return config


def diffjax_trainer(spec: Spec, remat: bool = False):
    from diffjax.train import Trainer

    return Trainer(diffjax_config(spec, remat), image_shape=(spec.image_size, spec.image_size, spec.in_channels))


def diffjax_train(spec: Spec) -> Job:
    tr = diffjax_trainer(spec)
    image, _, ids, mask, _, _ = _batch(spec, spec.batch)
    return _trainer_job(tr, {"image": image, "token_ids": ids, "mask": mask})


def diffjax_train_fashion_mnist(spec: Spec) -> Job:
    """The demo's own train step (experiments/configs/fashion_mnist.py: its U-Net, trainable text encoder,
    alignment term and batch 64) on a synthetic batch; not a comparison (no peer has this model): the suite
    reports its FLOP rate against the matmul peak. The spec is not used."""
    from diffjax.config import load_config
    from diffjax.train import Trainer

    config = load_config(os.path.join(ROOT, "experiments", "configs", "fashion_mnist.py"), [])
    dc = config.data
    tr = Trainer(config, image_shape=(dc.image_size, dc.image_size, dc.channels))
    b, rng = config.training.batch_size, np.random.default_rng(0)
    ids, mask = tr.models.text_encoder.tokenize([PROMPTS[i % len(PROMPTS)] for i in range(b)])
    return _trainer_job(tr, {"image": rng.uniform(-1, 1, (b, dc.image_size, dc.image_size, dc.channels)).astype(
        np.float32), "token_ids": np.asarray(ids), "mask": np.asarray(mask),
        "label": rng.integers(0, 10, b).astype(np.int32)}, compared=False)


def _trainer_job(tr, batch: dict, compared: bool = True) -> Job:
    """``Trainer.step`` on one batch, compiled ahead of time (its FLOPs from XLA's cost analysis)."""
    import jax

    from diffjax.models import count_params

    batch = tr.shard_batch(batch)
    state = tr.init()
    compiled, compile_s = _timed_first(lambda: tr.step.lower(state, batch).compile())
    box = [state]

    def run():
        box[0], m = compiled(box[0], batch)
        jax.block_until_ready(m["loss"])

    _, first = _timed_first(run)
    flops = compiled.cost_analysis()
    flops = (flops[0] if isinstance(flops, (list, tuple)) else flops or {}).get("flops")
    return Job(run, tr.config.training.batch_size, {
        "params": count_params(state.params[tr.models.component]), "compile_s": compile_s, "first_s": first,
        "flops": flops, "compared": compared})


def diffjax_pipeline(spec: Spec, seed: int = 0):
    """``Text2Image`` over a freshly initialised model of the spec (timings do not depend on the weights)."""
    from diffjax.pipeline import Text2Image

    tr = diffjax_trainer(spec)
    state = tr.init()
    comp = tr.models.component
    return Text2Image(tr.models, state.ema_params[comp], state.frozen.get("text", state.ema_params.get("text")),
                      tr.image_shape, sampler="ddim", num_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE,
                      timestep_spacing="leading"), state


def diffjax_sample(spec: Spec) -> Job:
    """``Text2Image.generate``: tokenization and text encoding included, uint8 images out."""
    pipe, state = diffjax_pipeline(spec)
    _, prompts, *_ = _batch(spec, spec.sample_batch)
    seed = [0]

    def run():
        seed[0] += 1  # a new seed per call: the same program (the seed is traced)
        return pipe.generate(prompts, seed=seed[0], batch_size=spec.sample_batch)

    _, first = _timed_first(run)
    from diffjax.models import count_params

    return Job(run, spec.sample_batch, {"params": count_params(pipe.denoiser_params), "first_s": first})


def diffjax_bare_sample(spec: Spec) -> Job:
    """``diffjax.samplers.ddim`` with ``guidance.classifier_free_guidance``, text encoding inside one jit (the ids
    tokenized once), float images out: what research code that imports the pieces runs."""
    import jax
    import jax.numpy as jnp

    from diffjax import guidance, samplers

    pipe, _ = diffjax_pipeline(spec)
    m = pipe.models
    _, _, ids, mask, uids, umask = _batch(spec, spec.sample_batch)
    shape = (spec.sample_batch, spec.image_size, spec.image_size, spec.in_channels)

    @jax.jit
    def sample(dparams, tparams, ids, mask, uids, umask, key, scale):
        cond = m.text_encoder.encode(tparams, ids, mask, trainable=False)
        uncond = m.text_encoder.encode(tparams, uids, umask, trainable=False)
        model_fn = guidance.classifier_free_guidance(m.model_fn(dparams), cond, uncond, scale)
        x_T = jax.random.normal(key, shape, jnp.float32)
        return samplers.ddim(model_fn, x_T, m.schedule, SAMPLE_STEPS, prediction_type=m.prediction_type,
                             timestep_spacing="leading")

    args = (pipe.denoiser_params, pipe.text_params, ids, mask, uids, umask)
    seed = [0]

    def run():
        seed[0] += 1
        return jax.block_until_ready(sample(*args, jax.random.key(seed[0]), jnp.float32(GUIDANCE)))

    _, first = _timed_first(run)
    return Job(run, spec.sample_batch, {"first_s": first})


# ------------------------------------------------------------------------------------------------------------------
# diffusers-Flax (diffusers 0.39, the last release with Flax classes)
# ------------------------------------------------------------------------------------------------------------------

def _flax_models(spec: Spec):
    import jax.numpy as jnp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import FlaxUNet2DConditionModel
        from transformers import FlaxCLIPTextModel

    if spec.norm_groups != 32:
        raise ValueError("diffusers' Flax U-Net has 32 GroupNorm groups; this spec has " + str(spec.norm_groups))
    down, up = spec.levels()
    unet = FlaxUNet2DConditionModel(
        sample_size=spec.image_size, in_channels=spec.in_channels, out_channels=spec.in_channels,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(spec.channels * m for m in spec.mult),
        layers_per_block=spec.res_blocks, attention_head_dim=spec.heads,  # the number of heads, in diffusers-Flax
        cross_attention_dim=_text_config(spec).hidden_size, flip_sin_to_cos=True, freq_shift=0,
        dtype=jnp.dtype(spec.dtype))
    text = FlaxCLIPTextModel(_text_config(spec), seed=0, dtype=jnp.float32, _do_init=True)
    return unet, text


def _scaled_linear_alphas_cumprod(n: int = 1000, start: float = 0.00085, end: float = 0.012) -> np.ndarray:
    betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


def flax_train(spec: Spec) -> Job:
    """The train step of diffusers' examples/text_to_image/train_text_to_image_flax.py (frozen text encoder inside
    the step, optax clip + AdamW), with the EMA diffjax also keeps."""
    import jax
    import jax.numpy as jnp
    import optax

    from diffjax.models import count_params

    unet, text = _flax_models(spec)
    image, _, ids, _, _, _ = _batch(spec, spec.batch)
    x = jnp.asarray(np.transpose(image, (0, 3, 1, 2)))  # NCHW, as diffusers' Flax U-Net takes it
    ids = jnp.asarray(ids)
    params = unet.init_weights(jax.random.key(0))
    tx = optax.chain(optax.clip_by_global_norm(CLIP_NORM), optax.adamw(LR, weight_decay=WEIGHT_DECAY))
    ac = jnp.asarray(_scaled_linear_alphas_cumprod())

    def step(state, text_params, x, ids, rng):
        params, opt_state, ema = state
        rng, k_noise, k_t = jax.random.split(rng, 3)
        states = jax.lax.stop_gradient(text(ids, params=text_params, train=False)[0])
        noise = jax.random.normal(k_noise, x.shape)
        t = jax.random.randint(k_t, (x.shape[0],), 0, ac.shape[0])
        a = ac[t][:, None, None, None]
        noisy = jnp.sqrt(a) * x + jnp.sqrt(1 - a) * noise

        def loss_fn(p):
            pred = unet.apply({"params": p}, noisy, t, states, train=True).sample
            return jnp.mean((pred.astype(jnp.float32) - noise) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree_util.tree_map(lambda e, p: EMA_DECAY * e + (1 - EMA_DECAY) * p, ema, params)
        return (params, opt_state, ema), loss, rng

    jstep = jax.jit(step, donate_argnums=(0,))
    state = (params, tx.init(params), jax.tree_util.tree_map(jnp.copy, params))
    rng = jax.random.key(0)
    compiled, compile_s = _timed_first(lambda: jstep.lower(state, text.params, x, ids, rng).compile())
    box = [state, rng]

    def run():
        box[0], loss, box[1] = compiled(box[0], text.params, x, ids, box[1])
        jax.block_until_ready(loss)

    _, first = _timed_first(run)
    flops = compiled.cost_analysis()
    flops = (flops[0] if isinstance(flops, (list, tuple)) else flops or {}).get("flops")
    return Job(run, spec.batch, {"params": count_params(params), "compile_s": compile_s, "first_s": first,
                                 "flops": flops})


def flax_sample(spec: Spec) -> Job:
    """The loop of diffusers' FlaxStableDiffusionPipeline._generate: prompts and "" encoded, FlaxDDIMScheduler,
    ``lax.fori_loop`` over the steps, [uncond; cond] in one U-Net call, all in one jit (ids tokenized once)."""
    import jax
    import jax.numpy as jnp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import FlaxDDIMScheduler

    unet, text = _flax_models(spec)
    params = unet.init_weights(jax.random.key(0))
    sched = FlaxDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    _, _, ids, _, uids, _ = _batch(spec, spec.sample_batch)
    shape = (spec.sample_batch, spec.in_channels, spec.image_size, spec.image_size)

    @jax.jit
    def generate(params, text_params, ids, uids, key, scale):
        both = jnp.concatenate([uids, ids])
        states = text(both, params=text_params)[0]
        s_state = sched.set_timesteps(sched.create_state(), SAMPLE_STEPS, shape)
        latents = jax.random.normal(key, shape, jnp.float32) * s_state.init_noise_sigma

        def body(i, carry):
            latents, s_state = carry
            t = s_state.timesteps[i]
            inp = jnp.concatenate([latents] * 2)
            out = unet.apply({"params": params}, inp, jnp.broadcast_to(t, (inp.shape[0],)), states).sample
            uncond, cond = jnp.split(out, 2)
            eps = uncond + scale * (cond - uncond)
            latents, s_state = sched.step(s_state, eps, t, latents).to_tuple()
            return latents, s_state

        latents, _ = jax.lax.fori_loop(0, SAMPLE_STEPS, body, (latents, s_state))
        return latents

    seed = [0]

    def run():
        seed[0] += 1
        return jax.block_until_ready(generate(params, text.params, ids, uids, jax.random.key(seed[0]),
                                              jnp.float32(GUIDANCE)))

    _, first = _timed_first(run)
    return Job(run, spec.sample_batch, {"first_s": first})


# ------------------------------------------------------------------------------------------------------------------
# diffusers-PyTorch
# ------------------------------------------------------------------------------------------------------------------

def _torch_models(spec: Spec, device: str):
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    down, up = spec.levels()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=spec.image_size, in_channels=spec.in_channels, out_channels=spec.in_channels,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(spec.channels * m for m in spec.mult),
        layers_per_block=spec.res_blocks, attention_head_dim=spec.heads, norm_num_groups=spec.norm_groups,
        cross_attention_dim=_text_config(spec).hidden_size).to(device)
    text = CLIPTextModel(_text_config(spec)).to(device).eval().requires_grad_(False)
    return unet, text


def _torch_device(spec: Spec) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _autocast(device: str, spec: Spec):
    import contextlib

    import torch

    if spec.dtype == "bfloat16":  # diffusers' --mixed_precision=bf16 (accelerate's autocast)
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def torch_train(spec: Spec, compile: bool = False) -> Job:
    """The train step of diffusers' examples/text_to_image/train_text_to_image.py (frozen text encoder, AdamW,
    clip_grad_norm_, EMA of the U-Net), with ``torch.compile`` of the U-Net when asked."""
    import torch
    import torch.nn.functional as F

    device = _torch_device(spec)
    unet, text = _torch_models(spec, device)
    n_params = sum(p.numel() for p in unet.parameters())
    unet.train()
    params = [p for p in unet.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    model = torch.compile(unet) if compile else unet
    image, _, ids, _, _, _ = _batch(spec, spec.batch)
    x = torch.from_numpy(np.transpose(image, (0, 3, 1, 2)).copy()).to(device)
    ids = torch.from_numpy(ids.astype(np.int64)).to(device)
    ac = torch.from_numpy(_scaled_linear_alphas_cumprod()).to(device)
    gen = torch.Generator(device).manual_seed(0)

    def step():
        with torch.no_grad():
            states = text(ids)[0]
        noise = torch.randn(x.shape, generator=gen, device=device)
        t = torch.randint(0, ac.shape[0], (x.shape[0],), generator=gen, device=device)
        a = ac[t][:, None, None, None]
        noisy = a.sqrt() * x + (1 - a).sqrt() * noise
        with _autocast(device, spec):
            pred = model(noisy, t, states).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - EMA_DECAY)
        return loss

    def run():
        step().item()
        _sync(device)

    _, first = _timed_first(run)
    flops = _torch_flops(step)
    return Job(run, spec.batch, {"params": n_params, "first_s": first, "flops": flops,
                                 "threads": torch.get_num_threads()})


def _torch_flops(fn) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def torch_sample(spec: Spec, compile: bool = False) -> Job:
    """The denoising loop of diffusers' StableDiffusionPipeline (DDIMScheduler, [uncond; cond] in one U-Net call)
    on the U-Net alone (no VAE), under ``torch.inference_mode``; ``torch.compile`` of the U-Net when asked."""
    import torch
    from diffusers import DDIMScheduler

    device = _torch_device(spec)
    unet, text = _torch_models(spec, device)
    unet.eval()
    model = torch.compile(unet) if compile else unet
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    _, _, ids, _, uids, _ = _batch(spec, spec.sample_batch)
    both = torch.from_numpy(np.concatenate([uids, ids]).astype(np.int64)).to(device)
    shape = (spec.sample_batch, spec.in_channels, spec.image_size, spec.image_size)
    seed = [0]

    @torch.inference_mode()
    def run():
        seed[0] += 1
        states = text(both)[0]
        sched.set_timesteps(SAMPLE_STEPS, device=device)
        gen = torch.Generator(device).manual_seed(seed[0])
        latents = torch.randn(shape, generator=gen, device=device) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents] * 2), t)
            with _autocast(device, spec):
                out = model(inp, t, states).sample
            uncond, cond = out.float().chunk(2)
            latents = sched.step(uncond + GUIDANCE * (cond - uncond), t, latents).prev_sample
        _sync(device)
        return latents.cpu()

    _, first = _timed_first(run)
    return Job(run, spec.sample_batch, {"first_s": first, "threads": torch.get_num_threads()})


def matmul_peak(spec: Spec) -> Job:
    """Dense matmul throughput of XLA on this machine in the spec's dtype: 8 chained (n x n) @ (n x n) products
    in one jitted call (n = 1024 on a CPU, 8192 on an accelerator); the FLOP-rate yardstick of the train steps."""
    import jax
    import jax.numpy as jnp

    n, reps = (1024, 8) if jax.default_backend() == "cpu" else (8192, 8)
    dtype = jnp.dtype(spec.dtype)
    a = (jax.random.normal(jax.random.key(0), (n, n), jnp.float32) / np.sqrt(n)).astype(dtype)

    @jax.jit
    def chain(x):
        return jax.lax.fori_loop(0, reps, lambda _, y: y @ a, x)

    x = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    jax.block_until_ready(chain(x))
    return Job(lambda: jax.block_until_ready(chain(x)), 0, {"flops": 2.0 * n ** 3 * reps, "n": n,
                                                            "dtype": spec.dtype})


def xla_convolutions(build: Callable[..., Job]) -> Callable[..., Job]:
    """The job with XLA:CPU's own convolution kernels (``diffjax.xla_cpu``), as diffjax's command line runs: set
    in the job's process before JAX's backend starts. diffusers-Flax gets it too, as a second peer (the flag is
    XLA's, open to any JAX program), beside diffusers-Flax as it ships."""

    def job(spec: Spec) -> Job:
        from diffjax import xla_cpu

        xla_cpu.use_xla_convolutions()
        return build(spec)

    return job


JOBS: dict[str, Callable[..., Job]] = {
    "diffjax train": xla_convolutions(diffjax_train),
    "diffjax train (fashion_mnist config)": xla_convolutions(diffjax_train_fashion_mnist),
    "diffusers-flax train": flax_train,
    "diffusers-flax+xla-conv train": xla_convolutions(flax_train),
    "pytorch train": torch_train,
    "pytorch+compile train": lambda spec: torch_train(spec, compile=True),
    "diffjax Text2Image": xla_convolutions(diffjax_sample),
    "diffjax sampler": xla_convolutions(diffjax_bare_sample),
    "diffusers-flax sample": flax_sample,
    "diffusers-flax+xla-conv sample": xla_convolutions(flax_sample),
    "pytorch sample": torch_sample,
    "pytorch+compile sample": lambda spec: torch_sample(spec, compile=True),
    "matmul peak": matmul_peak,
}
