"""Latent diffusion training: from scratch on a frozen autoencoder (config.model.autoencoder) and fine-tuning a
pretrained latent model (config.model.pretrained), on a captioned RGB image folder; no torch needed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fakes import flat, image_folder_config, perturbed, tiny_config, write_image_folder


@pytest.fixture(scope="module")
def latent_folder(tmp_path_factory):
    """A tiny latent model folder: autoencoder (2x downsampling, 4 latent channels), U-Net, CLIP text encoder."""
    from diffjax.models.autoencoder import AutoencoderKL, vae_preset
    from diffjax.models.factory import Models, SchedulerConfig
    from diffjax.models.unet import UNet, unet_preset
    from diffjax.pipeline import Text2Image
    from diffjax.text import TextEncoder

    encoder, text_params = TextEncoder.from_config("tiny", max_length=16)
    unet = UNet(unet_preset("tiny", in_channels=4, context_dim=encoder.hidden_size))
    vae = AutoencoderKL(vae_preset("tiny", scaling_factor=0.7))
    models = Models(unet, encoder, SchedulerConfig(schedule="scaled_linear", prediction_type="eps"), vae)
    params = models.abstract_params()
    key = jax.random.PRNGKey(0)
    unet_params = perturbed(models.init_denoiser(key, (8, 8)))
    vae_params = perturbed(vae.init(key, jnp.zeros((1, 16, 16, 3)))["params"], seed=3)
    assert jax.tree_util.tree_structure(vae_params) == jax.tree_util.tree_structure(params["vae"])
    pipe = Text2Image(models, unet_params, text_params, (16, 16, 3), num_steps=3, vae_params=vae_params)
    return pipe.save_pretrained(str(tmp_path_factory.mktemp("latent") / "model"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """16 RGB 16x16 images: four colours, one caption each."""
    folder = tmp_path_factory.mktemp("images")
    write_image_folder(str(folder))
    return folder


def _config(image_folder, tmp_path, **model):
    config = image_folder_config(image_folder / "captions.jsonl", tmp_path / "tfds", **model)
    config.model.unet.in_channels = 4
    return config


@pytest.fixture(scope="module")
def latent_trainer(latent_folder, image_folder, tmp_path_factory):
    """A Trainer of a latent U-Net on the frozen tiny autoencoder, with random flips and precomputed latents (its step
    takes batches of images and of stored latents alike); the tests below share its compiled programs."""
    from diffjax.train import Trainer

    config = _config(image_folder, tmp_path_factory.mktemp("latent_run"), autoencoder=latent_folder)
    config.text.trainable, config.data.random_flip, config.data.precompute_latents = False, True, True
    return Trainer(config)


def test_latent_training_from_scratch_encodes_with_the_frozen_autoencoder(latent_trainer, latent_folder):
    from diffjax import build, losses
    from diffjax.data import make_dataset
    from diffjax.models.autoencoder import encode_latents
    from diffjax.train import _per_example_randomness

    trainer, config = latent_trainer, latent_trainer.config
    models = trainer.models
    assert models.autoencoder is not None and models.latent_shape((16, 16, 3)) == (8, 8, 4)
    _, vae_params = build.load_autoencoder(latent_folder)
    it = make_dataset(config.data, models.text_encoder, split="train", global_batch_size=8, seed=0)
    batch = trainer.shard_batch(next(it))
    state = trainer.init()
    np.testing.assert_array_equal(flat(state.frozen["vae"]), flat(vae_params))
    # The held-out loss is the diffusion loss of the autoencoder's scaled posterior means.
    key = jax.random.PRNGKey(5)
    t, noise, _, _ = _per_example_randomness(key, jnp.arange(8), (8, 8, 4), models.schedule.num_timesteps, 0.0)

    @jax.jit  # one program, not the networks op by op
    def expected_loss(unet_params, text_params, images, ids, mask):
        z0 = encode_latents(models.autoencoder, vae_params, images)
        cond = models.text_encoder.encode(text_params, ids, mask)
        return losses.diffusion_loss(key, models.model_fn(unet_params), models.schedule, z0, cond, t=t, noise=noise,
                                     prediction_type="eps", weighting="min_snr").loss

    expect = expected_loss(state.ema_params["unet"], state.text_params(), batch["image"], batch["token_ids"],
                           batch["mask"])
    np.testing.assert_allclose(trainer.eval_step(state, batch, key), expect, rtol=1e-5)
    for _ in range(3):
        state, metrics = trainer.step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    np.testing.assert_array_equal(flat(state.frozen["vae"]), flat(vae_params))  # frozen: not trained


def test_precomputed_latents_give_the_batches_and_the_steps_of_encoding_in_the_step(latent_trainer, latent_folder,
                                                                                   tmp_path):
    """data.precompute_latents: the posterior moments stored once (with those of the mirrored images) make the
    same batches, train step and held-out loss as encoding every batch; built once per autoencoder."""
    from diffjax import build
    from diffjax.data import make_dataset
    from diffjax.data.latents import LatentEncoder, latent_source
    from diffjax.data.sources import load_source

    trainer = latent_trainer
    config = trainer.config.copy_and_resolve_references()
    config.data.data_dir = str(tmp_path / "tfds")  # its own dataset directory: the latents it builds are counted
    models, vae = trainer.models, trainer.models.autoencoder
    encoder = trainer.latent_encoder()
    assert isinstance(encoder, LatentEncoder) and trainer.latent_encoder() is encoder
    kw = dict(split="train", global_batch_size=8, seed=3)
    images = make_dataset(config.data, models.text_encoder, **kw)
    stored = make_dataset(config.data, models.text_encoder, latent_encoder=encoder, **kw)
    built = list((tmp_path / "tfds").glob("captioned_image_folder/*/1.0.0/diffjax_latents/precomputed_latents/*"))
    assert len(built) == 1, built
    _, vae_params = build.load_autoencoder(latent_folder)
    encode = jax.jit(lambda params, x: vae.apply({"params": params}, x, method=vae.encode))
    for _ in range(3):  # the same order, captions and flips; the moments of the (mirrored) image
        a, b = next(images), next(stored)
        assert "image" not in b and b["latent_mean"].shape == (8, 8, 8, 4)
        np.testing.assert_array_equal(a["token_ids"], b["token_ids"])
        posterior = encode(vae_params, a["image"])
        np.testing.assert_allclose(b["latent_mean"], posterior.mean, atol=2e-5)  # other XLA programs
        np.testing.assert_allclose(b["latent_logvar"], posterior.logvar, atol=1e-4)
    # The autoencoder is not flip-equivariant: the mirrored images' moments are their own.
    src = latent_source(load_source(config.data, "train"), config.data, "train", encoder,
                        lambda split: load_source(config.data, split))
    moments = src.source.arrays
    assert not np.allclose(moments["mean"], moments["mean_flipped"][:, :, ::-1], atol=1e-3)
    # The train step and the held-out loss on stored moments equal those of encoding in the step.
    a, b = trainer.shard_batch(a), trainer.shard_batch(b)
    key = jax.random.PRNGKey(1)
    np.testing.assert_allclose(trainer.eval_step(trainer.init(), b, key), trainer.eval_step(trainer.init(), a, key),
                               rtol=1e-5)
    (sa, ma), (sb, mb) = trainer.step(trainer.init(), a), trainer.step(trainer.init(), b)
    np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-5)
    np.testing.assert_allclose(flat(sb.params), flat(sa.params), atol=1e-6)
    # Read from the array_record files (no in-memory copy): the same batch; as float16: the moments rounded.
    in_memory = next(make_dataset(config.data, models.text_encoder, latent_encoder=encoder, **kw))
    config.data.cache_max_mb = 0
    from_files = next(make_dataset(config.data, models.text_encoder, latent_encoder=encoder, **kw))
    for k in ("latent_mean", "latent_logvar"):
        np.testing.assert_array_equal(from_files[k], in_memory[k])
    config.data.latents_dtype = "float16"
    half = next(make_dataset(config.data, models.text_encoder, latent_encoder=encoder, **kw))
    np.testing.assert_array_equal(half["latent_mean"], in_memory["latent_mean"].astype(np.float16).astype(np.float32))
    # Another autoencoder (other weights) gets its own copy; an unchanged one is reused, not rebuilt.
    config.data.latents_dtype = "float32"
    next(make_dataset(config.data, models.text_encoder, latent_encoder=LatentEncoder(vae, perturbed(vae_params)), **kw))
    next(make_dataset(config.data, models.text_encoder, latent_encoder=encoder, **kw))
    now = list((tmp_path / "tfds").glob("captioned_image_folder/*/1.0.0/diffjax_latents/precomputed_latents/*"))
    assert len(now) == 3 and set(built) < set(now), now  # float32, float16, the other autoencoder


def test_precompute_latents_needs_a_latent_model(tmp_path):
    from diffjax.train import Trainer

    config = tiny_config()
    config.data.precompute_latents = True
    with pytest.raises(ValueError, match=r"^data.precompute_latents stores an autoencoder's latents, but this model "
                                         r"has none: set config.model.autoencoder"):
        Trainer(config)


@pytest.mark.trains("the command line fine-tunes a latent model folder")
def test_fine_tuning_a_pretrained_latent_model_trains_exports_and_samples(latent_folder, image_folder, tmp_path,
                                                                          run_main):
    from diffjax import model_folder
    from diffjax.pipeline import Text2Image

    config = _config(image_folder, tmp_path, pretrained=latent_folder)
    flags = [f"--config.model.pretrained={latent_folder}", "--config.text.trainable=False",
             "--config.data.name=image_folder", f"--config.data.captions_file={image_folder / 'captions.jsonl'}",
             f"--config.data.data_dir={config.data.data_dir}", "--config.data.image_size=16",
             "--config.data.channels=3", "--config.data.train_split=train", "--config.data.eval_split=train",
             "--config.training.sample_every=4", "--config.data.precompute_latents=True"]
    proc = run_main(["--config=experiments/configs/tiny.py", f"--workdir={tmp_path}/run", *flags])
    assert proc.returncode == 0, proc.stderr[-3000:]
    latents = list((tmp_path / "tfds").glob("captioned_image_folder/*/1.0.0/diffjax_latents/precomputed_latents/*"))
    assert len(latents) == 1, latents  # the run read its latents from the dataset, encoded once
    assert (tmp_path / "run" / "samples" / "step_000004.png").stat().st_size > 0
    pipe = Text2Image.from_checkpoint(str(tmp_path / "run"))
    _, start, _, _ = model_folder.load(latent_folder)
    assert not np.array_equal(flat(pipe.denoiser_params), flat(start["unet"]))  # fine-tuned from the start
    np.testing.assert_array_equal(flat(pipe.vae_params), flat(start["vae"]))  # the autoencoder stays as it was
    images = pipe.generate(["a red square", "a blue square"], num_steps=3, seed=2)
    assert images.shape == (2, 16, 16, 3)
    again = Text2Image.from_pretrained(pipe.save_pretrained(str(tmp_path / "export")))
    np.testing.assert_array_equal(again.generate(["a red square", "a blue square"], num_steps=3, seed=2), images)
    half = again.to_dtype("bfloat16")  # the U-Net, text encoder and autoencoder all in bfloat16
    assert {x.dtype for x in jax.tree_util.tree_leaves(half.vae_params)} == {jnp.dtype(jnp.bfloat16)}
    full = again.generate(["a red square"], num_steps=3, seed=2, output_type="float")
    assert np.abs(half.generate(["a red square"], num_steps=3, seed=2, output_type="float") - full).mean() < 0.05
    dtypes = lambda tree: {x.dtype for x in jax.tree_util.tree_leaves(tree)}  # noqa: E731
    assert dtypes(again.to_dtype("float16").vae_params) == {jnp.dtype(jnp.float32)}  # SD's VAE overflows in fp16
    # img2img with a strength below one step: nothing to sample, the image's latents (the posterior mean)
    from diffjax.models.autoencoder import encode_latents

    x0 = np.linspace(-1, 1, 16 * 16 * 3, dtype=np.float32).reshape(1, 16, 16, 3)
    latents = again.img2img(["a red square"], x0, strength=0.1, num_steps=3, output_type="latent")
    encode = jax.jit(lambda params, x: encode_latents(again.models.autoencoder, params, x))
    np.testing.assert_allclose(latents, encode(again.vae_params, x0), atol=1e-5)


def test_fine_tuning_a_bfloat16_folder_trains_float32_parameters(latent_folder, image_folder, tmp_path):
    """A folder exported in bfloat16 fine-tunes with float32 parameters (and float32 Adam moments): bfloat16's
    8-bit mantissa would round most small updates away."""
    from diffjax import build
    from diffjax.pipeline import Text2Image

    half = Text2Image.from_pretrained(latent_folder, dtype="bfloat16").save_pretrained(str(tmp_path / "bf16"))
    models, params = build.models_from_config(_config(image_folder, tmp_path, pretrained=half))
    assert models.denoiser_config.param_dtype == "float32" and models.autoencoder.config.param_dtype == "float32"
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {np.dtype(np.float32)}
    assert models.denoiser_config.dtype == "float32"  # the config's compute dtype, not the folder's


def test_latent_configs_bad_input_one_line(latent_folder, image_folder, tmp_path, run_main, last_error_line):
    data = ["--config.data.name=image_folder", f"--config.data.captions_file={image_folder / 'captions.jsonl'}",
            f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.image_size=16", "--config.data.channels=3",
            "--config.data.train_split=train", "--config.data.eval_split=train"]
    base = ["--config=experiments/configs/tiny.py", *data]
    proc = run_main([*base, f"--workdir={tmp_path}/a", f"--config.model.autoencoder={latent_folder}"])
    assert last_error_line(proc) == (f"error: config.model.autoencoder {latent_folder}: latent_channels=4, but "
                                     f"config.model.unet.in_channels=1")
    proc = run_main([*base, f"--workdir={tmp_path}/b", f"--config.model.autoencoder={latent_folder}",
                     f"--config.model.pretrained={latent_folder}"])
    assert last_error_line(proc) == ("error: config.model.pretrained brings its own autoencoder: leave "
                                     "config.model.autoencoder empty")
    proc = run_main([*base, f"--workdir={tmp_path}/c", f"--config.model.pretrained={tmp_path}/nowhere"])
    assert last_error_line(proc).startswith(f"error: {tmp_path}/nowhere: no such directory")
    proc = run_main([*base, f"--workdir={tmp_path}/d", f"--config.model.pretrained={latent_folder}",
                     "--config.data.image_size=10"])
    assert last_error_line(proc) == ("error: images of shape (10, 10, 3) do not fit the model: height and width "
                                     "must be multiples of 4, and it takes 3 channels")
    for d in "abcd":
        assert not (tmp_path / d / "checkpoints").exists()
