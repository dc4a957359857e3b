"""The image–text alignment term (losses, heads, train step) and alignment guidance (pipeline, CLIP)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fakes import flat, perturbed, random_text2image, tiny_config, write_local_clip

from diffjax import guidance, losses
from diffjax import schedules as sch

PROMPTS = ["a photo of a sneaker", "a dress", "an ankle boot", "a bag"]


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_contrastive_loss_equals_its_closed_form():
    u = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
    v = np.array([[2.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    tau = math.log(3.0)
    got = np.asarray(losses.contrastive_alignment_loss(jnp.asarray(u), jnp.asarray(v), tau))
    un, vn = u / np.linalg.norm(u, axis=1, keepdims=True), v / np.linalg.norm(v, axis=1, keepdims=True)
    logits = 3.0 * un @ vn.T
    want = -0.5 * (np.diag(_log_softmax(logits)) + np.diag(_log_softmax(logits.T)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The cosine variant: 1 - cos(u_i, v_i).
    np.testing.assert_allclose(np.asarray(losses.cosine_alignment_loss(jnp.asarray(u), jnp.asarray(v))),
                               1.0 - np.sum(un * vn, axis=1), rtol=1e-5)


def test_contrastive_loss_is_minimal_when_image_and_text_embeddings_align():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(8, 8)))[0][:4]  # 4 orthonormal embeddings
    tau = math.log(20.0)
    aligned = float(jnp.mean(losses.contrastive_alignment_loss(basis, basis, tau)))
    for _ in range(20):
        other = basis + 0.3 * rng.normal(size=basis.shape)
        assert float(jnp.mean(losses.contrastive_alignment_loss(other, basis, tau))) > aligned
    assert float(jnp.mean(losses.contrastive_alignment_loss(basis[::-1], basis, tau))) > aligned + 10
    # The gradient vanishes nowhere but it is ~0 at the aligned optimum for a sharp temperature.
    assert aligned < 1e-6
    # Positives: two examples with the same prompt are not negatives of each other. The target of a row is
    # uniform over its positives; for two identical prompts and identical image embeddings the loss is log 2.
    e = np.stack([basis[0], basis[0], basis[1]])
    pos = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
    per = np.asarray(losses.contrastive_alignment_loss(e, e, math.log(100.0), positives=pos))
    np.testing.assert_allclose(per[:2], math.log(2.0), rtol=1e-4)
    assert per[2] < 1e-6
    ids = jnp.array([[1, 2, 0], [1, 2, 0], [1, 3, 0]])
    np.testing.assert_array_equal(np.asarray(losses.same_prompt(ids)), pos)


def test_dropped_conditions_contribute_nothing():
    rng = np.random.default_rng(1)
    u, v = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    valid = np.array([True, False, True, True, False])
    tau = math.log(10.0)
    per = losses.contrastive_alignment_loss(u, v, tau, valid)
    # Equal to the loss of the valid examples alone; zero for the dropped ones.
    alone = losses.contrastive_alignment_loss(u[valid], v[valid], tau)
    np.testing.assert_allclose(np.asarray(per)[valid], np.asarray(alone), rtol=1e-5)
    assert np.all(np.asarray(per)[~valid] == 0)
    # No gradient reaches the dropped examples' embeddings, and the valid ones' is finite.
    gu, gv = jax.grad(lambda a, b: jnp.sum(losses.contrastive_alignment_loss(a, b, tau, valid)), (0, 1))(u, v)
    assert np.all(np.asarray(gu)[~valid] == 0) and np.all(np.asarray(gv)[~valid] == 0)
    assert np.all(np.isfinite(np.asarray(gu))) and np.abs(np.asarray(gu)[valid]).max() > 0
    gc = jax.grad(lambda a: jnp.sum(losses.cosine_alignment_loss(a, v, valid)))(u)
    assert np.all(np.asarray(gc)[~valid] == 0)


def test_alignment_weight_is_alpha_cumprod():
    schedule = sch.get_schedule("cosine", 1000)
    t = jnp.array([0, 500, 999])
    np.testing.assert_allclose(np.asarray(losses.alignment_weight(schedule, t)),
                               np.asarray(schedule.alphas_cumprod)[[0, 500, 999]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(losses.alignment_weight(schedule, t, "none")), 1.0)
    with pytest.raises(ValueError, match="config.alignment.weighting='snr'"):
        losses.alignment_weight(schedule, t, "snr")


def _aligned_models(weight=0.5, loss="contrastive"):
    from diffjax.build import models_from_config

    config = tiny_config()
    config.alignment.weight, config.alignment.loss = weight, loss
    models, params = models_from_config(config)
    text_params = params["text"]
    return config, models, text_params


def test_the_term_trains_the_denoiser_the_text_encoder_and_the_heads():
    from diffjax.models.alignment import alignment_loss

    config, models, text_params = _aligned_models()
    key = jax.random.PRNGKey(0)
    params = {"unet": perturbed(models.init_denoiser(key, (8, 8))), "text": text_params,
              "alignment": models.alignment.init_params(key, (8, 8, 1))}
    b = 6
    ids, mask = models.text_encoder.tokenize([PROMPTS[i % 4] for i in range(b)])
    x0 = jax.random.uniform(key, (b, 8, 8, 1), minval=-1, maxval=1)
    t = jnp.array([10, 100, 300, 500, 700, 900])
    valid = jnp.array([True, True, False, True, True, True])

    def term(p):
        cond = models.text_encoder.encode(p["text"], ids, mask, trainable=True)
        out = losses.diffusion_loss(key, models.model_fn(p["unet"]), models.schedule, x0, cond, t=t,
                                    prediction_type=models.prediction_type)
        return alignment_loss(models.alignment, p["alignment"], models.schedule, out.x0_pred, cond.pooled, t, valid,
                              positives=losses.same_prompt(ids))

    grads = jax.jit(jax.grad(term))(params)
    for name in ("unet", "text", "alignment"):
        norm = float(optax_norm(grads[name]))
        assert np.isfinite(norm) and norm > 0, name


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree_util.tree_leaves(tree)))


@pytest.fixture(scope="module")
def alignment_trainer():
    """The tiny config with the term (λ = 0.5) on one device: tests/train_worker.py's alignment layout runs."""
    from diffjax.train import Trainer
    from train_worker import layout_config

    return Trainer(layout_config("alignment"))


def test_train_step_adds_lambda_times_the_term(alignment_trainer):
    trainer = alignment_trainer
    state = trainer.init()
    assert set(state.params) == {"unet", "text", "alignment"}
    assert set(state.ema_params) == set(state.params)  # EMA'd like the rest
    rng = np.random.default_rng(0)
    ids, mask = trainer.models.text_encoder.tokenize([PROMPTS[i] for i in rng.integers(0, 4, 8)])
    batch = trainer.shard_batch({"image": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32), "token_ids": ids,
                                 "mask": mask})
    before = jax.device_get(state.params["alignment"])  # the step donates the state
    new, metrics = trainer.step(state, batch)
    m = {k: float(v) for k, v in metrics.items()}
    assert trainer.config.alignment.weight == 0.5
    assert m["loss"] == pytest.approx(m["denoising_loss"] + 0.5 * m["alignment_loss"], rel=1e-5)
    assert m["alignment_loss"] > 0
    moved = optax_norm(jax.tree_util.tree_map(lambda a, b: a - b, jax.device_get(new.params["alignment"]), before))
    assert float(moved) > 0


def test_lambda_zero_is_the_train_step_without_the_term(trainer, fake_config):
    """λ = 0 builds no heads and compiles the very program whatever the rest of ``config.alignment`` says. (A config
    without the section, a run's from before the term, was compared here until the Trainer validated its config:
    it now refuses one with a section missing, tests/test_config.py.)"""
    from diffjax.train import Trainer

    assert trainer.config.alignment.weight == 0 and trainer.models.alignment is None
    other_settings = fake_config.copy_and_resolve_references()
    other_settings.alignment.update(loss="cosine", weighting="none", positives="label", channels=(16,), embed_dim=16,
                                    init_temperature=0.5)
    other = Trainer(other_settings)
    state = trainer.init()
    assert "alignment" not in state.params
    rng = np.random.default_rng(0)
    ids, mask = trainer.models.text_encoder.tokenize([PROMPTS[i] for i in rng.integers(0, 4, 8)])
    batch = trainer.shard_batch({"image": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32), "token_ids": ids,
                                 "mask": mask})
    assert trainer.step.lower(state, batch).as_text() == other.step.lower(state, batch).as_text()


def test_the_term_shards_like_the_rest(multi_device, alignment_trainer):
    """With the term (a contrastive loss over the whole global batch), one device, 4 devices and data 2 × fsdp 2
    train to the same parameters, heads included."""
    from test_train import _close
    from train_worker import run_mesh

    res = dict(np.load(os.path.join(multi_device, "layouts_alignment.npz")))
    _, state, _ = run_mesh(None, None, trainer=alignment_trainer)
    res["one_device"] = flat(state.params)
    for key in ("data", "data_fsdp"):
        _close(res[key], res["one_device"])
    assert int(res["fsdp_sharded_leaves"]) > 0


def test_positives_are_same_prompt_same_label_or_none():
    from diffjax.train import alignment_positives

    config = tiny_config()
    ids = jnp.array([[1, 2], [1, 2], [1, 3]])
    batch = {"label": jnp.array([4, 5, 4])}
    np.testing.assert_array_equal(np.asarray(alignment_positives(config.alignment, batch, ids)),
                                  [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    config.alignment.positives = "label"
    np.testing.assert_array_equal(np.asarray(alignment_positives(config.alignment, batch, ids)),
                                  [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    with pytest.raises(ValueError, match="positives='label' needs a labelled dataset"):
        alignment_positives(config.alignment, {}, ids)
    config.alignment.positives = "none"
    assert alignment_positives(config.alignment, batch, ids) is None


def test_bad_alignment_config_fails_in_one_line():
    from diffjax.models.alignment import heads_from_config

    config = tiny_config()
    ac = config.alignment
    for key, value, message in [("weight", -0.1, "config.alignment.weight must be a finite number >= 0"),
                                ("loss", "l2", "config.alignment.loss='l2'"),
                                ("positives", "class", "config.alignment.positives='class'"),
                                ("guidance_scale", -1.0, "config.alignment.guidance_scale must be")]:
        bad = ac.copy_and_resolve_references()
        bad[key] = value
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            heads_from_config(bad, 1, 32)


# ------------------------------------------------------------------------------------------------------
# Alignment guidance.
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_alignment_guidance_shifts_eps_by_minus_s_sigma_grad(prediction_type):
    schedule = sch.get_schedule("cosine", 1000)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 4, 4, 1)), jnp.float32)
    t = jnp.array([100.0, 420.5, 800.0])
    out = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    target = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    model_fn = lambda x_t, t: out  # noqa: E731
    sim = lambda x_t, t: -jnp.sum((x_t - target) ** 2, axis=(1, 2, 3))  # noqa: E731
    s = 0.7
    guided = guidance.alignment_guidance(model_fn, sim, schedule, prediction_type, s)(x, t)
    a, sg = guidance.vp_coefficients(schedule, t)
    eps = sch.eps_from_prediction(out, x, a, sg, prediction_type)
    want_eps = eps - s * sg * (-2.0 * (x - target))
    np.testing.assert_allclose(np.asarray(sch.eps_from_prediction(guided, x, a, sg, prediction_type)),
                               np.asarray(want_eps), rtol=1e-4, atol=1e-4)
    # Scale 0 changes nothing.
    same = guidance.alignment_guidance(model_fn, sim, schedule, prediction_type, 0.0)(x, t)
    np.testing.assert_allclose(np.asarray(same), np.asarray(out), rtol=1e-5, atol=1e-5)
    # α, σ at integer timesteps are the schedule's.
    a_int, s_int = sch.alpha_sigma(schedule, jnp.array([100]), 4)
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(a_int[0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sg[0]), np.asarray(s_int[0]), rtol=1e-5)
    # A zero-SNR endpoint (α = 0): that step is left unguided, and nothing is NaN.
    zero = sch.get_schedule("linear", 1000, rescale_to_zero_snr=True)
    t_end = jnp.array([999.0, 999.0, 500.0])
    guided = guidance.alignment_guidance(model_fn, sim, zero, prediction_type, s)(x, t_end)
    assert np.all(np.isfinite(np.asarray(guided)))
    np.testing.assert_array_equal(np.asarray(guided[:2]), np.asarray(out[:2]))


@pytest.fixture(scope="module")
def aligned_pipe():
    from diffjax.pipeline import Text2Image

    config, models, text_params = _aligned_models()
    key = jax.random.PRNGKey(0)
    base = random_text2image()
    heads = perturbed(models.alignment.init_params(key, (8, 8, 1)), seed=3, scale=0.3)
    return Text2Image(models, base.denoiser_params, base.text_params, (8, 8, 1), sampler="ddim", num_steps=4,
                      guidance_scale=3.0, timestep_spacing=base.timestep_spacing, alignment_params=heads), base


def _heads_similarity(pipe, images, prompts):
    ids, mask = pipe.models.text_encoder.tokenize(prompts)
    cond = pipe.models.text_encoder.encode(pipe.text_params, ids, mask)
    return np.asarray(pipe.models.alignment.similarity(pipe.alignment_params, jnp.asarray(images), cond.pooled))


def test_alignment_guidance_at_scale_zero_changes_nothing_and_scales_share_one_program(aligned_pipe):
    pipe, base = aligned_pipe
    prompts = [PROMPTS[i % 4] for i in range(8)]
    plain = base.generate(prompts, seed=1, sampler="ddim", num_steps=4, guidance_scale=3.0, output_type="float")
    zero = pipe.generate(prompts, seed=1, output_type="float", alignment_guidance_scale=0.0)
    np.testing.assert_array_equal(zero, plain)
    a = pipe.generate(prompts, seed=1, output_type="float", alignment_guidance_scale=0.5)
    b = pipe.generate(prompts, seed=1, output_type="float", alignment_guidance_scale=2.0)
    assert not np.allclose(a, zero) and not np.allclose(a, b)
    guided = [fn for spec, fn in pipe.programs.items() if spec.alignment == "heads"]
    assert len(guided) == 1 and guided[0]._cache_size() == 1  # the scale is traced: no second program


@pytest.mark.parametrize("sampler,options", [("ddim", {}), ("dpmpp_2m", {"use_karras_sigmas": True}),
                                             ("heun", {})])
def test_alignment_guidance_raises_the_similarity_it_follows(aligned_pipe, sampler, options):
    """With any sampler (fractional timesteps too), and with classifier-free guidance (scale 3)."""
    pipe, _ = aligned_pipe
    prompts = [PROMPTS[i % 4] for i in range(16)]
    sims = []
    for s in (0.0, 1.0, 4.0):
        images = pipe.generate(prompts, seed=2, output_type="float", alignment_guidance_scale=s, sampler=sampler,
                               **options)
        sims.append(float(np.mean(_heads_similarity(pipe, images, prompts))))
    assert sims[0] < sims[1] < sims[2], sims


def test_alignment_guidance_with_a_local_clip_raises_the_clip_similarity(aligned_pipe, tmp_path):
    from diffjax.models.clip_guide import CLIPGuide

    _, base = aligned_pipe
    clip_dir = str(tmp_path / "clip")
    write_local_clip(clip_dir)
    pipe = base.with_alignment_clip(clip_dir)
    guide = pipe.alignment_clip
    prompts = [PROMPTS[i % 4] for i in range(8)]
    ids, mask = guide.tokenize(prompts)
    sims = []
    for s in (0.0, 0.05):
        images = pipe.generate(prompts, seed=3, sampler="ddim", num_steps=4, output_type="float",
                               alignment_guidance_scale=s)
        sims.append(float(np.mean(guide.similarity(guide.params, jnp.asarray(images), ids, mask))))
    assert sims[1] > sims[0], sims
    # The preprocessing matches the CLIP processor's on a square image (resize, normalise, NCHW).
    from transformers import CLIPProcessor

    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    want = CLIPProcessor.from_pretrained(clip_dir)(images=[img], return_tensors="np")["pixel_values"]
    got = guide.pixel_values(jnp.asarray(img[None], jnp.float32) / 127.5 - 1.0)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-2)
    with pytest.raises(ValueError, match="cannot load a Flax CLIP model"):
        CLIPGuide.from_pretrained(str(tmp_path / "nothing"))


def test_bad_alignment_guidance_fails_in_one_line(aligned_pipe):
    pipe, base = aligned_pipe
    with pytest.raises(ValueError, match=r"alignment_guidance_scale must be a finite number >= 0 \(0: off\), got -1"):
        pipe.generate(["a bag"], alignment_guidance_scale=-1.0)
    with pytest.raises(ValueError, match="needs alignment heads .* and this model has neither"):
        base.generate(["a bag"], alignment_guidance_scale=1.0)


def test_heads_are_exported_and_loaded_with_the_model_folder(aligned_pipe, tmp_path):
    from diffjax.pipeline import Text2Image

    pipe, _ = aligned_pipe
    folder = pipe.save_pretrained(str(tmp_path / "model"))
    loaded = Text2Image.from_pretrained(folder)
    assert loaded.models.alignment.config == pipe.models.alignment.config
    for a, b in zip(jax.tree_util.tree_leaves(loaded.alignment_params), jax.tree_util.tree_leaves(pipe.alignment_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    prompts = PROMPTS[:2]
    np.testing.assert_allclose(loaded.generate(prompts, seed=4, alignment_guidance_scale=1.0, output_type="float"),
                               pipe.generate(prompts, seed=4, alignment_guidance_scale=1.0, output_type="float"),
                               atol=1e-5)


@pytest.mark.trains("the command line trains with the alignment term")
def test_the_term_trains_checkpoints_exports_and_guides_from_the_command_line(fake_config, trainer, tmp_path, run_main,
                                                                             last_error_line):
    from diffjax.checkpoints import Checkpointer
    from diffjax.pipeline import Text2Image

    data = [f"--config.data.manual_dir={fake_config.data.manual_dir}",
            f"--config.data.data_dir={fake_config.data.data_dir}"]
    tiny = ["--config=experiments/configs/tiny.py", *data]
    # The config of alignment_trainer (λ = 0.5, Adam's ε = 1e-4): its step, compiled above, comes from the cache.
    proc = run_main([*tiny, f"--workdir={tmp_path}/run", "--config.alignment.weight=0.5", "--config.optim.eps=1e-4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The checkpoint holds the heads (raw and EMA); the pipeline of the run restores the EMA ones.
    pipe = Text2Image.from_checkpoint(f"{tmp_path}/run")
    ckpt = Checkpointer.existing(f"{tmp_path}/run/checkpoints")
    restored = ckpt.restore_subtree({"ema_params": {"alignment": pipe.models.abstract_params()["alignment"]}},
                                    ckpt.latest_step())
    ckpt.close()
    for a, b in zip(jax.tree_util.tree_leaves(pipe.alignment_params),
                    jax.tree_util.tree_leaves(restored["ema_params"]["alignment"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    proc = run_main(["--mode=export", f"--workdir={tmp_path}/run", f"--out={tmp_path}/model"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "model" / "alignment" / "diffusion_params.safetensors").is_file()
    proc = run_main(["--mode=sample", f"--model={tmp_path}/model", "--prompt=a bag", "--num_steps=2",
                     "--alignment_guidance_scale=2", f"--out={tmp_path}/images"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "images" / "0000.png").stat().st_size > 0

    # Bad input: one line each, before anything is trained or sampled.
    proc = run_main([*tiny, f"--workdir={tmp_path}/a", "--config.alignment.weight=-1"])
    assert last_error_line(proc) == "error: config.alignment.weight must be a finite number >= 0 (0: off), got -1.0"
    assert not (tmp_path / "a" / "checkpoints").exists()
    proc = run_main(["--mode=sample", f"--model={tmp_path}/model", "--prompt=a bag", "--alignment_guidance_scale=-1",
                     f"--out={tmp_path}/bad"])
    assert last_error_line(proc) == "error: --alignment_guidance_scale must be a finite number >= 0 (0: off), got -1.0"
    from fakes import write_image_folder

    (tmp_path / "folder").mkdir()
    captions = write_image_folder(str(tmp_path / "folder"), size=8, n=8)
    proc = run_main(["--config=experiments/configs/tiny.py", "--config.data.name=image_folder",
                     f"--config.data.captions_file={captions}", f"--config.data.data_dir={tmp_path}/tfds",
                     "--config.data.channels=3", "--config.model.unet.in_channels=3", f"--workdir={tmp_path}/b",
                     "--config.data.train_split=train", "--config.data.eval_split=train",
                     "--config.alignment.weight=0.1", "--config.alignment.positives=label"])
    assert last_error_line(proc) == ("error: config.alignment.positives='label' needs a labelled dataset; "
                                     "'image_folder' has no labels (use 'prompt')")
    ckpt = Checkpointer(f"{tmp_path}/plain/checkpoints")  # a run without the term (its initial state)
    ckpt.save(1, trainer.init(), None, trainer.config)
    ckpt.close()
    proc = run_main(["--mode=sample", f"--workdir={tmp_path}/plain", "--prompt=a bag", "--alignment_guidance_scale=1"])
    assert last_error_line(proc) == ("error: alignment_guidance_scale=1 needs alignment heads (train with "
                                     "config.alignment.weight > 0) or a CLIP (Text2Image.with_alignment_clip, "
                                     "--alignment_clip), and this model has neither")
