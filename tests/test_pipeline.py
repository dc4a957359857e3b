"""Text2Image: determinism, guidance 1 = conditional model, img2img strength 0/1, inpainting keeps the known
pixels, checkpoint loading, sharding over 8 devices = 1 device, the sample command, bad input."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "train_worker.py")
PROMPTS = ["a photo of a sneaker", "a dress", "an ankle boot", "a bag"]
STEPS = 3


def _env(devices=1):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def random_pipeline(mesh=None):
    """The tiny config's networks with random (non-zero-output) weights, as a Text2Image."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from train_worker import random_text2image

    return random_text2image(mesh)


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline()


def test_same_seed_same_images_any_chunking(pipe):
    a = pipe.generate(PROMPTS, seed=3, num_steps=STEPS)
    assert a.dtype == np.uint8 and a.shape == (4, 8, 8, 1)
    np.testing.assert_array_equal(a, pipe.generate(PROMPTS, seed=3, num_steps=STEPS))
    # Example i's noise depends on (seed, i) only: chunks of one give the same images (up to float rounding).
    one_by_one = pipe.generate(PROMPTS, seed=3, num_steps=STEPS, batch_size=1)
    assert np.abs(a.astype(int) - one_by_one).max() <= 1
    b = pipe.generate(PROMPTS, seed=4, num_steps=STEPS)
    assert np.abs(a.astype(int) - b).mean() > 5
    # The text matters: another prompt for the same noise gives another image.
    c = pipe.generate(["a bag"] * 4, seed=3, num_steps=STEPS)
    assert np.abs(a[:3].astype(int) - c[:3]).mean() > 1


def _initial_noise(seed, n, shape):
    root, _ = jax.random.split(jax.random.PRNGKey(seed))
    return jnp.stack([jax.random.normal(jax.random.fold_in(root, i), shape) for i in range(n)])


def test_guidance_scale_one_is_the_conditional_model(pipe):
    from diffjax import guidance, samplers
    from diffjax.pipeline import to_uint8

    out = pipe.generate(PROMPTS, seed=0, num_steps=STEPS, guidance_scale=1.0, negative_prompt="a shirt")
    enc, models = pipe.models.text_encoder, pipe.models
    cond = enc.encode(pipe.text_params, *enc.tokenize(PROMPTS))
    neg = enc.encode(pipe.text_params, *enc.tokenize(["a shirt"] * 4))
    denoiser = models.denoiser(pipe.unet_params)
    x_T = _initial_noise(0, 4, pipe.image_shape)

    def run(model):
        return to_uint8(jnp.clip(samplers.sample(model, x_T, models.schedule, "dpmpp_2m", STEPS,
                                                 timestep_spacing=pipe.timestep_spacing,
                                                 denoised_fn=guidance.clip_x0), -1, 1))

    conditional = run(lambda x, t: denoiser(x, t, cond))
    cfg_at_one = run(guidance.classifier_free_guidance(denoiser, cond, neg, 1.0))
    assert np.abs(out.astype(int) - conditional).max() <= 1
    assert np.abs(cfg_at_one.astype(int) - conditional).max() <= 1
    guided = pipe.generate(PROMPTS, seed=0, num_steps=STEPS, guidance_scale=4.0, negative_prompt="a shirt")
    assert np.abs(guided.astype(int) - out).mean() > 1


def test_img2img_strength_zero_returns_the_image_and_one_ignores_it(pipe):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    np.testing.assert_array_equal(pipe.img2img(PROMPTS, image, strength=0.0, num_steps=STEPS), image)
    full = pipe.img2img(PROMPTS, image, strength=1.0, num_steps=STEPS, seed=5)
    np.testing.assert_array_equal(full, pipe.generate(PROMPTS, num_steps=STEPS, seed=5))
    # In between, the result stays closer to the input the lower the strength.
    near = pipe.img2img(PROMPTS, image, strength=0.34, num_steps=STEPS, seed=5)
    dist = [np.abs(x.astype(int) - image).mean() for x in (near, full)]
    assert 0 < dist[0] < dist[1]


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler", "ddpm"])
def test_inpainting_keeps_known_pixels(pipe, sampler):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 3:7] = 255  # white: generate
    out = pipe.inpaint(PROMPTS, image, mask, num_steps=STEPS, sampler=sampler, seed=2)
    keep = mask == 0
    for x in out:
        np.testing.assert_array_equal(x[keep], image[keep])
    assert np.abs(out[:, ~keep].astype(int) - image[~keep]).mean() > 5


def test_bad_input_one_line(pipe, tmp_path):
    from diffjax.pipeline import Text2Image

    cases = [
        (lambda: pipe.generate([]), "prompts is empty"),
        (lambda: pipe.generate(["a bag", 3]), "prompts[1] is a int"),
        (lambda: pipe.generate("a bag", height=9), "height=9"),
        (lambda: pipe.img2img("a bag", np.zeros((9, 9, 1), np.uint8)), "image has shape (9, 9, 1)"),
        (lambda: pipe.img2img("a bag", np.zeros((8, 8, 3), np.uint8)), "image has shape (8, 8, 3)"),
        (lambda: pipe.img2img(["a", "b"], np.zeros((3, 8, 8, 1), np.uint8)), "image has shape (3, 8, 8, 1)"),
        (lambda: pipe.img2img("a bag", np.zeros((8, 8, 1), np.uint8), strength=1.5), "strength must be in [0, 1]"),
        (lambda: pipe.inpaint("a bag", np.zeros((8, 8, 1), np.uint8), np.zeros((4, 4))), "mask has shape (4, 4)"),
        (lambda: pipe.generate("a bag", sampler="dpm"), "unknown sampler 'dpm'"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as e:
            call()
            pytest.fail(f"no error for the case {message!r}")
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="no checkpoint in") as e:
        Text2Image.from_checkpoint(str(tmp_path))
    assert "\n" not in str(e.value)


def test_from_checkpoint_restores_the_ema_pipeline(tmp_path):
    """A checkpoint written by training rebuilds the same pipeline (config, networks, EMA parameters) alone."""
    from diffjax.checkpoints import Checkpointer
    from diffjax.pipeline import Text2Image
    from diffjax.train import Trainer

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from train_worker import perturbed, tiny_config

    config = tiny_config()
    trainer = Trainer(config, image_shape=(8, 8, 1))
    state = trainer.init()
    state = state.replace(ema_params=perturbed(state.ema_params, seed=1), params=perturbed(state.params, seed=2))
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(7, state, None, config)
    ckpt.close()
    loaded = Text2Image.from_checkpoint(str(tmp_path))
    assert loaded.step == 7 and loaded.image_shape == (8, 8, 1)
    direct = Text2Image(trainer.models, state.ema_params["unet"], state.text_params(ema=True), (8, 8, 1),
                        sampler=config.sampling.sampler, num_steps=STEPS, guidance_scale=config.sampling.guidance_scale,
                        timestep_spacing=config.sampling.timestep_spacing)
    np.testing.assert_array_equal(loaded.generate(PROMPTS[:2], num_steps=STEPS), direct.generate(PROMPTS[:2]))
    raw = Text2Image.from_checkpoint(str(tmp_path), use_ema=False)
    assert not np.array_equal(raw.generate(PROMPTS[:2], num_steps=STEPS), direct.generate(PROMPTS[:2]))
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 3"):
        Text2Image.from_checkpoint(str(tmp_path), step=3)

    # The command line: PNGs per prompt, and one-line errors.
    proc = subprocess.run([sys.executable, "-m", "experiments.main", "--mode=sample", f"--workdir={tmp_path}",
                           "--prompt=a sneaker", "--prompt=a bag", "--num_images=2", f"--num_steps={STEPS}"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(os.listdir(tmp_path / "generated"))
    assert names == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png", "prompts.json"]
    for args, message in [([f"--workdir={tmp_path}/empty", "--prompt=a bag"], "error: no checkpoint in"),
                          ([f"--workdir={tmp_path}"], "error: --mode=sample needs at least one --prompt")]:
        proc = subprocess.run([sys.executable, "-m", "experiments.main", "--mode=sample", *args], env=_env(),
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]


def test_eight_devices_generate_what_one_device_does(pipe, tmp_path):
    out = tmp_path / "gen.npz"
    proc = subprocess.run([sys.executable, WORKER, "generate", str(out)], env=_env(8), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = np.load(out)
    assert int(res["devices"]) == 8
    prompts = [PROMPTS[i % 4] for i in range(12)]  # 12 images: chunks of 8, the last one padded
    one = pipe.generate(prompts, seed=9, num_steps=STEPS, batch_size=8)
    assert np.abs(res["images"].astype(int) - one).max() <= 1
