"""Training: the TrainState, the pure train step, EMA, the optimizer, and the sharded ``Trainer``.

The step is a pure function ``train_step(state, batch) -> (state, metrics)``. ``jax.jit`` with
``NamedSharding``s (``diffjax.sharding``) runs it on one device, all devices of a host, or a multi-host
mesh; the same function runs under ``jax.pmap`` when built with ``axis_name``.

The randomness of a step is drawn per example from ``fold_in(step_key, global_example_index)``: the
timestep, the noise and the condition dropout of an example do not depend on how the batch is laid out over
devices, so 1 device, 8 devices, data × fsdp and pmap all compute the same update (the tests check this).

Per step (Ho et al. 2020, Algorithm 1, with the text conditioning of Rombach et al. 2022):
  0. for a latent model, the images are encoded by the frozen autoencoder (or its posterior moments come
     precomputed with the batch, ``data.precompute_latents``) and a latent is drawn from its posterior, scaled
     (Rombach et al. 2022, §3): the diffusion runs on z = (E(x) - shift) · scaling;
  1. token ids of a fraction ``cond_drop_prob`` of the examples are replaced by the empty prompt's
     (classifier-free guidance, Ho & Salimans 2021);
  2. the text encoder (frozen: under stop_gradient and outside the optimizer; or trained jointly) gives the
     per-token states, their mask and the pooled embedding;
  3. ``losses.diffusion_loss`` with the sampled t and ε, plus λ · the image–text alignment term on its x̂0 when
     ``config.alignment.weight`` λ > 0 (``diffjax.models.alignment``);
  4. gradients (averaged over devices by the sharded jit, or ``pmean`` under pmap), clipped by global
     norm, AdamW with warmup + cosine decay, and an EMA of the parameters with warmup
     (decay_t = min(decay, (1 + t) / (10 + t)), as in TensorFlow's ExponentialMovingAverage).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffjax import build, losses, posthoc_ema, sharding, xla_cpu
from diffjax.checkpoints import abstract_with_shardings
from diffjax.config import validate
from diffjax.data import describe_dataset
from diffjax.data.latents import LatentEncoder
from diffjax.models.alignment import alignment_loss
from diffjax.models.autoencoder import DiagonalGaussian, encode_latents, scale_latents
from diffjax.models.factory import Models

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array  # int32 scalar
    params: Any  # {"unet" | "transformer": ..., "text": ... (when trained), "alignment": ... (heads)}: what the optimizer updates
    ema_params: Any  # exponential moving average of ``params``
    opt_state: Any
    rng: Array  # uint32[2] key
    frozen: Any  # {"text": ...} when the text encoder is frozen; {"vae": ...}, a latent model's autoencoder
    guard: Any = None  # the skipped-update counters and running loss statistics (init_guard)

    def text_params(self, ema: bool = False):
        params = self.ema_params if ema else self.params
        return params["text"] if "text" in params else self.frozen["text"]


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to ``optim.learning_rate``, then constant or cosine decay to ``end_lr_factor`` × lr at
    ``training.num_steps`` (Loshchilov & Hutter 2017)."""
    oc = config.optim
    warm = max(int(oc.warmup_steps), 0)
    if oc.lr_schedule == "constant":
        after = optax.constant_schedule(oc.learning_rate)
    elif oc.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(oc.learning_rate, max(config.training.num_steps - warm, 1),
                                            alpha=oc.end_lr_factor)
    else:
        raise ValueError(f"config.optim.lr_schedule={oc.lr_schedule!r}: expected 'constant' or 'cosine'")
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, oc.learning_rate, warm), after], [warm])


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping, then AdamW (Loshchilov & Hutter 2019) with the learning-rate schedule."""
    oc = config.optim
    lr = learning_rate_schedule(config)
    parts = []
    if oc.grad_clip_norm and oc.grad_clip_norm > 0:
        parts.append(clip_by_global_norm(oc.grad_clip_norm))
    parts.append(optax.adamw(lr, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay))
    return optax.chain(*parts), lr


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """Global-norm clipping (Pascanu et al. 2013): g <- g * max_norm / ||g|| where ||g|| >= max_norm, as
    ``optax.clip_by_global_norm`` computes it and with its (empty) state, so that optimizer states and checkpoints
    are the same; ``update(..., global_norm=n)`` clips with a norm already computed, which must be the norm of the
    updates it receives: put it first in the chain, on the raw gradients, as :func:`make_optimizer` does (not after
    a scaling, inside ``optax.masked`` or under ``optax.MultiSteps``). The train step passes the norm it computed
    for its guard to an optimizer that takes extra arguments: otherwise XLA sums every gradient's squares a second
    time inside the update's branch (one reduction kernel per parameter array, and a pass over the gradients)."""

    def update_fn(updates, state, params=None, *, global_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if global_norm is None else global_norm
        # One scalar factor, not optax's (g / ||g||) * max_norm per element: XLA:CPU compiled that division as a
        # kernel of its own for every parameter array, where a multiply by a scalar fuses into the optimizer's
        # kernels (253 fewer in the tiny config's step). Equal to optax's result within a rounding.
        norm = jnp.squeeze(norm)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree_util.tree_map(lambda t: t * scale.astype(t.dtype), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def global_norm(tree: Any, concat_below: int = 0) -> Array:
    """||g|| = sqrt(Σ_leaves Σ_elements g²). ``concat_below > 0`` sums the squares of the leaves with fewer elements
    than that as one concatenated vector, and each larger leaf on its own; 0 sums every leaf on its own, as
    ``optax.tree.norm``. XLA:CPU compiles each sum as a kernel of its own (227 fewer kernels in the tiny config's
    step, whose 254 arrays are all small but the token embedding), so the train step concatenates the small
    leaves on the CPU; the copy costs at most the small leaves' size in memory. Only for replicated arrays: a
    concatenation of arrays sharded over an ``fsdp`` axis would gather them first."""
    leaves = jax.tree_util.tree_leaves(tree)
    small = [jnp.ravel(x) for x in leaves if x.size < concat_below]
    sums = [jnp.sum(jnp.square(x)) for x in leaves if x.size >= concat_below]
    if small:
        sums.append(jnp.sum(jnp.square(jnp.concatenate(small))))
    return jnp.sqrt(sum(sums)) if sums else jnp.zeros(())


def ema_decay(step: Array, decay: float, warmup: bool, gamma: Optional[float] = None) -> Array:
    """The EMA's decay at update ``step``: min(decay, (1 + step) / (10 + step)) with warmup, else ``decay``; with
    ``gamma``, Karras et al. (2024)'s power function (1 - 1/(step + 1))^(γ + 1) (``diffjax.posthoc_ema``)."""
    if gamma is not None:
        step = jnp.asarray(step, jnp.float32)
        return (1.0 - 1.0 / (step + 1.0)) ** (gamma + 1.0)
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def init_state(models: Models, image_shape: tuple[int, int, int], external: dict,
               tx: optax.GradientTransformation, rng: Array) -> TrainState:
    """A fresh TrainState (pure: jit it with out_shardings to create it sharded). ``external`` holds the
    parameters that do not come from this initialisation (``build.models_from_config``): the text encoder's, a
    pretrained denoiser's to fine-tune, a latent model's frozen autoencoder's (``"vae"``)."""
    init_rng, state_rng = jax.random.split(rng)
    start = external.get(models.component)
    params = {models.component: start if start is not None
              else models.init_denoiser(init_rng, models.latent_shape(image_shape))}
    frozen = {}
    if models.text_encoder.trainable:
        params["text"] = external["text"]
    else:
        frozen["text"] = external["text"]
    if models.autoencoder is not None:
        frozen["vae"] = external["vae"]
    if models.alignment is not None:  # the alignment heads: trained with the rest (a fine-tuned folder's, or fresh)
        heads_rng = jax.random.fold_in(init_rng, 1)
        start = external.get("alignment")
        params["alignment"] = start if start is not None else models.alignment.init_params(
            heads_rng, models.latent_shape(image_shape))
    ema = jax.tree_util.tree_map(jnp.array, params)  # a copy: donated buffers must be distinct
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema, opt_state=tx.init(params),
                      rng=state_rng, frozen=frozen, guard=init_guard())


# Loss-spike detection (as maxtext's): running mean and variance of the accepted losses, an EMA with this
# decay, armed once this many updates were accepted.
SPIKE_EMA_DECAY = 0.99
SPIKE_WARMUP = 50


def init_guard() -> dict:
    """The counters of skipped updates (int32) and the running loss statistics (float32) of a fresh run."""
    i, f = (lambda v: jnp.asarray(v, jnp.int32)), (lambda v: jnp.asarray(v, jnp.float32))
    return {"skipped": i(0), "nonfinite": i(0), "consecutive": i(0), "last_skipped": i(-1), "accepted": i(0),
            "loss_mean": f(0.0), "loss_var": f(0.0)}


def update_guard(guard: dict, step: Array, loss: Array, grad_norm: Array, spike_sigma: float) -> tuple[Array, dict]:
    """(accept, new guard) for the update of ``step``: an update is skipped when its loss or gradient norm is
    not finite, or (``spike_sigma`` > 0, after SPIKE_WARMUP accepted updates) when its loss exceeds the running
    mean of accepted losses by ``spike_sigma`` running standard deviations. Pure, inside the compiled step:
    no host synchronisation."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    accept = finite
    if spike_sigma > 0:
        armed = guard["accepted"] >= SPIKE_WARMUP
        # The variance EMA starts at 0: divide by 1 - β^(n-1) (as Adam's bias correction) for an unbiased σ.
        correction = 1.0 - SPIKE_EMA_DECAY ** jnp.maximum(guard["accepted"] - 1, 1).astype(jnp.float32)
        std = jnp.sqrt(guard["loss_var"] / correction)
        accept &= ~(armed & (loss > guard["loss_mean"] + spike_sigma * std))
    skip = (~accept).astype(jnp.int32)
    # Running statistics of the accepted losses (the first one seeds the mean).
    b = jnp.where(guard["accepted"] == 0, 0.0, SPIKE_EMA_DECAY)
    safe = jnp.where(accept, loss, guard["loss_mean"]).astype(jnp.float32)
    delta = safe - guard["loss_mean"]
    mean = guard["loss_mean"] + (1.0 - b) * delta
    var = b * (guard["loss_var"] + (1.0 - b) * delta**2)
    new = {"skipped": guard["skipped"] + skip, "nonfinite": guard["nonfinite"] + (~finite).astype(jnp.int32),
           "consecutive": (guard["consecutive"] + 1) * skip,
           "last_skipped": jnp.where(accept, guard["last_skipped"], step + 1).astype(jnp.int32),
           "accepted": guard["accepted"] + (1 - skip),
           "loss_mean": jnp.where(accept, mean, guard["loss_mean"]), "loss_var": jnp.where(accept, var, guard["loss_var"])}
    return accept, new


def _loss_options(dc: ml_collections.ConfigDict, models: Models) -> dict:
    """The ``losses.diffusion_loss`` options of ``config.diffusion``, shared by the train and eval steps; the
    prediction type is the model's (a pretrained model's own, not the config's)."""
    return dict(prediction_type=models.prediction_type, weighting=dc.loss_weighting, min_snr_gamma=dc.min_snr_gamma,
                p2_gamma=dc.p2_gamma, p2_k=dc.p2_k, learned_variance=models.learns_variance)


def _per_example_randomness(step_key: Array, index: Array, shape, num_timesteps: int, drop_prob,
                            sample_t: Optional[Callable[[Array], Array]] = None):
    """t, ε, the condition-dropout flag and the autoencoder's posterior noise of each example from
    fold_in(step_key, global index); ``shape`` is the diffusion's (the latents' for a latent model); t uniform
    over 0..num_timesteps-1 unless ``sample_t(key)`` (``losses.timestep_sampler``) draws it."""
    if sample_t is None:
        sample_t = lambda key: jax.random.randint(key, (), 0, num_timesteps)  # noqa: E731

    def one(i):
        kt, kn, kd, kz = jax.random.split(jax.random.fold_in(step_key, i), 4)
        return (sample_t(kt), jax.random.normal(kn, shape, jnp.float32),
                jax.random.uniform(kd) < drop_prob, jax.random.normal(kz, shape, jnp.float32))

    return jax.vmap(one)(index)


def diffusion_shape(models: Models, batch: dict) -> tuple[int, ...]:
    """The shape of one example the diffusion runs on: the image's, or its latent's."""
    if "latent_mean" in batch:
        return tuple(batch["latent_mean"].shape[1:])
    return tuple(models.latent_shape(batch["image"].shape[1:]))


def diffusion_inputs(models: Models, frozen: dict, batch: dict, posterior_noise: Optional[Array] = None) -> Array:
    """What the diffusion runs on: the batch's images, or for a latent model their scaled latents, drawn from the
    frozen autoencoder's posterior with ``posterior_noise`` (its mean without), under a stop-gradient. The
    posterior's moments are the batch's when precomputed (``latent_mean``, ``latent_logvar``), else the
    autoencoder encodes the images here."""
    if models.autoencoder is None:
        return batch["image"]
    if "latent_mean" in batch:
        posterior = DiagonalGaussian(batch["latent_mean"].astype(jnp.float32), batch["latent_logvar"].astype(jnp.float32))
        return scale_latents(models.autoencoder.config, posterior, posterior_noise)
    return jax.lax.stop_gradient(encode_latents(models.autoencoder, frozen["vae"], batch["image"],
                                                noise=posterior_noise))


def make_train_step(config: ml_collections.ConfigDict, models: Models, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, uncond_ids: Array, uncond_mask: Array,
                    axis_name: Optional[str] = None, norm_concat_below: int = 0) -> Callable:
    """The pure ``train_step(state, batch) -> (state, metrics)``; ``batch`` holds ``image`` (B, H, W, C) in
    [-1, 1], ``token_ids`` (B, L) and ``mask`` (B, L). With ``axis_name`` it runs under ``jax.pmap`` over
    that axis (gradients and metrics averaged with ``pmean``). ``norm_concat_below``: :func:`global_norm`'s
    ``concat_below`` for the gradient's norm (the ``Trainer`` sets it on the CPU with replicated parameters).

    An update whose loss or gradient is not finite (or, with ``training.loss_spike_sigma``, whose loss spikes)
    is skipped inside the compiled step: parameters, EMA and optimizer state stay as they were, the step
    counter and the randomness advance, and ``state.guard`` counts it (``update_guard``); the run decides on
    the host, at its next metrics fetch, whether to go on (``training.on_nonfinite``)."""
    # One piece: the constants read from the config here and the step that closes over them, traced once.
    dc = config.diffusion
    encoder = models.text_encoder
    decay, warmup = float(config.ema.decay), bool(config.ema.warmup)
    gamma = posthoc_ema.config_gamma(config.ema)
    spike_sigma = float(config.training.loss_spike_sigma)
    sample_t = losses.timestep_sampler(models.schedule, dc.get("timestep_sampling", "uniform"),
                                       dc.get("log_normal_mean", -1.2), dc.get("log_normal_std", 1.2))
    ac = config.get("alignment")
    heads = models.alignment

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        b = batch["token_ids"].shape[0]
        step_key, dropout_key, next_rng = jax.random.split(state.rng, 3)
        offset = 0
        if axis_name is not None:
            offset = jax.lax.axis_index(axis_name) * b
            dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))
        t, noise, drop, z_noise = _per_example_randomness(step_key, offset + jnp.arange(b),
                                                          diffusion_shape(models, batch),
                                                          models.schedule.num_timesteps, dc.cond_drop_prob, sample_t)
        x0 = diffusion_inputs(models, state.frozen, batch, z_noise)
        ids, mask = losses.select_condition(drop, (batch["token_ids"], batch["mask"]), (uncond_ids, uncond_mask))

        def loss_fn(params):
            text_params = params["text"] if "text" in params else state.frozen["text"]
            cond = encoder.encode(text_params, ids, mask, trainable=encoder.trainable)
            model_fn = models.model_fn(params[models.component], train=True, dropout_rng=dropout_key,
                                       with_variance=True)
            out = losses.diffusion_loss(step_key, model_fn, models.schedule, x0, cond, t=t, noise=noise,
                                        **_loss_options(dc, models))
            if heads is None:
                return out.loss, {}
            # The image–text alignment term on the model's x̂0 (diffjax.models.alignment), without the dropped
            # prompts; examples with identical prompts (or of the same class) are positives, not negatives.
            positives = alignment_positives(ac, batch, ids)
            align = alignment_loss(heads, params["alignment"], models.schedule, out.x0_pred, cond.pooled, t, ~drop,
                                   ac.loss, ac.weighting, positives)
            return out.loss + float(ac.weight) * align, {"alignment_loss": align, "denoising_loss": out.loss}

        (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            loss = jax.lax.pmean(loss, axis_name)
        grad_norm = global_norm(grads, norm_concat_below)
        accept, guard = update_guard(state.guard, state.step, loss, grad_norm, spike_sigma)
        d = ema_decay(state.step, decay, warmup, gamma)

        def update(old):
            params, ema, opt_state = old
            norm_arg = {"global_norm": grad_norm} if isinstance(tx, optax.GradientTransformationExtraArgs) else {}
            updates, opt_state = tx.update(grads, opt_state, params, **norm_arg)
            params = optax.apply_updates(params, updates)
            ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
            return params, ema, opt_state

        # A skipped update keeps parameters, EMA and optimizer state as they were. A branch rather than a select
        # per array between new and old values: the update then runs in place on the donated state, with no
        # copy and no select kernel per parameter array (a third of the program XLA compiled, and its copies).
        params, ema, opt_state = jax.lax.cond(accept, update, lambda old: old,
                                              (state.params, state.ema_params, state.opt_state))
        if axis_name is not None:
            extra = jax.lax.pmean(extra, axis_name)
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr_schedule(state.step), "ema_decay": d,
                   "skipped_updates": guard["skipped"], **extra}
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                                  rng=next_rng, guard=guard)
        return new_state, metrics

    return train_step


def alignment_positives(alignment_config, batch: dict, token_ids: Array) -> Optional[Array]:
    """(B, B) bool: which examples are positives of each other in the contrastive alignment term
    (``config.alignment.positives``): those with the same token ids (``prompt``), the same ``label`` (``label``;
    the batch must carry labels), or None (``none``: each pair alone)."""
    kind = alignment_config.get("positives", "prompt")
    if kind == "none":
        return None
    if kind == "label":
        if "label" not in batch:
            raise ValueError("config.alignment.positives='label' needs a labelled dataset (batches with 'label')")
        return batch["label"][:, None] == batch["label"][None, :]
    return losses.same_prompt(token_ids)


def make_eval_step(config: ml_collections.ConfigDict, models: Models) -> Callable:
    """``eval_step(state, batch, key) -> loss`` with the EMA parameters and no condition dropout; a fixed key
    makes successive evaluations comparable."""
    dc = config.diffusion

    def eval_step(state: TrainState, batch: dict, key: Array) -> Array:
        t, noise, _, _ = _per_example_randomness(key, jnp.arange(batch["token_ids"].shape[0]),
                                                 diffusion_shape(models, batch), models.schedule.num_timesteps, 0.0)
        x0 = diffusion_inputs(models, state.frozen, batch)
        cond = models.text_encoder.encode(state.text_params(ema=True), batch["token_ids"], batch["mask"],
                                          trainable=False)
        model_fn = models.model_fn(state.ema_params[models.component], with_variance=True)
        return losses.diffusion_loss(key, model_fn, models.schedule, x0, cond, t=t, noise=noise,
                                     **_loss_options(dc, models)).loss

    return eval_step


# ------------------------------------------------------------------------------------------------------
# The sharded steps.
# ------------------------------------------------------------------------------------------------------


class Trainer:
    """The compiled pieces of training, built once from a config (checked first: :func:`diffjax.config.validate`):
    mesh, models, optimizer, and the jitted, sharded ``init``, ``step`` and ``eval_step``.

    The run around them (data, resume, metrics, samples, checkpoints) is ``diffjax.loop.train``; tests and
    notebooks use the parts directly.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh=None, image_shape=None):
        validate(config)  # a one-line ValueError naming the key, before anything is built
        self.config = config
        if image_shape is None:
            if config.data.image_size and config.data.channels:
                image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
            else:  # the dataset's native size: look it up (prepares the dataset if needed)
                image_shape = describe_dataset(config.data, config.data.train_split).image_shape
        self.image_shape = tuple(image_shape)
        self.mesh = sharding.create_mesh(config.sharding.fsdp) if mesh is None else mesh
        sharding.check_batch_size(config.training.batch_size, self.mesh)
        self.models, self._external = build.models_from_config(config)
        if config.data.get("precompute_latents") and self.models.autoencoder is None:
            raise ValueError("data.precompute_latents stores an autoencoder's latents, but this model has none: set "
                             "config.model.autoencoder (or fine-tune a pretrained latent model)")
        f = self.models.size_multiple
        if self.image_shape[0] % f or self.image_shape[1] % f or self.image_shape[2] != self.models.image_channels:
            raise ValueError(f"images of shape {self.image_shape} do not fit the model: height and width must be "
                             f"multiples of {f}, and it takes {self.models.image_channels} channels")
        self.tx, self.lr_schedule = make_optimizer(config)
        self._latent_encoder = None
        uncond_ids, uncond_mask = self.models.text_encoder.tokenize([""])
        self.uncond = (jnp.asarray(uncond_ids), jnp.asarray(uncond_mask))
        platform = self.mesh.devices.flat[0].platform
        step_fn = make_train_step(config, self.models, self.tx, self.lr_schedule, *self.uncond,
                                  norm_concat_below=xla_cpu.norm_concat_below(platform, self.mesh.shape[sharding.FSDP]))
        abstract = jax.eval_shape(self._init_fn, jax.random.PRNGKey(0), self._external)
        self.state_shardings = sharding.state_shardings(self.mesh, abstract)
        self.abstract_state = abstract
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        rep = sharding.replicated(self.mesh)
        self._init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
        self.step = jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
                            out_shardings=(self.state_shardings, rep), donate_argnums=(0,),
                            compiler_options=xla_cpu.compiler_options(platform))
        self.eval_step = jax.jit(make_eval_step(config, self.models),
                                 in_shardings=(self.state_shardings, self.batch_sharding, rep), out_shardings=rep)

    def _init_fn(self, rng, external):
        return init_state(self.models, self.image_shape, external, self.tx, rng)

    def init(self, seed: Optional[int] = None) -> TrainState:
        # Pretrained parameters go to the devices already in the state's layout (by the same shape rule), so a
        # large model is never copied whole onto every device.
        host = jax.tree_util.tree_map(np.asarray, self._external)  # one host copy, sliced per device
        external = jax.tree_util.tree_map(
            lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda index: x[index]),
            host, sharding.state_shardings(self.mesh, host))
        return self._init(jax.random.PRNGKey(self.config.seed if seed is None else seed), external)

    def shard_batch(self, local_batch: dict) -> dict:
        """This process's numpy batch → global arrays sharded over the mesh (only the model inputs)."""
        keys = ("image", "latent_mean", "latent_logvar", "token_ids", "mask")
        if self.models.alignment is not None and self.config.alignment.get("positives") == "label":
            keys += ("label",)
        return sharding.global_batch(self.mesh, {k: local_batch[k] for k in keys if k in local_batch})

    def latent_encoder(self):
        """The frozen autoencoder for precomputing latents into the dataset (``data.precompute_latents``; pass
        it to ``make_dataset(latent_encoder=...)``), or None when the config does not ask for it."""
        if not self.config.data.get("precompute_latents"):
            return None
        if self._latent_encoder is None:
            self._latent_encoder = LatentEncoder(self.models.autoencoder, self._external["vae"])
        return self._latent_encoder

    def restore_target(self):
        return abstract_with_shardings(self.abstract_state, self.state_shardings)
