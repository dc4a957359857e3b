# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # diffjax as pure functions inside your own JAX code
#
# Written for Google Colab's TPU runtime as it is in late 2026 (Python 3.12, one TPU v5e chip, no TensorFlow);
# it runs on any runtime, and in CI on a CPU with 2 simulated devices (`DIFFJAX_SMOKE=1`). No dataset, no
# pretrained weights: schedules, the forward process, samplers, the loss and guidance are functions of arrays,
# and any `model_fn(x_t, t)` you write plugs into them.

# %%
import os
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules
SMOKE = os.environ.get("DIFFJAX_SMOKE", "0") == "1"
REPO = os.environ.get("DIFFJAX_REPO", "https://github.com/diffjax/diffjax")
REF = os.environ.get("DIFFJAX_REF", "main")  # the tag or commit to install
if IN_COLAB:
    accel = "tpu" if (os.path.exists("/dev/accel0") or os.environ.get("TPU_ACCELERATOR_TYPE")) else ""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--upgrade-strategy=only-if-needed",
                    f"diffjax[{accel}] @ git+{REPO}@{REF}" if accel else f"diffjax @ git+{REPO}@{REF}"], check=True)

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from diffjax import guidance, losses, samplers, schedules

print("backend:", jax.default_backend(), "| devices:", jax.devices())

# %% [markdown]
# ## A schedule and the forward process
#
# $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$ (Ho et al. 2020, eq. 4), on one image.

# %%
schedule = schedules.get_schedule("cosine", 1000)
yy, xx = np.mgrid[-1:1:32j, -1:1:32j]
image = np.where(np.abs(np.hypot(xx, yy) - 0.6) < 0.15, 1.0, -1.0).astype(np.float32)[None, :, :, None]  # a ring
ts = jnp.array([0, 100, 250, 500, 750, 999])
noise = jax.random.normal(jax.random.PRNGKey(0), (len(ts),) + image.shape[1:])
x_t = schedules.q_sample(schedule, jnp.broadcast_to(image, noise.shape), ts, noise)
fig, axes = plt.subplots(1, len(ts), figsize=(2 * len(ts), 2))
for ax, t, x in zip(axes, ts, x_t):
    ax.imshow(x[..., 0], cmap="gray", vmin=-2, vmax=2)
    ax.set_title(f"t={int(t)}, SNR={float(schedules.snr(schedule, t)):.2g}")
    ax.axis("off")
plt.show()

# The marginal: over many ε, x_t has mean √ᾱ_t x0 and variance 1 - ᾱ_t.
many = jax.random.normal(jax.random.PRNGKey(1), (4096,) + image.shape[1:])
t = 500
samples = schedules.q_sample(schedule, jnp.broadcast_to(image, many.shape), jnp.full((4096,), t), many)
ab = float(schedule.alphas_cumprod[t])
mean_error = float(jnp.abs(samples.mean(0) - np.sqrt(ab) * image[0]).max())
var_error = float(jnp.abs(samples.var(0) - (1 - ab)).max())
print(f"t={t}: max |mean - √ᾱ x0| = {mean_error:.3f}, max |var - (1-ᾱ)| = {var_error:.3f}")

# %% [markdown]
# ## A hand-written `model_fn` under every sampler
#
# For data $x_0 \sim \mathcal N(\mu, s^2 I)$ the ideal denoiser is known in closed form,
# $\mathbb E[x_0 \mid x_t] = \mu + \alpha s^2 (x_t - \alpha\mu) / (\alpha^2 s^2 + \sigma^2)$; every sampler must
# then draw samples with mean μ and standard deviation s. `t` may be fractional (Euler/Heun on Karras σ).

# %%
MU, STD = 0.5, 0.3


def alpha_sigma(t):
    ab = jnp.interp(t, jnp.arange(schedule.num_timesteps), schedule.alphas_cumprod)
    return jnp.sqrt(ab)[:, None, None, None], jnp.sqrt(1 - ab)[:, None, None, None]


def gaussian_model(x, t):  # predicts ε
    a, s = alpha_sigma(t)
    x0 = MU + a * STD**2 * (x - a * MU) / (a**2 * STD**2 + s**2)
    return (x - a * x0) / s


x_T = jax.random.normal(jax.random.PRNGKey(2), (512 if SMOKE else 2048, 4, 4, 1))
results = {}
for name in samplers.SAMPLERS:
    run = jax.jit(lambda x, key, name=name: samplers.sample(gaussian_model, x, schedule, name, num_steps=50, rng=key))
    out = run(x_T, jax.random.PRNGKey(3))
    results[name] = (float(out.mean()), float(out.std()))
    print(f"{name:9s} mean {results[name][0]:.3f} (want {MU}), std {results[name][1]:.3f} (want {STD})")

# %% [markdown]
# ## The loss in a hand-written optax train step
#
# A small Flax network learns to predict v on a toy dataset (rings of random radius); `losses.diffusion_loss`
# draws t and ε from the key and returns the weighted loss (Min-SNR-γ here).

# %%
import flax.linen as nn
import optax


class TinyDenoiser(nn.Module):
    @nn.compact
    def __call__(self, x, t, cond=None):
        temb = jnp.sin(t[:, None] / 1000.0 * jnp.arange(1, 9))  # a crude time embedding
        h = nn.Conv(32, (3, 3))(x) + nn.Dense(32)(temb)[:, None, None, :]
        h = nn.Conv(32, (3, 3))(nn.silu(h))
        return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))


def toy_batch(key, n=32):
    r = jax.random.uniform(key, (n, 1, 1, 1), minval=0.3, maxval=0.8)
    d = jnp.hypot(jnp.asarray(xx, jnp.float32)[None, ::2, ::2, None], jnp.asarray(yy, jnp.float32)[None, ::2, ::2, None])
    return jnp.where(jnp.abs(d - r) < 0.15, 1.0, -1.0)


net = TinyDenoiser()
params = net.init(jax.random.PRNGKey(4), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,)))
tx = optax.adam(3e-3)
opt_state = tx.init(params)


def loss_fn(params, key, x0):
    model_fn = lambda x, t, cond: net.apply(params, x, t)
    return losses.diffusion_loss(key, model_fn, schedule, x0, prediction_type="v", weighting="min_snr").loss


def train_step(params, opt_state, key, x0):
    loss, grads = jax.value_and_grad(loss_fn)(params, key, x0)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


step = jax.jit(train_step)
history = []
for i in range(60 if SMOKE else 500):
    k_data, k_loss = jax.random.split(jax.random.PRNGKey(100 + i))
    params, opt_state, loss = step(params, opt_state, k_loss, toy_batch(k_data))
    history.append(float(loss))
plt.figure(figsize=(5, 2.5))
plt.plot(history)
plt.xlabel("step")
plt.ylabel("loss")
plt.show()

# %% [markdown]
# ## The same step sharded: `jax.jit` with `NamedSharding`, and `pmap`
#
# The batch is split over a `data` axis of every device, the parameters replicated; XLA inserts the gradient
# all-reduce. Under `pmap` the same function averages gradients with `pmean`. All three give the same update.

# %%
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

n = jax.device_count()
mesh = Mesh(np.array(jax.devices()), ("data",))
rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
x0 = toy_batch(jax.random.PRNGKey(7), 8 * n)
key = jax.random.PRNGKey(8)
t_all = jax.random.randint(jax.random.PRNGKey(9), (8 * n,), 0, 1000)
eps_all = jax.random.normal(jax.random.PRNGKey(10), x0.shape)


def loss_given(params, x0, t, eps):  # t and ε given, so that every layout sees the same randomness
    model_fn = lambda x, tt, cond: net.apply(params, x, tt)
    return losses.diffusion_loss(key, model_fn, schedule, x0, t=t, noise=eps, prediction_type="v").loss


def update(params, x0, t, eps):
    grads = jax.grad(loss_given)(params, x0, t, eps)
    return jax.tree_util.tree_map(lambda p, g: p - 1e-2 * g, params, grads)


one = jax.jit(update)(params, x0, t_all, eps_all)
sharded = jax.jit(update, in_shardings=(rep, split, split, split), out_shardings=rep)(
    params, jax.device_put(x0, split), jax.device_put(t_all, split), jax.device_put(eps_all, split))


def update_pmap(params, x0, t, eps):
    grads = jax.lax.pmean(jax.grad(loss_given)(params, x0, t, eps), "d")
    return jax.tree_util.tree_map(lambda p, g: p - 1e-2 * g, params, grads)


per_device = lambda a: a.reshape((n, -1) + a.shape[1:])
pmapped = jax.pmap(update_pmap, axis_name="d", in_axes=(None, 0, 0, 0))(
    params, per_device(x0), per_device(t_all), per_device(eps_all))
pmapped = jax.tree_util.tree_map(lambda a: a[0], pmapped)
diff = lambda a, b: max(float(jnp.abs(u - v).max()) for u, v in zip(jax.tree_util.tree_leaves(a),
                                                                    jax.tree_util.tree_leaves(b)))
print(f"{n} devices: |jit sharded - one device| = {diff(sharded, one):.2e}, |pmap - one device| = "
      f"{diff(pmapped, one):.2e}")

# %% [markdown]
# ## Classifier-free guidance around any model
#
# `guidance.classifier_free_guidance(denoiser, cond, uncond, w)` turns a conditional
# `denoiser(x_t, t, cond)` into the sampler's `model_fn(x_t, t)`: one batched call on [x; x] with [∅; c], then
# $\hat\varepsilon = \varepsilon(x,\varnothing) + w\,(\varepsilon(x,c) - \varepsilon(x,\varnothing))$. The
# scale is traced: changing it does not recompile.

# %%
def toy_conditional(x, t, cond):  # ε of a Gaussian whose mean is the condition
    a, s = alpha_sigma(t)
    mu = cond[:, None, None, None]
    x0 = mu + a * STD**2 * (x - a * mu) / (a**2 * STD**2 + s**2)
    return (x - a * x0) / s


cond, uncond = jnp.full((x_T.shape[0],), 0.8), jnp.zeros((x_T.shape[0],))


@jax.jit
def guided_sample(w):
    model = guidance.classifier_free_guidance(toy_conditional, cond, uncond, w)
    return samplers.sample(model, x_T, schedule, "ddim", num_steps=25)


means = {w: float(guided_sample(w).mean()) for w in (0.0, 1.0, 3.0)}
print("sample mean by guidance scale:", means, "| compiled programs:", guided_sample._cache_size())
x_probe, t_probe = x_T[:4], jnp.full((4,), 500.0)
e_c, e_u = toy_conditional(x_probe, t_probe, cond[:4]), toy_conditional(x_probe, t_probe, uncond[:4])
combined = guidance.classifier_free_guidance(toy_conditional, cond[:4], uncond[:4], 3.0)(x_probe, t_probe)
cfg_error = float(jnp.abs(combined - (e_u + 3.0 * (e_c - e_u))).max())

# %% [markdown]
# ## Checks

# %%
assert mean_error < 0.1 and var_error < 0.1, (mean_error, var_error)
for name, (m, s) in results.items():
    assert abs(m - MU) < 0.05 and abs(s - STD) < 0.05, (name, m, s)
assert np.mean(history[-10:]) < 0.7 * np.mean(history[:10]), (history[:10], history[-10:])
assert diff(sharded, one) < 1e-5 and diff(pmapped, one) < 1e-5
assert cfg_error < 1e-5 and abs(means[1.0] - 0.8) < 0.05 and means[3.0] > means[1.0] > means[0.0]
assert guided_sample._cache_size() == 1
print("all checks passed")
