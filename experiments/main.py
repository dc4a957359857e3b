"""Launch an experiment from an ml_collections config.

    # train (resumes from the latest checkpoint in --workdir if there is one)
    python -m experiments.main --config=experiments/configs/fashion_mnist.py --workdir=runs/fmnist \
        [--config.training.batch_size=64 ...]
    # the feature network of the Fashion-MNIST metrics
    python -m experiments.main --mode=train_classifier --config=experiments/configs/fashion_mnist_classifier.py \
        --workdir=runs/fashion_mnist_classifier
    # metrics of a trained run: conditioning accuracy, Fréchet distance (+ FID / CLIP score with weights)
    python -m experiments.main --mode=eval --workdir=runs/fmnist [--config=... --config.evaluation.images_per_class=100]
    # images from prompts (text-to-image, or image-to-image with --init_image, inpainting with --mask)
    python -m experiments.main --mode=sample --workdir=runs/fmnist --prompt="a sneaker" --prompt="a bag"
    # a self-contained model folder (EMA parameters, one JSON config per component), and sampling from it
    python -m experiments.main --mode=export --workdir=runs/fmnist --out=models/fmnist
    python -m experiments.main --mode=sample --model=models/fmnist --prompt="a sneaker" --out=images/
    # a diffusers Stable Diffusion folder or Hub id converted to a diffjax model folder (then --mode=sample --model)
    python -m experiments.main --mode=convert --diffusers=stable-diffusion-v1-5/stable-diffusion-v1-5 --out=models/sd15

Several processes (a TPU pod slice, or several GPU hosts) are joined through ``jax.distributed`` when the
environment configures them (see ``diffjax.sharding.initialize_distributed``).
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/configs/*.py); --mode=eval "
                                "reads only its 'evaluation' section (default: diffjax.config.get_config()'s).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events, samples and metrics.")
flags.DEFINE_enum("mode", "train", ["train", "train_classifier", "eval", "sample", "export", "convert"],
                  "What to run.")
flags.DEFINE_string("diffusers", None, "convert: a diffusers Stable Diffusion pipeline folder or Hugging Face Hub id.")
flags.DEFINE_string("model", None, "sample/eval: a model folder (--mode=export, Text2Image.save_pretrained) to use "
                    "instead of --workdir's checkpoint.")
flags.DEFINE_multi_string("prompt", [], "sample: a prompt (repeat the flag for several).")
flags.DEFINE_string("negative_prompt", "", "sample/eval: the prompt guidance steers away from.")
flags.DEFINE_integer("num_images", 1, "sample: images per prompt.")
flags.DEFINE_integer("seed", 0, "sample/eval: seed of the initial noise.")
flags.DEFINE_string("sampler", None, "sample/eval: ddpm | ddim | dpmpp_2m | euler | heun (default: the run's).")
flags.DEFINE_integer("num_steps", None, "sample/eval: sampler steps (default: the run's config.sampling).")
flags.DEFINE_float("guidance_scale", None, "sample/eval: classifier-free guidance scale (default: the run's).")
flags.DEFINE_enum("guidance_schedule", None, ["constant", "linear", "cosine"],
                  "sample/eval: the guidance scale over the timesteps, of mean --guidance_scale (default: the run's).")
flags.DEFINE_string("guidance_interval", None, "sample/eval: 'sigma_lo,sigma_hi': guide only at noise levels in "
                    "(sigma_lo, sigma_hi] ('' = at all; default: the run's config.sampling).")
flags.DEFINE_float("alignment_guidance_scale", None, "sample/eval: alignment guidance scale: each step also ascends "
                   "the image-text similarity of the model's alignment heads or of --alignment_clip (0: off; default: "
                   "the run's config.alignment.guidance_scale).")
flags.DEFINE_string("alignment_clip", None, "sample/eval: a Flax CLIP model folder (or Hub id) for alignment guidance "
                    "instead of the model's alignment heads.")
flags.DEFINE_list("guidance_scales", [], "eval: also sweep these guidance scales (same prompts and noise) and write "
                  "the accuracy-distance frontier to eval/step_N/frontier.md and frontier.png.")
flags.DEFINE_enum("timestep_spacing", None, ["leading", "trailing", "linspace"],
                  "sample/eval: sampler timestep spacing (default: the run's config.sampling).")
flags.DEFINE_integer("step", None, "sample/eval/export: checkpoint step (default: the latest).")
flags.DEFINE_float("ema_sigma_rel", None, "sample/eval/export: use the power-function EMA of this relative width "
                   "at --step (Karras et al. 2024), built from the run's EMA snapshots (config.ema.snapshot_every).")
flags.DEFINE_string("eval_tag", "", "eval: write into eval/step_N_TAG/ rather than eval/step_N/ (keeps earlier "
                    "evaluations of the same step).")
flags.DEFINE_string("init_image", None, "sample: image-to-image from this image file (SDEdit).")
flags.DEFINE_float("strength", 0.75, "sample: image-to-image strength in [0, 1].")
flags.DEFINE_string("mask", None, "sample: inpainting mask file (white = generate, black = keep init_image).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "sample/eval/export/convert: the parameters' and "
                  "the networks' compute dtype (Text2Image.to_dtype; default: as trained or saved).")
flags.DEFINE_string("out", None, "sample: output directory (default: WORKDIR/generated); export, convert: the model "
                    "folder to write.")


class Failure(Exception):
    """What ends a command with one ``error: ...`` line and exit status 2: bad input, or a run that cannot go on."""


def _fail(e: BaseException) -> None:
    raise Failure(" ".join(str(e).split())) from e


def _exit_with_error(line: str) -> None:
    """Write ``error: LINE`` as the last line on stderr and end the process with status 2.

    After a failed asynchronous save, orbax's and tensorstore's threads still complete the abandoned writes
    and report each failure ("Event loop is closed", "Task exception was never retrieved"), from Python and
    from C, for a while and again at interpreter shutdown: thousands of traceback lines that would land after
    this one. Their work is abandoned and already summarised in the line, so file descriptor 2 is pointed at
    /dev/null for every thread first, the line goes to the real stderr, and ``os._exit`` skips the
    finalisers. Nothing is lost: the checkpoint manager and the metric writer are closed before an error
    reaches here, and the kernel releases the workdir lock."""
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    real_stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    # A leading newline: another thread may have left a partial line on stderr just before the redirection (seen
    # in CI: four spaces of a traceback's indentation), which would otherwise prefix this one.
    os.write(real_stderr, f"\nerror: {line}\n".encode())
    os._exit(2)


def _sampling_kwargs() -> dict:
    from diffjax.config import SAMPLING_KEYWORDS, sampling_defaults

    try:  # the flags of config.sampling's keys, those given
        kw = sampling_defaults({k: getattr(FLAGS, k) for k in SAMPLING_KEYWORDS}, FLAGS.alignment_guidance_scale, "--")
    except ValueError as e:
        _fail(e)
    if FLAGS.negative_prompt is not None:
        kw["negative_prompt"] = FLAGS.negative_prompt
    return kw


def train(config) -> None:
    from diffjax.data import describe_dataset
    from diffjax.config import validate
    from diffjax.train import Trainer

    try:  # bad input fails here, in one line, before anything is compiled
        validate(config)
        info = describe_dataset(config.data, config.data.train_split)
        if config.alignment.weight > 0 and config.alignment.positives == "label" and not info.class_names:
            raise ValueError(f"config.alignment.positives='label' needs a labelled dataset; {info.name!r} has no "
                             f"labels (use 'prompt')")
        if info.steps_per_epoch(config.training.batch_size) == 0:
            raise ValueError(f"split {info.split!r} of {info.name!r} has {info.num_examples} examples, fewer than "
                             f"one batch (training.batch_size={config.training.batch_size})")
        trainer = Trainer(config)
    except (ValueError, OSError) as e:  # OSError: a missing dataset directory or config file
        _fail(e)
    from diffjax import loop

    logging.debug("config (shown with --verbosity=1):\n%s", config)
    try:
        loop.train(trainer, FLAGS.workdir)
    except (loop.RunError, OSError) as e:  # a diverged run, a busy or unwritable workdir, unreadable checkpoints
        _fail(e)


def train_classifier(config) -> None:
    from diffjax import evaluation
    from diffjax.data import describe_dataset, validate_data_config

    try:
        validate_data_config(config.data)
        describe_dataset(config.data, config.data.train_split)
    except (ValueError, OSError) as e:
        _fail(e)
    net = evaluation.train_classifier(config, FLAGS.workdir)
    print(f"classifier test accuracy {net.test_accuracy:.4f}; saved in {FLAGS.workdir}")


def _load_pipeline():
    from diffjax.pipeline import Text2Image

    ec = FLAGS.config.evaluation if FLAGS.config is not None and "evaluation" in FLAGS.config else None
    use_ema = bool(ec.use_ema) if ec is not None else True
    try:
        from diffjax.posthoc_ema import check_sigma_rel

        sigma_rel = check_sigma_rel(FLAGS.ema_sigma_rel, "--ema_sigma_rel")
        if FLAGS.model and sigma_rel is not None:
            raise ValueError("--ema_sigma_rel needs a training run's snapshots (--workdir), not --model")
        if FLAGS.model:
            pipe = Text2Image.from_pretrained(FLAGS.model, dtype=FLAGS.dtype)
        else:
            pipe = Text2Image.from_checkpoint(FLAGS.workdir, step=FLAGS.step, use_ema=use_ema, ema_sigma_rel=sigma_rel)
            pipe = pipe if FLAGS.dtype is None else pipe.to_dtype(FLAGS.dtype)
        if FLAGS.alignment_clip:
            pipe = pipe.with_alignment_clip(FLAGS.alignment_clip)
        if FLAGS.alignment_guidance_scale is not None:  # bad input fails here, before anything is compiled
            from diffjax.pipeline import check_alignment_scale

            pipe.check_alignment_guidance(check_alignment_scale(FLAGS.alignment_guidance_scale,
                                                                "--alignment_guidance_scale"))
        return pipe
    except (ValueError, OSError) as e:
        _fail(e)


def evaluate_text2image() -> None:
    from diffjax import evaluation
    from diffjax.config import get_config

    ec = FLAGS.config.evaluation if FLAGS.config is not None else get_config().evaluation
    if FLAGS.model and FLAGS.config is None:
        _fail(ValueError("--mode=eval --model=... needs --config for the dataset to compare against"))
    try:  # flag errors before the pipeline loads
        evaluation.check_tag(FLAGS.eval_tag, "--eval_tag")
        scales = evaluation.check_guidance_scales(FLAGS.guidance_scales, "--guidance_scales")
    except ValueError as e:
        _fail(e)
    pipe = _load_pipeline()
    sampling = _sampling_kwargs()
    try:
        result = evaluation.write_text2image_evaluation(
            pipe, (pipe.config or FLAGS.config).data, ec, FLAGS.workdir, tag=FLAGS.eval_tag, seed=FLAGS.seed,
            guidance_scales=scales, ema_sigma_rel=FLAGS.ema_sigma_rel, **sampling)
    except (ValueError, OSError) as e:
        _fail(e)
    print("\n".join(result.summary_lines(f"step {pipe.step}" if pipe.step is not None else FLAGS.model)))


def _check_writable(path: str, what: str) -> None:
    """One line now, rather than after minutes of work, when ``path`` cannot become a directory."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        _fail(ValueError(f"{what}={path}: {parent} is a file, not a directory"))
    if not os.access(parent, os.W_OK):
        _fail(ValueError(f"{what}={path}: {parent} is not writable"))


def _read_image(path: str, channels: int):
    """uint8 (H, W) or (H, W, 3) pixels of any image file: palette, 16-bit, alpha and RGB-for-a-grey-model are
    converted (``diffjax.data.images.load_image``), not read as raw indices or one channel."""
    import numpy as np

    from diffjax.data.images import load_image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    return np.asarray(load_image(path, channels))


def sample() -> None:
    from diffjax import pixels

    if not FLAGS.prompt:
        _fail(ValueError("--mode=sample needs at least one --prompt"))
    if FLAGS.num_images < 1:
        _fail(ValueError(f"--num_images must be >= 1, got {FLAGS.num_images}"))
    out = FLAGS.out or os.path.join(FLAGS.workdir, "generated")
    _check_writable(out, "--out")  # before sampling, not after it
    pipe = _load_pipeline()
    prompts = [p for p in FLAGS.prompt for _ in range(FLAGS.num_images)]
    kw = dict(seed=FLAGS.seed, progress=True, **_sampling_kwargs())
    try:
        if FLAGS.mask and not FLAGS.init_image:
            raise ValueError("--mask needs --init_image (the image whose unmasked pixels are kept)")
        if FLAGS.init_image:
            image = _read_image(FLAGS.init_image, pipe.image_shape[-1])
            if FLAGS.mask:
                images = pipe.inpaint(prompts, image, _read_image(FLAGS.mask, 1), **kw)
            else:
                images = pipe.img2img(prompts, image, strength=FLAGS.strength, **kw)
        else:
            images = pipe.generate(prompts, **kw)
    except (ValueError, OSError) as e:
        _fail(e)
    paths = pixels.save_images(images, out, prompts)
    grid = pixels.image_grid(images, rows=len(FLAGS.prompt))
    pixels.save_image(grid, os.path.join(out, "grid.png"), scale=2)
    print(f"wrote {len(paths)} images and grid.png to {out}")


def export() -> None:
    if not FLAGS.out:
        _fail(ValueError("--mode=export needs --out (the model folder to write)"))
    _check_writable(FLAGS.out, "--out")
    pipe = _load_pipeline()
    try:
        path = pipe.save_pretrained(FLAGS.out)
    except (ValueError, OSError) as e:
        _fail(e)
    print(f"exported step {pipe.step} of {FLAGS.workdir} to {path}")


def convert() -> None:
    from diffjax.pipeline import Text2Image

    if not FLAGS.diffusers or not FLAGS.out:
        _fail(ValueError("--mode=convert needs --diffusers (a diffusers pipeline folder or Hub id) and --out"))
    _check_writable(FLAGS.out, "--out")
    try:  # the whole conversion happens before anything is written; the folder is written atomically
        path = Text2Image.from_diffusers(FLAGS.diffusers, dtype=FLAGS.dtype).save_pretrained(FLAGS.out)
    except (ValueError, OSError) as e:
        _fail(e)
    print(f"converted {FLAGS.diffusers} to {path}")


class _QuietOrbax(std_logging.Filter):
    """orbax logs its bookkeeping at INFO (about 15 lines per checkpoint: its managers, handlers, each save's
    phases). The command line shows them with ``--verbosity=1`` (absl's debug level, as the config dump), not by
    default; orbax's warnings and errors always."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return (record.levelno >= std_logging.WARNING or logging.get_verbosity() >= logging.DEBUG
                or f"{os.sep}orbax{os.sep}" not in record.pathname)


def quiet_dependency_logs() -> None:
    """Install :class:`_QuietOrbax` on absl's logger (once), through which orbax logs."""
    absl_logger = std_logging.getLogger("absl")
    if not any(isinstance(f, _QuietOrbax) for f in absl_logger.filters):
        absl_logger.addFilter(_QuietOrbax())


def _dispatch(argv) -> None:
    if len(argv) > 1:
        _fail(ValueError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)"))
    from diffjax import sharding, xla_cpu  # importing diffjax made its process settings (diffjax/runtime.py)

    quiet_dependency_logs()
    logging.info("memory allocator: %s", xla_cpu.malloc_in_use())

    if FLAGS.model and FLAGS.mode not in ("sample", "eval"):
        _fail(ValueError(f"--model is for --mode=sample or --mode=eval, not --mode={FLAGS.mode}"))
    if FLAGS.workdir is None and FLAGS.mode != "convert" and not (FLAGS.model and FLAGS.mode == "sample" and FLAGS.out):
        _fail(ValueError(f"--mode={FLAGS.mode} needs --workdir" + (" (or --out with --model)" if FLAGS.model else "")))
    sharding.initialize_distributed()
    if FLAGS.mode in ("train", "train_classifier") and FLAGS.config is None:
        _fail(ValueError(f"--mode={FLAGS.mode} needs --config (see experiments/configs/)"))
    modes = {"train": lambda: train(FLAGS.config), "train_classifier": lambda: train_classifier(FLAGS.config),
             "eval": evaluate_text2image, "sample": sample, "export": export, "convert": convert}
    modes[FLAGS.mode]()


def main(argv):
    """absl's entry point: the mode, and a failure as one line and exit status 2 (``_exit_with_error``)."""
    try:
        _dispatch(argv)
    except Failure as e:
        _exit_with_error(str(e))


def run(args) -> int:
    """``python -m experiments.main ARGS`` in this process: the exit status (0, or 2 after one ``error: ...`` line
    on ``sys.stderr``). For programs that drive the command line, such as the tests: no new interpreter, and the
    compiled programs of earlier calls stay in memory. The flags are parsed afresh each call."""
    argv = ["experiments.main", *args]
    FLAGS.unparse_flags()
    for name in [n for n in FLAGS if n.startswith("config.")]:  # the last call's --config.KEY overrides
        delattr(FLAGS, name)
    previous, sys.argv = sys.argv, argv  # --config's overrides are read from sys.argv
    try:
        _dispatch(parse_flags(argv))
    except SystemExit as e:  # parse_flags: a bad flag, already reported in one line
        return e.code
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = previous
    return 0


def parse_flags(argv):
    """absl's flag parsing, with a bad flag or config override (an unknown key, a wrong type) reported as one
    line on stderr and exit status 2 instead of a traceback."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        msg = " ".join(str(e).replace("\\n", " ").replace("'", "").replace("\\", "").split())
        what = "unknown config key" if isinstance(e, (AttributeError, KeyError)) else "bad flag"
        print(f"error: {what}: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from diffjax import xla_cpu

    try:
        xla_cpu.exec_with_tcmalloc()  # again under tcmalloc when it is installed (see diffjax/xla_cpu.py); once
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(main, flags_parser=parse_flags)
