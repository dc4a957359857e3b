"""Weights from the diffusers format: U-Net, autoencoder and CLIP text encoder against diffusers' and transformers'
PyTorch models, randomly initialised from small configs (no download), and whole Stable Diffusion pipelines.
Skipped when torch or diffusers is missing."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffjax import diffusers_format  # noqa: E402
from diffjax.models.autoencoder import AutoencoderKL  # noqa: E402
from diffjax.models.unet import UNet  # noqa: E402

RTOL = 1e-5


def _state(module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _close(ours, theirs, rtol=RTOL):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    scale = np.max(np.abs(theirs))
    assert scale > 0
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * scale)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def tiny_vae(**kw):
    torch.manual_seed(0)
    config = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  layers_per_block=2, norm_num_groups=8, sample_size=32)
    config.update(kw)
    return diffusers.AutoencoderKL(**config).eval()


def tiny_unet(**kw):
    torch.manual_seed(1)
    config = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                  norm_num_groups=8)
    config.update(kw)
    return diffusers.UNet2DConditionModel(**config).eval()


def test_autoencoder_encodes_and_decodes_as_diffusers():
    ref = tiny_vae()
    cfg = diffusers_format.vae_config_from_diffusers(dict(ref.config))
    params = diffusers_format.vae_params_from_diffusers(_state(ref), cfg)
    vae = AutoencoderKL(cfg)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32)
    posterior = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(params, x)
    with torch.no_grad():
        theirs = ref.encode(_nchw(x)).latent_dist
        decoded = ref.decode(theirs.mean).sample
    _close(posterior.mean, _nhwc(theirs.mean))
    _close(posterior.logvar, _nhwc(theirs.logvar))
    ours = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(params, posterior.mean)
    _close(ours, _nhwc(decoded))
    assert posterior.mean.shape == (2, 8, 6, 4)


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_unet_predicts_as_diffusers(style):
    kw = {} if style == "sd1" else dict(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    ref = tiny_unet(**kw)
    cfg = diffusers_format.unet_config_from_diffusers(dict(ref.config))
    assert (cfg.num_heads, cfg.head_dim) == ((4, None) if style == "sd1" else (None, 16))
    params = diffusers_format.unet_params_from_diffusers(_state(ref), cfg)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    text = rng.standard_normal((2, 7, 32)).astype(np.float32)
    ours = jax.jit(lambda p: UNet(cfg).apply({"params": p}, x, t, text, np.ones((2, 7), bool)))(params)
    with torch.no_grad():
        theirs = ref(_nchw(x), torch.from_numpy(t), torch.from_numpy(text)).sample
    _close(ours, _nhwc(theirs))


def test_conversion_errors_name_the_key_and_both_shapes():
    ref = tiny_unet()
    cfg = diffusers_format.unet_config_from_diffusers(dict(ref.config))
    state = _state(ref)
    bad = dict(state, **{"conv_in.weight": np.zeros((32, 4, 3, 1), np.float32)})
    with pytest.raises(diffusers_format.ConversionError, match=r"unet: conv_in.weight has shape \(32, 4, 3, 1\) → "
                                                      r"\(3, 1, 4, 32\), but conv_in/kernel has shape \(3, 3, 4, 32\)"):
        diffusers_format.unet_params_from_diffusers(bad, cfg)
    with pytest.raises(diffusers_format.ConversionError, match=r"unknown key add_embedding.linear_1.weight \(8, 8\)"):
        diffusers_format.unet_params_from_diffusers(dict(state, **{"add_embedding.linear_1.weight": np.zeros((8, 8))}), cfg)
    missing = {k: v for k, v in state.items() if k != "mid_block.resnets.1.conv2.bias"}
    with pytest.raises(diffusers_format.ConversionError, match="nothing fills the diffjax parameter.s. mid_res_1/conv2/bias"):
        diffusers_format.unet_params_from_diffusers(missing, cfg)
    with pytest.raises(diffusers_format.ConversionError, match="addition_embed_type='text_time' is not an architecture"):
        diffusers_format.unet_config_from_diffusers(dict(ref.config, addition_embed_type="text_time"))
    with pytest.raises(diffusers_format.ConversionError, match="down_block_types="):
        diffusers_format.unet_config_from_diffusers(dict(ref.config, down_block_types=["CrossAttnDownBlock2D", "Wavelet2D"]))


# --------------------------------------------------------------------------------------------------
# Whole pipelines: diffusers' StableDiffusionPipeline against Text2Image.from_diffusers.
# --------------------------------------------------------------------------------------------------

PROMPTS = ["a photo of a red cube", "an astronaut riding a horse on the moon"]
SCHEDULERS = {
    # SD 1.x: ε-prediction, scaled-linear betas, leading spacing with steps_offset=1, DDIM ending at ᾱ_0.
    "sd1": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon"),
    # SD 2.x-style: v-prediction, zero terminal SNR, trailing spacing.
    "sd2": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing", prediction_type="v_prediction",
                rescale_betas_zero_snr=True),
}


def save_tiny_sd_pipeline(directory, style="sd1"):
    """A randomly initialised Stable Diffusion pipeline of tiny components, saved by diffusers (safetensors)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffjax.text import clip_tokenizer

    torch.manual_seed(2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407)).eval()
    unet_kw = {} if style == "sd1" else dict(attention_head_dim=(2, 4), use_linear_projection=True)
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=text, tokenizer=clip_tokenizer(77), unet=tiny_unet(**unet_kw),
        scheduler=diffusers.DDIMScheduler(**SCHEDULERS[style]), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return pipe


def _initial_latents(pipe, n, seed):
    """Text2Image's x_T: example i starts from normal(fold_in(split(PRNGKey(seed))[0], i)) of the latent shape."""
    root = jax.random.split(jax.random.PRNGKey(seed))[0]
    shape = pipe.models.latent_shape(pipe.image_shape)
    return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(root, i), shape)) for i in range(n)])


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_sampling_equals_diffusers_stable_diffusion_pipeline(style, tmp_path):
    from diffjax.pipeline import Text2Image

    ref = save_tiny_sd_pipeline(tmp_path / "sd", style)
    pipe = Text2Image.from_diffusers(str(tmp_path / "sd"))
    assert pipe.image_shape == (32, 32, 3) and pipe.models.latent_factor == 4
    assert pipe.defaults["sampler"] == "ddim" and pipe.prediction_type == ("eps" if style == "sd1" else "v")
    kw = dict(num_steps=10, guidance_scale=5.0, seed=4)
    latents = pipe.generate(PROMPTS, output_type="latent", **kw)
    images = pipe.generate(PROMPTS, output_type="float", **kw)
    x_T = _initial_latents(pipe, len(PROMPTS), 4)
    with torch.no_grad():
        call = dict(prompt=PROMPTS, num_inference_steps=10, guidance_scale=5.0, latents=_nchw(x_T))
        ref_latents = ref(output_type="latent", **call).images
        ref_images = ref(output_type="np", **call).images  # (x / 2 + 1/2) clamped to [0, 1], NHWC
    _close(latents, _nhwc(ref_latents), rtol=1e-4)
    _close(images, 2.0 * ref_images - 1.0, rtol=1e-4)
    assert np.abs(latents - x_T).max() > 0.1  # the sampler really moved


def test_converted_folder_and_its_re_export_load_identically(tmp_path):
    from diffjax.pipeline import Text2Image

    save_tiny_sd_pipeline(tmp_path / "sd")
    pipe = Text2Image.from_diffusers(str(tmp_path / "sd"))
    first = pipe.save_pretrained(str(tmp_path / "converted"))
    assert sorted(os.listdir(first)) == ["model_index.json", "scheduler", "text_encoder", "unet", "vae"]
    loaded = Text2Image.from_pretrained(first)
    again = Text2Image.from_pretrained(loaded.save_pretrained(str(tmp_path / "re_export")))
    kw = dict(num_steps=3, guidance_scale=4.0, seed=1)
    images = pipe.generate(PROMPTS, **kw)
    np.testing.assert_array_equal(loaded.generate(PROMPTS, **kw), images)
    np.testing.assert_array_equal(again.generate(PROMPTS, **kw), images)
    for a, b in zip(jax.tree_util.tree_leaves((loaded.denoiser_params, loaded.vae_params, loaded.text_params)),
                    jax.tree_util.tree_leaves((again.denoiser_params, again.vae_params, again.text_params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sched = json.loads((tmp_path / "converted" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["sampler_options"]["steps_offset"] == 1 and sched["beta_end"] == 0.012
    # img2img and inpainting through the autoencoder: inpainting keeps the unmasked pixels exactly.
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[8:20, 4:30] = True
    filled = pipe.inpaint(PROMPTS, image, mask, **kw)
    np.testing.assert_array_equal(filled[:, ~mask], np.broadcast_to(image[~mask], (2,) + image[~mask].shape))
    assert np.abs(filled[:, mask].astype(int) - image[mask]).mean() > 5
    edited = pipe.img2img(PROMPTS, image, strength=0.5, **kw)
    assert edited.shape == (2, 32, 32, 3)


@pytest.mark.process("a fresh interpreter shows that torch is never imported")
def test_conversion_reads_no_torch(tmp_path, subprocess_env):
    """Safetensors are read with numpy: the conversion runs where torch cannot be imported."""
    import subprocess
    import sys

    save_tiny_sd_pipeline(tmp_path / "sd")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from diffjax.pipeline import Text2Image\n"
            f"pipe = Text2Image.from_diffusers({str(tmp_path / 'sd')!r})\n"
            f"pipe.save_pretrained({str(tmp_path / 'out')!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "vae" / "diffusion_params.safetensors").is_file()


def test_convert_command_and_bad_folders_one_line_nothing_written(tmp_path, run_main, last_error_line):
    import shutil

    save_tiny_sd_pipeline(tmp_path / "sd")
    proc = run_main(["--mode=convert", f"--diffusers={tmp_path / 'sd'}", f"--out={tmp_path / 'ok'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ok" / "unet" / "diffusion_params.safetensors").is_file()
    proc = run_main(["--mode=sample", f"--model={tmp_path / 'ok'}", "--prompt=a red cube", "--num_steps=2",
                     f"--out={tmp_path / 'images'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "images" / "0000.png").stat().st_size > 0

    def convert(name):
        out = tmp_path / f"out_{name}"
        proc = run_main(["--mode=convert", f"--diffusers={tmp_path / name}", f"--out={out}"])
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".out_{name}")]
        return last_error_line(proc)

    (tmp_path / "empty").mkdir()
    assert convert("empty") == f"error: {tmp_path / 'empty'} is not a diffusers pipeline folder (no model_index.json)"
    shutil.copytree(tmp_path / "sd", tmp_path / "no_vae")
    shutil.rmtree(tmp_path / "no_vae" / "vae")
    assert convert("no_vae").startswith(f"error: {tmp_path / 'no_vae'} is missing vae/")
    shutil.copytree(tmp_path / "sd", tmp_path / "sdxl")
    config = json.loads((tmp_path / "sdxl" / "unet" / "config.json").read_text())
    (tmp_path / "sdxl" / "unet" / "config.json").write_text(json.dumps(dict(config, addition_embed_type="text_time")))
    assert "addition_embed_type='text_time' is not an architecture diffjax converts" in convert("sdxl")
    shutil.copytree(tmp_path / "sd", tmp_path / "wide")
    (tmp_path / "wide" / "unet" / "config.json").write_text(json.dumps(dict(config, layers_per_block=1)))
    line = convert("wide")
    assert line.startswith("error: ") and "unet/diffusion_pytorch_model.safetensors: " in line
    assert "down_blocks.0." in line and "which the diffjax model lacks" in line  # a key the smaller U-Net lacks
    shutil.copytree(tmp_path / "sd", tmp_path / "shape")
    vae_config = json.loads((tmp_path / "shape" / "vae" / "config.json").read_text())
    (tmp_path / "shape" / "vae" / "config.json").write_text(json.dumps(dict(vae_config, latent_channels=8)))
    assert "latent_channels=8, but the U-Net takes in_channels=4" in convert("shape")


@pytest.mark.trains("a Trainer started from a converted diffusers folder")
def test_fine_tuning_starts_from_the_converted_weights(tmp_path):
    from fakes import flat, image_folder_config, write_image_folder

    from diffjax.train import Trainer

    save_tiny_sd_pipeline(tmp_path / "sd", "sd2")
    (tmp_path / "images").mkdir()
    captions = write_image_folder(str(tmp_path / "images"), size=32, n=8)
    config = image_folder_config(captions, tmp_path / "tfds", size=32, pretrained=str(tmp_path / "sd"))
    config.text.trainable = False
    trainer = Trainer(config)
    assert trainer.models.prediction_type == "v" and trainer.models.latent_factor == 4
    converted = diffusers_format.load_diffusers(str(tmp_path / "sd"))[1]
    state = trainer.init()
    np.testing.assert_array_equal(flat(state.params["unet"]), flat(converted["unet"]))
    np.testing.assert_array_equal(flat(state.frozen["vae"]), flat(converted["vae"]))
    rng = np.random.default_rng(0)
    ids, mask = trainer.models.text_encoder.tokenize(["a red square"] * 8)
    batch = trainer.shard_batch({"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32), "token_ids": ids,
                                 "mask": mask})
    state, metrics = trainer.step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert not np.array_equal(flat(state.params["unet"]), flat(converted["unet"]))


def test_scheduler_defaults_follow_the_diffusers_class(caplog):
    """A scheduler config without timestep_spacing gets its class's default (leading for DDIM, DDPM and PNDM,
    linspace for the others); what diffjax does not carry over is named in a warning."""
    base = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for cls, spacing, sampler in [("DDIMScheduler", "leading", "ddim"), ("PNDMScheduler", "leading", "ddim"),
                                  ("DPMSolverMultistepScheduler", "linspace", "dpmpp_2m"),
                                  ("EulerDiscreteScheduler", "linspace", "euler")]:
        _, sampling = diffusers_format.scheduler_from_diffusers(dict(base, _class_name=cls))
        assert (sampling["timestep_spacing"], sampling["sampler"]) == (spacing, sampler), cls
    with caplog.at_level("WARNING"):
        diffusers_format.scheduler_from_diffusers(dict(base, _class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True))
    assert "use_karras_sigmas=True" in caplog.text
