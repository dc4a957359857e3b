"""Text2Image: determinism, guidance 1 = conditional model, img2img strength 0/1, inpainting keeps the known
pixels, checkpoint loading, sharding over 8 devices = 1 device, the sample command, bad input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fakes import perturbed, random_text2image, tiny_config

PROMPTS = ["a photo of a sneaker", "a dress", "an ankle boot", "a bag"]
STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    return random_text2image()


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
    denoiser = models.model_fn(pipe.denoiser_params)
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


def test_guidance_interval_and_schedule_are_traced_and_bound_the_guidance(pipe, tmp_path):
    """An interval holding every noise level changes nothing; one holding none is the conditional model (run
    alone); moving the interval or the scale compiles nothing new."""
    kw = dict(seed=0, num_steps=STEPS, guidance_scale=4.0)
    guided = pipe.generate(PROMPTS, **kw)
    everywhere = pipe.generate(PROMPTS, guidance_interval=(0.0, float("inf")), **kw)
    assert np.abs(everywhere.astype(int) - guided).max() <= 1
    keys = [k for k in pipe.programs if k.guided and k.guidance_schedule == "constant" and k.guidance_interval]
    fn = pipe.programs[keys[0]]
    programs = fn._cache_size()  # earlier tests may have compiled other batch shapes
    nowhere = pipe.generate(PROMPTS, guidance_interval=(1e6, 2e6), **kw)
    conditional = pipe.generate(PROMPTS, seed=0, num_steps=STEPS, guidance_scale=1.0)
    assert np.abs(nowhere.astype(int) - conditional).max() <= 1
    some = pipe.generate(PROMPTS, guidance_interval="0.5,20", **dict(kw, guidance_scale=6.0))
    assert np.abs(some.astype(int) - guided).mean() > 0.5 and np.abs(some.astype(int) - nowhere).mean() > 0.5
    assert [k for k in pipe.programs if k.guided and k.guidance_schedule == "constant" and k.guidance_interval] == keys
    assert fn._cache_size() == programs  # no new program for another interval or scale
    linear = pipe.generate(PROMPTS, guidance_schedule="linear", **kw)  # a schedule is a program of its own
    assert np.abs(linear.astype(int) - guided).mean() > 0.5
    some_linear = pipe.generate(PROMPTS, guidance_schedule="linear", guidance_interval=(0.5, 20.0),
                                **dict(kw, guidance_scale=6.0))
    # Pipeline defaults, kept by the model folder.
    import copy

    from diffjax.pipeline import Text2Image

    mine = copy.copy(pipe)
    mine.defaults = dict(pipe.defaults, guidance_interval=(0.5, 20.0), guidance_schedule="linear")
    again = Text2Image.from_pretrained(mine.save_pretrained(str(tmp_path / "folder")))
    assert again.defaults["guidance_interval"] == (0.5, 20.0) and again.defaults["guidance_schedule"] == "linear"
    np.testing.assert_array_equal(again.generate(PROMPTS, seed=0, num_steps=STEPS, guidance_scale=6.0), some_linear)
    with pytest.raises(ValueError, match=r"guidance_interval must satisfy 0 <= sigma_lo < sigma_hi, got \(2, 1\)"):
        pipe.generate(PROMPTS, guidance_interval=(2, 1), **kw)
    with pytest.raises(ValueError, match="guidance_schedule must be one of constant, linear, cosine, got 'steep'"):
        pipe.generate(PROMPTS, guidance_schedule="steep", **kw)


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


def test_bfloat16_inference_halves_the_parameters_and_keeps_the_images(pipe, tmp_path):
    """to_dtype("bfloat16"): every floating parameter in bfloat16 (half the bytes), one denoiser evaluation within
    bfloat16's precision of float32's, sampled images close to float32's; a saved bfloat16 folder reloads as
    bfloat16 and samples the same images exactly; bad dtypes get one line."""
    from diffjax.pipeline import Text2Image

    half = pipe.to_dtype("bfloat16")
    for tree in (half.denoiser_params, half.text_params):
        assert {x.dtype for x in jax.tree_util.tree_leaves(tree)} == {jnp.dtype(jnp.bfloat16)}
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    assert nbytes(half.denoiser_params) * 2 == nbytes(pipe.denoiser_params)
    ids, mask = pipe.models.text_encoder.tokenize(PROMPTS)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    t = jnp.array([10, 300, 600, 900])
    outs = []
    for p in (pipe, half):
        cond = p.models.text_encoder.encode(p.text_params, ids, mask, trainable=False)
        outs.append(np.asarray(p.models.model_fn(p.denoiser_params)(x, t, cond), np.float32))
    assert np.abs(outs[1] - outs[0]).max() <= 0.03 * np.abs(outs[0]).max()
    full = pipe.generate(PROMPTS, seed=3, num_steps=STEPS, output_type="float")
    images = half.generate(PROMPTS, seed=3, num_steps=STEPS, output_type="float")
    assert images.dtype == np.float32 and np.abs(images - full).mean() < 0.05
    again = Text2Image.from_pretrained(half.save_pretrained(str(tmp_path / "bf16")))
    assert again.models.denoiser_config.dtype == "bfloat16"
    np.testing.assert_array_equal(again.generate(PROMPTS, seed=3, num_steps=STEPS, output_type="float"), images)
    as_float32 = Text2Image.from_pretrained(str(tmp_path / "bf16"), dtype="float32")
    assert as_float32.models.denoiser_config.dtype == "float32"
    assert {x.dtype for x in jax.tree_util.tree_leaves(as_float32.denoiser_params)} == {jnp.dtype(jnp.float32)}
    with pytest.raises(ValueError, match="must be float32, bfloat16 or float16, got int8"):
        pipe.to_dtype("int8")


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
    (tmp_path / "a_file").write_text("not a run")  # it used to say "no checkpoint ... train first"
    with pytest.raises(NotADirectoryError, match=f"^{tmp_path / 'a_file'} is a file, not a training run's workdir$"):
        Text2Image.from_checkpoint(str(tmp_path / "a_file"))


def test_sampling_flags_are_checked_before_the_model_loads(tmp_path, run_main, last_error_line):
    """A bad sampler, step count, guidance scale or interval is named at once (it used to be named only after the
    model had loaded): here the model folder does not even exist, and the flag's error comes first."""
    base = ["--mode=sample", f"--model={tmp_path}/no_model", "--prompt=a bag", f"--out={tmp_path}/out"]
    for flag, message in [("--sampler=dpm", "error: unknown sampler 'dpm'"),
                          ("--num_steps=0", "error: --num_steps must be a positive integer, got 0"),
                          ("--guidance_scale=-1", "error: --guidance_scale must be a finite number >= 0"),
                          ("--guidance_interval=3,1", "error: --guidance_interval must satisfy 0 <= sigma_lo < sigma_hi")]:
        proc = run_main([*base, flag])
        assert proc.returncode == 2 and last_error_line(proc).startswith(message), (flag, proc.stderr[-500:])
    assert not os.path.exists(tmp_path / "out")


def test_from_checkpoint_restores_the_ema_pipeline(trainer, tmp_path, run_main):
    """A checkpoint written by training rebuilds the same pipeline (config, networks, EMA parameters) alone."""
    from diffjax.checkpoints import Checkpointer
    from diffjax.pipeline import Text2Image

    config = trainer.config
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
    proc = run_main(["--mode=sample", f"--workdir={tmp_path}", "--prompt=a sneaker", "--prompt=a bag",
                     "--num_images=2", f"--num_steps={STEPS}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(os.listdir(tmp_path / "generated"))
    assert names == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png", "prompts.json"]
    for args, message in [([f"--workdir={tmp_path}/empty", "--prompt=a bag"], "error: no checkpoint in"),
                          ([f"--workdir={tmp_path}"], "error: --mode=sample needs at least one --prompt")]:
        proc = run_main(["--mode=sample", *args])
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]


@pytest.fixture(scope="module")
def exported(multi_device):
    """A tiny model trained 3 steps on 4 simulated devices (data 2 x fsdp 2, batch 8), checkpointed and exported
    (tests/train_worker.py)."""
    import pathlib

    return pathlib.Path(multi_device) / "export"


@pytest.mark.process("a process with 3 simulated devices loads the folder")
def test_exported_folder_samples_what_the_checkpoint_does_on_any_device_count(exported, run_worker, tmp_path):
    """The model folder and the training checkpoint give the same images on 4, 3 and 1 devices, although the
    training run's fsdp=2 mesh and batch 8 fit neither of the smaller ones; the 5 prompts go in chunks of 4
    (train_worker.export_images), so on several devices each chunk is split over them and the last one padded."""
    from diffjax.pipeline import Text2Image
    from train_worker import export_images, load_exported

    trained = np.load(exported / "trained.npz")
    assert int(trained["fsdp_split"]) > 0  # the EMA parameters really were split over the fsdp axis
    reference = trained["images"].astype(int)
    assert reference.shape == (5, 8, 8, 1) and reference.std() > 10
    run_worker(["load_exported", exported, tmp_path / "three.npz"], devices=3)
    three = np.load(tmp_path / "three.npz")
    assert int(three["devices"]) == 3
    folder, checkpoint, devices = load_exported(str(exported))
    assert devices == 1
    for images in (three["folder"], three["checkpoint"], folder, checkpoint):
        assert np.abs(images.astype(int) - reference).max() <= 1
    # The folder holds the sampling defaults, the schedule and the token length of the run.
    pipe = Text2Image.from_pretrained(str(exported / "model"))
    config = tiny_config()
    assert pipe.defaults == dict(sampler=config.sampling.sampler, num_steps=config.sampling.num_steps,
                                 guidance_scale=config.sampling.guidance_scale,
                                 guidance_schedule=config.sampling.guidance_schedule, guidance_interval=None,
                                 alignment_guidance_scale=config.alignment.guidance_scale)
    assert pipe.timestep_spacing == config.sampling.timestep_spacing and pipe.image_shape == (8, 8, 1)
    assert pipe.models.text_encoder.max_length == config.text.max_length
    assert pipe.models.scheduler.schedule == config.diffusion.schedule
    np.testing.assert_array_equal(export_images(pipe), folder)


def test_export_command_and_sampling_from_the_folder(exported, tmp_path, run_main, last_error_line):
    out = tmp_path / "model"
    proc = run_main(["--mode=export", f"--workdir={exported / 'run'}", f"--out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["model_index.json", "scheduler", "text_encoder", "unet"]
    assert not [n for n in os.listdir(tmp_path) if n != "model"]  # no temporary folder left beside it
    proc = run_main(["--mode=sample", f"--model={out}", "--prompt=a bag", f"--out={tmp_path / 'images'}",
                     "--num_steps=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "images")) == ["0000.png", "grid.png", "prompts.json"]
    (tmp_path / "file").write_text("x")
    for args, message in [
        ([f"--workdir={exported / 'run'}"], "error: --mode=export needs --out"),
        ([f"--workdir={exported / 'run'}", f"--out={tmp_path / 'file'}"],
         f"error: --out={tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a directory"),
        ([f"--workdir={tmp_path}/none", f"--out={tmp_path}/m2"], "error: no checkpoint in"),
    ]:
        proc = run_main(["--mode=export", *args])
        assert last_error_line(proc).startswith(message), proc.stderr[-2000:]
    assert not (tmp_path / "m2").exists()


def _copy_model(exported, tmp_path):
    import shutil

    target = tmp_path / "model"
    shutil.copytree(exported / "model", target)
    return target


def test_bad_model_folders_fail_with_one_line_naming_the_file(exported, tmp_path):
    import json

    from diffjax.pipeline import Text2Image

    def error(directory, kind=(ValueError, OSError)):
        with pytest.raises(kind) as e:
            Text2Image.from_pretrained(str(directory))
        message = str(e.value)
        assert "\n" not in message
        return message

    (tmp_path / "empty").mkdir()
    assert "is not a diffjax model folder (no model_index.json" in error(tmp_path / "empty")
    assert "no model folder at" in error(tmp_path / "nowhere")
    # A component missing.
    for missing in ("unet/config.json", "unet/diffusion_params.safetensors", "scheduler/scheduler_config.json",
                    "text_encoder/config.json"):
        model = _copy_model(exported, tmp_path)
        os.remove(model / missing)
        assert f"is missing {missing}" in error(model)
        import shutil

        shutil.rmtree(model)
    # Parameters whose shapes do not match the config: the U-Net's, then the text encoder's.
    model = _copy_model(exported, tmp_path)
    cfg = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps(dict(cfg, channels=16, norm_groups=4)))
    message = error(model)
    assert message.startswith(f"{model / 'unet' / 'diffusion_params.safetensors'}: parameter ")
    assert "has shape" in message and "but unet/config.json gives" in message
    (model / "unet" / "config.json").write_text(json.dumps(dict(cfg, num_res_blocks=2)))
    assert "missing parameters" in error(model) and "unet/config.json needs" in error(model)
    (model / "unet" / "config.json").write_text(json.dumps(dict(cfg, chanels=16)))
    assert "unet/config.json: unknown field(s) chanels" in error(model)
    (model / "unet" / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((model / "text_encoder" / "config.json").read_text())
    (model / "text_encoder" / "config.json").write_text(json.dumps(dict(tcfg, intermediate_size=48)))
    message = error(model)
    assert message.startswith(f"{model / 'text_encoder' / 'model.safetensors'}: parameter text_model/")
    assert "but text_encoder/config.json gives" in message
    (model / "text_encoder" / "config.json").write_text(json.dumps(tcfg))
    (model / "unet" / "diffusion_params.safetensors").write_bytes(b"not safetensors")
    assert "diffusion_params.safetensors: not a readable safetensors file" in error(model)
    (model / "model_index.json").write_text("{")
    assert "model_index.json: not readable JSON" in error(model)


def test_sample_command_bad_input_one_line_and_nothing_written(exported, tmp_path, run_main, last_error_line):
    """Each mistake: exit status 2, one `error:` line naming it, no traceback, no output directory."""
    from PIL import Image

    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "nine.png")
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 255
    Image.fromarray(colour).save(tmp_path / "red.png")  # the model's size, but colour for a grey model
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "file").write_text("x")
    model, out = f"--model={exported / 'model'}", tmp_path / "out"
    cases = [
        (["--num_steps=0"], "error: --num_steps must be a positive integer, got 0"),
        (["--guidance_scale=-1"], "error: --guidance_scale must be a finite number >= 0"),
        (["--sampler=dpm"], "error: unknown sampler 'dpm'"),
        ([f"--init_image={tmp_path / 'nine.png'}"], f"error: --init_image {tmp_path / 'nine.png'} is an image of 9x9; "
                                                     f"the model's images are 8x8, grey (--resize resizes"),
        ([f"--init_image={tmp_path / 'red.png'}"], f"error: --init_image {tmp_path / 'red.png'} is a colour image of "
                                                    f"8x8; the model's images are 8x8, grey"),
        ([f"--init_image={tmp_path / 'text.png'}"], "error: cannot identify image file"),
        ([f"--init_image={tmp_path / 'none.png'}"], "error: image file not found"),
        ([f"--mask={tmp_path / 'nine.png'}"], "error: --mask needs --init_image"),
        (["--num_images=0"], "error: --num_images must be >= 1"),
        (["stray"], "error: unexpected arguments: stray"),
        ([f"--out={tmp_path / 'file' / 'images'}"], f"error: --out={tmp_path / 'file' / 'images'}: "),
        ([f"--model={tmp_path}"], f"error: {tmp_path} is not a diffjax model folder"),
    ]
    for args, message in cases:
        proc = run_main(["--mode=sample", model, "--prompt=a bag", f"--out={out}", *args])
        line = last_error_line(proc)
        assert proc.returncode == 2 and line.startswith(message), (args, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr and not out.exists(), args
