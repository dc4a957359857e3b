"""Evaluation: the Fréchet distance against closed forms, the classifier's checkpoint round trip, the
class-conditional evaluation of a pipeline, the CLIP score with a local model, and --mode=eval end to end."""

import json
import os

import jax
import numpy as np
import pytest

from fakes import random_text2image

from diffjax import evaluation
from diffjax.evaluation import FeatureStatistics, feature_statistics, frechet_distance


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 16))
    assert frechet_distance(feature_statistics(f), feature_statistics(f)) == pytest.approx(0.0, abs=1e-9)
    # 1-D: (μ1 - μ2)² + (σ1 - σ2)².
    one = frechet_distance(FeatureStatistics(np.array([1.0]), np.array([[4.0]]), 2),
                           FeatureStatistics(np.array([-2.0]), np.array([[9.0]]), 2))
    assert one == pytest.approx(9.0 + 1.0, rel=1e-12)
    # Commuting (diagonal) covariances: ‖Δμ‖² + Σ (√a - √b)².
    a, b = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32)
    mu_a, mu_b = rng.normal(size=32), rng.normal(size=32)
    want = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(FeatureStatistics(mu_a, np.diag(a), 2), FeatureStatistics(mu_b, np.diag(b), 2))
    assert got == pytest.approx(want, rel=1e-10)
    # General covariances: tr(S1 + S2 - 2 (S1 S2)^{1/2}) with the principal square root (scipy), symmetric in
    # its arguments, and invariant to a common rotation of the feature space.
    from scipy import linalg

    s1, s2 = _spd(rng, 24), _spd(rng, 24)
    m1, m2 = rng.normal(size=24), rng.normal(size=24)
    want = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    got = frechet_distance(FeatureStatistics(m1, s1, 2), FeatureStatistics(m2, s2, 2))
    assert got == pytest.approx(want, rel=1e-9)
    assert frechet_distance(FeatureStatistics(m2, s2, 2), FeatureStatistics(m1, s1, 2)) == pytest.approx(got, rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(24, 24)))
    rotated = frechet_distance(FeatureStatistics(q @ m1, q @ s1 @ q.T, 2), FeatureStatistics(q @ m2, q @ s2 @ q.T, 2))
    assert rotated == pytest.approx(got, rel=1e-8)
    # Rank-deficient covariances (fewer samples than dimensions) stay finite and exact: N(0, 0) vs N(0, I).
    assert frechet_distance(FeatureStatistics(np.zeros(8), np.zeros((8, 8)), 2),
                            FeatureStatistics(np.zeros(8), np.eye(8), 2)) == pytest.approx(8.0, rel=1e-12)


def test_feature_statistics_of_samples_converge_to_the_gaussian():
    rng = np.random.default_rng(1)
    d = 8
    sigma = _spd(rng, d)
    mu = rng.normal(size=d)
    x = rng.multivariate_normal(mu, sigma, size=200_000)
    stats = feature_statistics(x)
    np.testing.assert_allclose(stats.mu, mu, atol=0.02)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert frechet_distance(stats, FeatureStatistics(mu, sigma, 2)) < 1e-3
    with pytest.raises(ValueError, match="features must be"):
        feature_statistics(np.zeros((1, 3)))


@pytest.fixture(scope="module")
def fake_data(classifier_config):
    return classifier_config


def test_classifier_checkpoint_round_trip(fake_data, classifier_dir, tmp_path):
    net = evaluation.FeatureNet.from_checkpoint(classifier_dir)
    images, labels = evaluation.load_split(fake_data.data, "test")
    assert images.shape == (20, 8, 8, 1) and images.min() >= -1 and images.max() <= 1
    logits, feats = net.logits_and_features(images)
    assert logits.shape == (20, 10) and feats.shape == (20, 128)
    with open(os.path.join(classifier_dir, "metrics.json")) as f:
        assert json.load(f)["test_accuracy"] == pytest.approx(net.accuracy(images, labels)) == net.test_accuracy
    # Chunked evaluation (padding the last chunk) gives the same numbers as one batch.
    chunked, _ = net.logits_and_features(images, batch_size=7)
    np.testing.assert_allclose(chunked, logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no classifier checkpoint") as e:
        evaluation.FeatureNet.from_checkpoint(str(tmp_path))
    assert "\n" not in str(e.value)


def test_evaluate_text2image_metrics(fake_data, classifier_dir):
    pipe = random_text2image()
    net = evaluation.FeatureNet.from_checkpoint(classifier_dir)
    metrics, images, prompts = evaluation.evaluate_text2image(pipe, fake_data.data, net, images_per_class=2,
                                                              batch_size=10, num_steps=2, progress=False,
                                                              guidance_scale=3.0, guidance_scales=(3.0, 1.0))
    assert images.shape == (20, 8, 8, 1) and len(prompts) == 20
    # Prompts: two per class, label order, cycling the caption templates.
    assert prompts[:2] == ["a photo of a t-shirt", "a t-shirt"] and prompts[-1] == "an ankle boot"
    pred = np.argmax(net.logits_and_features(images)[0], -1)
    labels = np.repeat(np.arange(10), 2)
    assert metrics["conditioning_accuracy"] == pytest.approx(np.mean(pred == labels))
    assert metrics["relative_conditioning_accuracy"] == pytest.approx(
        metrics["conditioning_accuracy"] / metrics["classifier_test_accuracy"])
    assert metrics["fd"] > 0 and metrics["fd_train_floor"] > 0
    from diffjax.data import describe_dataset

    assert list(metrics["per_class_accuracy"]) == list(describe_dataset(fake_data.data).class_names)
    # The sweep: the same prompts and noise at each scale; at the main scale, the main numbers exactly.
    at_main, at_one = metrics["frontier"]
    assert at_main == {"guidance_scale": 3.0, "conditioning_accuracy": metrics["conditioning_accuracy"],
                       "relative_conditioning_accuracy": metrics["relative_conditioning_accuracy"], "fd": metrics["fd"]}
    assert at_one["guidance_scale"] == 1.0 and at_one["fd"] != metrics["fd"]
    # Wordings of one's own (held out from training) instead of the dataset's templates.
    own, _ = evaluation.class_conditioned_prompts(describe_dataset(fake_data.data), 2, ("my {}", "one {} for sale"))
    assert own[:2] == ["my t-shirt", "one t-shirt for sale"] and own[-1] == "one ankle boot for sale"
    with pytest.raises(ValueError, match="prompt_templates must be strings with a '{}' placeholder"):
        evaluation.class_conditioned_prompts(describe_dataset(fake_data.data), 2, ("no slot",))


def test_eval_command_writes_metrics(trainer, classifier_dir, tmp_path, run_main):
    """--mode=eval on a checkpoint: metrics JSON, grid PNG, TensorBoard events, the summary line."""
    from diffjax.checkpoints import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(4, trainer.init(), None, trainer.config)
    ckpt.close()
    proc = run_main(["--mode=eval", f"--workdir={tmp_path}", "--config=experiments/configs/tiny.py",
                     f"--config.evaluation.classifier_workdir={classifier_dir}",
                     "--config.evaluation.images_per_class=1", "--config.evaluation.batch_size=10", "--num_steps=2",
                     "--guidance_scales=1,2,4", "--guidance_interval=0.1,50"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 4: conditioning accuracy" in proc.stdout
    out = tmp_path / "eval" / "step_000004"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 10 and metrics["num_steps"] == 2 and metrics["step"] == 4
    assert (out / "grid.png").is_file() and os.listdir(tmp_path / "tensorboard")
    assert [r["guidance_scale"] for r in metrics["frontier"]] == [1.0, 2.0, 4.0]
    assert metrics["guidance_interval"] == [0.1, 50.0] and metrics["guidance_schedule"] == "constant"
    table = (out / "frontier.md").read_text().splitlines()
    assert table[-1].startswith("| 4 | ") and len([line for line in table if line.startswith("| ")]) == 2 + 3
    assert (out / "frontier.png").stat().st_size > 0
    proc = run_main(["--mode=eval", f"--workdir={tmp_path}", "--config=experiments/configs/tiny.py",
                     f"--config.evaluation.classifier_workdir={classifier_dir}", "--guidance_scales=2,-1"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: --guidance_scales must be finite numbers >= 0, got 2,-1")
    proc = run_main(["--mode=eval", f"--workdir={tmp_path}", "--config=experiments/configs/tiny.py",
                     f"--config.evaluation.classifier_workdir={classifier_dir}", "--guidance_interval=3"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: --guidance_interval must be two noise levels 'sigma_lo,sigma_hi', got '3'")
    proc = run_main(["--mode=eval", f"--workdir={tmp_path}", "--config=experiments/configs/tiny.py",
                     f"--config.evaluation.classifier_workdir={tmp_path}/none"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: no classifier checkpoint")


def test_clip_score_with_a_local_model(tmp_path):
    """The CLIP score's loading code on a small CLIP initialised from a config and saved locally, checked
    against the model's own embeddings."""
    import jax.numpy as jnp
    from fakes import write_local_clip
    from transformers import CLIPProcessor

    clip_dir = str(tmp_path / "clip")
    model = write_local_clip(clip_dir)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    prompts = ["a sneaker", "a bag", "a dress"]
    score = evaluation.clip_score(images, prompts, clip_dir, batch_size=2)
    processor = CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=prompts, images=list(np.repeat(images, 3, -1)), return_tensors="np",
                       padding="max_length", truncation=True, max_length=16)
    features = jax.jit(lambda p, x, ids, m: (model.get_image_features(pixel_values=x, params=p),
                                             model.get_text_features(input_ids=ids, attention_mask=m, params=p)))
    e_i, e_t = features(model.params, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    cos = jnp.sum(e_i * e_t, -1) / (jnp.linalg.norm(e_i, axis=-1) * jnp.linalg.norm(e_t, axis=-1))
    assert score == pytest.approx(float(jnp.mean(100 * jnp.maximum(cos, 0))), rel=1e-5)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        evaluation.clip_score(images, prompts[:2], clip_dir)
