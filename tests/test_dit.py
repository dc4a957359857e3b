"""Tests of diffjax.models.dit: the Diffusion Transformer beside the U-Net (tiny configs, 8x8-16x16 images)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import xla_cpu
from diffjax.models.dit import DIT_PRESETS, DiT, DiTConfig, dit_preset, patchify, sincos_pos_embed_2d, unpatchify
from diffjax.models.layers import count_params

B, L = 2, 6


def _inputs(cfg, h=8, w=8, seed=0):
    """Host-side random inputs: sample 0 has 4 real tokens then padding, sample 1 has 2."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((B, h, w, cfg.in_channels), np.float32))
    t = jnp.array([3.0, 517.5])
    text = jnp.asarray(rng.standard_normal((B, L, cfg.context_dim), np.float32))
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=bool)
    return x, t, text, mask


def _random_params(cfg, x, t, text, mask, scale=0.3, seed=7):
    """Random values in the init's shapes (abstract init: nothing to compile), so that the zero-initialised
    modulations and output layers are alive."""
    shapes = jax.eval_shape(lambda k: DiT(cfg).init(k, x, t, text, mask), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def tiny():
    cfg = dit_preset("tiny")
    x, t, text, mask = _inputs(cfg)
    return cfg, _random_params(cfg, x, t, text, mask), jax.jit(DiT(cfg).apply)


@pytest.mark.parametrize("patch, h, w, extra", [
    (1, 4, 4, {}),
    (2, 8, 12, {"learn_sigma": True}),
    (4, 16, 8, {"dtype": "bfloat16", "remat": True}),
    (2, 6, 10, {"pooled_dim": 12, "num_classes": 10, "out_channels": 2, "base_grid_size": 4}),
])
def test_output_shape_equals_input_shape(patch, h, w, extra):
    cfg = dit_preset("tiny", patch_size=patch, **extra)
    x, t, text, mask = _inputs(cfg, h, w)
    kwargs = {}
    if cfg.pooled_dim:
        kwargs["pooled"] = jnp.ones((B, cfg.pooled_dim))
    if cfg.num_classes:
        kwargs["labels"] = jnp.array([1, 7])

    def run(key):
        variables = DiT(cfg).init(key, x, t, text, mask, **kwargs)
        return variables, DiT(cfg).apply(variables, x, t, text, mask, **kwargs)

    variables, out = jax.eval_shape(run, jax.random.key(0))
    channels = cfg.prediction_channels * (2 if cfg.learn_sigma else 1)
    assert out.shape == (B, h, w, channels) and cfg.output_channels == channels
    assert out.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))


def test_zero_output_at_init():
    cfg = dit_preset("tiny")
    x, t, text, mask = _inputs(cfg)
    model = DiT(cfg)
    out = jax.jit(lambda k: model.apply(model.init(k, x, t, text, mask), x, t, text, mask))(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_prediction_depends_on_the_text_and_not_on_its_padding(tiny):
    cfg, params, apply = tiny
    x, t, text, mask = _inputs(cfg)
    out = apply(params, x, t, text, mask)
    assert float(jnp.abs(out).max()) > 0.1
    rng = np.random.default_rng(5)
    # Other real tokens: every sample's prediction changes.
    other = text.at[:, :2].set(jnp.asarray(rng.standard_normal((B, 2, cfg.context_dim), np.float32)))
    assert float(jnp.abs(apply(params, x, t, other, mask) - out).max(axis=(1, 2, 3)).min()) > 1e-3
    # Anything in the padded positions: nothing changes.
    garbage = np.asarray(text).copy()
    garbage[~np.asarray(mask)] = 1e3 * rng.standard_normal((int((~mask).sum()), cfg.context_dim))
    np.testing.assert_allclose(apply(params, x, t, jnp.asarray(garbage), mask), out, rtol=0, atol=1e-5)
    # A sample without any real token is the model without text, and is finite.
    empty = apply(params, x, t, text, mask.at[1].set(False))
    uncond = jax.jit(lambda p: DiT(cfg).apply(p, x, t))(params)
    np.testing.assert_allclose(empty[1], uncond[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(empty[0], out[0], rtol=0, atol=1e-6)


def test_attention_implementations_agree(tiny):
    cfg, params, apply = tiny
    x, t, text, mask = _inputs(cfg)
    mask = mask.at[1].set(False)
    out = apply(params, x, t, text, mask)
    out_dpa = jax.jit(DiT(cfg.replace(attention_impl="xla")).apply)(params, x, t, text, mask)
    assert bool(jnp.isfinite(out_dpa).all())
    np.testing.assert_allclose(out_dpa, out, rtol=1e-5, atol=1e-5)


def test_patchify_is_row_major_and_unpatchify_inverts_it():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 6, 12)
    # Token 1 is the patch of rows 0-1, columns 2-3, flattened (row, column, channel).
    np.testing.assert_array_equal(tokens[0, 1], np.asarray(x[0, 0:2, 2:4]).reshape(-1))
    np.testing.assert_array_equal(tokens[1, 4], np.asarray(x[1, 2:4, 2:4]).reshape(-1))
    np.testing.assert_array_equal(unpatchify(tokens, 2, 3, 2), x)


def test_position_embeddings_closed_form_and_interpolation():
    dim = 16
    emb = sincos_pos_embed_2d(dim, 3, 5)
    assert emb.shape == (15, dim)
    # Token (row 2, column 3): first half encodes x = 3, second half y = 2: [sin(pω), cos(pω)], ω_i = 10^(-4i/4).
    omega = 1.0 / 10000.0 ** (np.arange(4) / 4.0)
    expect = np.concatenate([np.sin(3 * omega), np.cos(3 * omega), np.sin(2 * omega), np.cos(2 * omega)])
    np.testing.assert_allclose(emb[2 * 5 + 3], expect, rtol=1e-6, atol=1e-7)
    # A grid twice as fine on the same base spans the same positions: token (2i, 2j) of the 8x8 grid is token
    # (i, j) of the 4x4 grid, and the tokens between them lie at half positions.
    base = sincos_pos_embed_2d(dim, 4, 4, base_grid_size=4)
    fine = sincos_pos_embed_2d(dim, 8, 8, base_grid_size=4).reshape(8, 8, dim)
    np.testing.assert_allclose(fine[::2, ::2].reshape(16, dim), base, rtol=1e-6, atol=1e-7)
    half = np.concatenate([np.sin(0.5 * omega), np.cos(0.5 * omega), np.sin(0 * omega), np.cos(0 * omega)])
    np.testing.assert_allclose(fine[0, 1], half, rtol=1e-6, atol=1e-7)
    # The model runs at another resolution than the base, on interpolated positions.
    cfg = dit_preset("tiny", base_grid_size=4)
    x, t, text, mask = _inputs(cfg, 16, 16)
    out = jax.eval_shape(lambda p: DiT(cfg).apply(p, x, t, text, mask), _random_params(cfg, *_inputs(cfg)))
    assert out.shape == (B, 16, 16, 3)


def test_remat_changes_the_saved_activations_not_the_values():
    """remat per block: the same loss and gradients, the residuals saved for the backward pass shrink by more than
    5x, and the compiled program's temporaries (compiled as the Trainer compiles its step, with
    ``xla_cpu.compiler_options``, which keeps XLA:CPU from merging the recomputation back) by more than 2x."""
    cfg = dit_preset("tiny", hidden_size=64, depth=3, num_heads=4)
    x, t, text, mask = _inputs(cfg, 16, 16)
    params = _random_params(cfg, x, t, text, mask, scale=0.1)
    x, t, text, mask = (jnp.concatenate([a] * 4) for a in (x, t, text, mask))  # batch 8: activations dominate

    def loss_fn(c):
        return lambda p, x_: jnp.mean((DiT(c).apply(p, x_, t, text, mask) - 0.5) ** 2)

    def residual_bytes(c):
        vjp = jax.eval_shape(lambda p, x_: jax.vjp(loss_fn(c), p, x_)[1], params, x)
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(vjp))

    remat = cfg.replace(remat=True)
    assert residual_bytes(remat) * 5 < residual_bytes(cfg), (residual_bytes(remat), residual_bytes(cfg))
    plain = jax.jit(jax.value_and_grad(loss_fn(cfg))).lower(params, x).compile()
    options = xla_cpu.compiler_options(jax.default_backend())
    kept = jax.jit(jax.value_and_grad(loss_fn(remat)), compiler_options=options).lower(params, x).compile()
    temps = [c.memory_analysis().temp_size_in_bytes for c in (plain, kept)]
    assert temps[1] * 2 < temps[0], temps
    loss, grads = plain(params, x)
    loss_r, grads_r = kept(params, x)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for g, g_r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_r)):
        np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=1e-6)
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grads)) > 0


def test_presets_have_the_papers_sizes():
    """DiT-S/2, B/2, L/2, XL/2 as Peebles & Xie 2023 (class-conditional on 1000 classes + the null class,
    learned sigma, 32x32x4 latents): 33M, 130M, 458M and 675M parameters."""
    x = jnp.zeros((1, 32, 32, 4))
    counts = {}
    for name, millions in (("S/2", 33), ("B/2", 130), ("L/2", 458), ("XL/2", 675)):
        cfg = dit_preset(name, context_dim=None, num_classes=1001, learn_sigma=True)
        shapes = jax.eval_shape(lambda k: DiT(cfg).init(k, x, jnp.zeros((1,)), labels=jnp.zeros((1,), int)),
                                jax.random.key(0))
        counts[name] = count_params(shapes)
        assert abs(counts[name] / 1e6 - millions) < 1.0, counts
    assert set(DIT_PRESETS) >= {"tiny", "fashion_mnist", "S/2", "B/2"}


def test_bad_configs_and_inputs_fail_with_one_line():
    with pytest.raises(ValueError, match=r"unknown DiT preset 'Z/2'; valid presets: tiny, fashion_mnist"):
        dit_preset("Z/2")
    with pytest.raises(ValueError, match="num_heads 5 does not divide hidden_size 32"):
        dit_preset("tiny", num_heads=5)
    cfg = dit_preset("tiny", patch_size=4)
    x, t, text, mask = _inputs(cfg, 8, 6)
    with pytest.raises(ValueError, match="image size 8x6 is not divisible by the DiT's patch size 4"):
        jax.eval_shape(lambda k: DiT(cfg).init(k, x, t, text, mask), jax.random.key(0))
    assert isinstance(DiTConfig(), DiTConfig)


# --------------------------------------------------------------------------------------------------
# The DiT through the factory, the trainer, the model folder and the pipeline.
# --------------------------------------------------------------------------------------------------


def _dit_config():
    from fakes import tiny_config

    config = tiny_config()
    config.model.name = "dit"
    return config


def test_factory_builds_a_dit_whose_folder_reloads_and_samples_the_same_images(tmp_path):
    from fakes import perturbed

    from diffjax.build import models_from_config
    from diffjax.pipeline import Text2Image

    config = _dit_config()
    models, params = models_from_config(config)
    text_params = params["text"]
    assert isinstance(models.denoiser, DiT) and models.component == "transformer" and models.size_multiple == 2
    assert models.denoiser_config.context_dim == models.text_encoder.hidden_size
    params = perturbed(models.init_denoiser(jax.random.PRNGKey(0), (8, 8)))
    sc = config.sampling
    pipe = Text2Image(models, params, text_params, (8, 8, 1), sampler=sc.sampler, num_steps=sc.num_steps,
                      guidance_scale=sc.guidance_scale, timestep_spacing=sc.timestep_spacing)
    prompts = ["a sneaker", "a bag", "a dress"]
    images = pipe.generate(prompts, seed=3)
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 0
    assert not np.array_equal(images[0], images[1])
    folder = pipe.save_pretrained(str(tmp_path / "dit"))
    index = json.loads((tmp_path / "dit" / "model_index.json").read_text())
    assert index["transformer"] == "transformer" and "unet" not in index
    assert json.loads((tmp_path / "dit" / "transformer" / "config.json").read_text())["patch_size"] == 2
    again = Text2Image.from_pretrained(folder)
    assert isinstance(again.models.denoiser, DiT)
    np.testing.assert_array_equal(again.generate(prompts, seed=3), images)
    with pytest.raises(ValueError, match="height=8, width=7: both must be positive multiples of 2 "
                                         r"\(the DiT patch size\)"):
        again.generate("a bag", width=7)
    assert pipe.generate("a bag", width=6).shape == (1, 8, 6, 1)  # any multiple of the patch


@pytest.mark.trains("the command line trains the DiT")
def test_dit_trains_through_the_command_line_exports_and_samples(fake_config, tmp_path, run_main, last_error_line):
    data = [f"--config.data.manual_dir={fake_config.data.manual_dir}",
            f"--config.data.data_dir={fake_config.data.data_dir}"]
    tiny = ["--config=experiments/configs/tiny.py", "--config.model.name=dit", *data]
    proc = run_main([*tiny, f"--workdir={tmp_path}/run"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_main(["--mode=export", f"--workdir={tmp_path}/run", f"--out={tmp_path}/model"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "transformer"]
    proc = run_main(["--mode=sample", f"--model={tmp_path}/model", "--prompt=a bag", "--num_images=2",
                     f"--out={tmp_path}/images"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "images" / "0001.png").stat().st_size > 0

    # Bad input: one line each, nothing trained.
    proc = run_main([*tiny, f"--workdir={tmp_path}/a", "--config.model.dit.patch_size=3"])
    assert last_error_line(proc) == ("error: config.data.image_size=8 is not a multiple of 3, the DiT's patch size "
                                     "(config.model.dit.patch_size)")
    proc = run_main([*tiny, f"--workdir={tmp_path}/b", "--config.model.name=vit"])
    assert last_error_line(proc) == "error: config.model.name='vit': expected one of unet, dit"
    proc = run_main([*tiny, f"--workdir={tmp_path}/c", "--config.model.dit.preset=Z/2"])
    assert last_error_line(proc).startswith("error: config.model.dit.preset='Z/2': unknown DiT preset")
    proc = run_main([*tiny, f"--workdir={tmp_path}/d", "--config.model.dit.num_heads=3"])
    assert last_error_line(proc) == "error: config.model.dit: DiTConfig: num_heads 3 does not divide hidden_size 32"
    for d in "abcd":
        assert not (tmp_path / d / "checkpoints").exists()


def test_four_devices_data_and_fsdp_match_one_device_for_the_dit(multi_device):
    from test_train import _close

    res = dict(np.load(os.path.join(multi_device, "layouts_dit.npz")))
    assert float(np.max(np.abs(res["one_device"]))) > 0
    for key in ("data", "data_fsdp"):
        _close(res[key], res["one_device"])
    assert int(res["fsdp_sharded_leaves"]) > 0


@pytest.mark.trains("a DiT that learns its variance")
def test_a_learned_variance_dit_trains_its_variance_and_ddpm_samples_with_it():
    from fakes import GLOBAL_BATCH, perturbed

    from diffjax.pipeline import Text2Image
    from diffjax.train import Trainer

    config = _dit_config()
    config.model.dit.learn_sigma = True
    trainer = Trainer(config, image_shape=(8, 8, 1))
    assert trainer.models.learns_variance
    rng = np.random.default_rng(0)
    ids, mask = trainer.models.text_encoder.tokenize(["a bag", "a dress"] * (GLOBAL_BATCH // 2))
    batch = trainer.shard_batch({"image": rng.uniform(-1, 1, (GLOBAL_BATCH, 8, 8, 1)).astype(np.float32),
                                 "token_ids": ids, "mask": mask})
    state = trainer.init()
    for _ in range(2):
        state, metrics = trainer.step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    # The output layer (zero at init) now feeds the variance channels too: per token p·p·2C features, channel fastest.
    kernel = np.asarray(state.params["transformer"]["final_layer"]["linear"]["kernel"]).reshape(-1, 2 * 2, 2)
    assert np.abs(kernel[..., 1]).max() > 0 and np.abs(kernel[..., 0]).max() > 0

    params = perturbed(state.ema_params["transformer"])
    pipe = Text2Image(trainer.models, params, state.text_params(ema=True), (8, 8, 1), num_steps=4)
    learned = pipe.generate(["a bag", "a dress"], sampler="ddpm", seed=1)
    fixed = pipe.generate(["a bag", "a dress"], sampler="ddpm", seed=1, variance_type="fixed_small")
    assert learned.shape == fixed.shape == (2, 8, 8, 1) and not np.array_equal(learned, fixed)
    assert pipe.generate(["a bag"], sampler="dpmpp_2m").shape == (1, 8, 8, 1)  # the variance channels dropped
