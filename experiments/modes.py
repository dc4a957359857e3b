"""The command line's modes (``experiments/main.py`` dispatches): each reads its flags, fails in one line on bad
input (:func:`fail`), and calls the library.

diffjax's modules are imported inside the modes, not at the top: the process first restarts under tcmalloc
(``xla_cpu.exec_with_tcmalloc``, before jax loads), and ``--help`` needs none of them.
"""

import os

from absl import flags, logging

FLAGS = flags.FLAGS


class Failure(Exception):
    """What ends a command with one ``error: ...`` line and exit status 2: bad input, or a run that cannot go on."""


def fail(e: BaseException) -> None:
    raise Failure(" ".join(str(e).split())) from e


def _sampling_kwargs() -> dict:
    """The sampling flags given, as Text2Image keywords, checked before any model loads (one line otherwise)."""
    from diffjax.config import SAMPLING_KEYWORDS, sampling_defaults
    from diffjax.pipeline import check_guidance_scale, check_num_steps
    from diffjax.samplers import get_sampler

    try:  # the flags of config.sampling's keys, those given, with the pipeline's own checks
        kw = sampling_defaults({k: getattr(FLAGS, k) for k in SAMPLING_KEYWORDS}, FLAGS.alignment_guidance_scale, "--")
        if FLAGS.sampler is not None:
            get_sampler(FLAGS.sampler)
        if FLAGS.num_steps is not None:
            check_num_steps(FLAGS.num_steps, "--num_steps")
        if FLAGS.guidance_scale is not None:
            check_guidance_scale(FLAGS.guidance_scale, "--guidance_scale")
    except ValueError as e:
        fail(e)
    return dict(kw, negative_prompt=FLAGS.negative_prompt) if FLAGS.negative_prompt is not None else kw


def train() -> None:
    config = FLAGS.config
    from diffjax import loop
    from diffjax.config import validate
    from diffjax.train import Trainer

    try:  # bad input fails here, in one line, before anything is compiled (Trainer validates the config)
        validate(config)
        loop.check_data(config)  # the dataset's checks before networks are built or weights loaded
        trainer = Trainer(config)
    except (ValueError, OSError) as e:  # OSError: a missing dataset directory or config file
        fail(e)
    logging.debug("config (shown with --verbosity=1):\n%s", config)
    try:
        loop.train(trainer, FLAGS.workdir)
    except (loop.RunError, OSError) as e:  # a diverged run, a busy or unwritable workdir, unreadable checkpoints
        fail(e)


def train_classifier() -> None:
    config = FLAGS.config
    from diffjax import evaluation
    from diffjax.data import describe_dataset, validate_data_config

    try:
        describe_dataset(validate_data_config(config.data), config.data.train_split)
    except (ValueError, OSError) as e:
        fail(e)
    net = evaluation.train_classifier(config, FLAGS.workdir)
    print(f"classifier test accuracy {net.test_accuracy:.4f}; saved in {FLAGS.workdir}")


def _load_pipeline():
    from diffjax.pipeline import Text2Image, check_alignment_scale
    from diffjax.posthoc_ema import check_sigma_rel

    ec = FLAGS.config.evaluation if FLAGS.config is not None and "evaluation" in FLAGS.config else None
    try:
        if check_sigma_rel(FLAGS.ema_sigma_rel, "--ema_sigma_rel") is not None and FLAGS.model:
            raise ValueError("--ema_sigma_rel needs a training run's snapshots (--workdir), not --model")
        pipe = Text2Image.load(FLAGS.model, FLAGS.workdir, step=FLAGS.step, use_ema=bool(ec.use_ema) if ec else True,
                               ema_sigma_rel=FLAGS.ema_sigma_rel, dtype=FLAGS.dtype,
                               alignment_clip=FLAGS.alignment_clip)
        if FLAGS.alignment_guidance_scale is not None:  # bad input fails here, before anything is compiled
            pipe.check_alignment_guidance(check_alignment_scale(FLAGS.alignment_guidance_scale,
                                                                "--alignment_guidance_scale"))
        return pipe
    except (ValueError, OSError) as e:
        fail(e)


def evaluate_text2image() -> None:
    from diffjax import evaluation
    from diffjax.config import get_config

    ec = FLAGS.config.evaluation if FLAGS.config is not None else get_config().evaluation
    if FLAGS.model and FLAGS.config is None:
        fail(ValueError("--mode=eval --model=... needs --config for the dataset to compare against"))
    try:  # flag errors before the pipeline loads
        evaluation.check_tag(FLAGS.eval_tag, "--eval_tag")
        scales = evaluation.check_guidance_scales(FLAGS.guidance_scales, "--guidance_scales")
    except ValueError as e:
        fail(e)
    sampling = _sampling_kwargs()
    pipe = _load_pipeline()
    try:
        result = evaluation.write_text2image_evaluation(
            pipe, (pipe.config or FLAGS.config).data, ec, FLAGS.workdir, tag=FLAGS.eval_tag, seed=FLAGS.seed,
            guidance_scales=scales, ema_sigma_rel=FLAGS.ema_sigma_rel, **sampling)
    except (ValueError, OSError) as e:
        fail(e)
    print("\n".join(result.summary_lines(f"step {pipe.step}" if pipe.step is not None else FLAGS.model)))


def _check_writable(path: str, what: str) -> None:
    """One line now, rather than after minutes of work, when ``path`` cannot become a directory."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        fail(ValueError(f"{what}={path}: {parent} is " + ("not writable" if os.path.isdir(parent) else
                                                            "a file, not a directory")))


def sample() -> None:
    from diffjax import pixels
    from diffjax.data.images import read_image

    if not FLAGS.prompt or FLAGS.num_images < 1:
        fail(ValueError("--mode=sample needs at least one --prompt" if not FLAGS.prompt else
                         f"--num_images must be >= 1, got {FLAGS.num_images}"))
    out = FLAGS.out or os.path.join(FLAGS.workdir, "generated")
    _check_writable(out, "--out")  # before sampling, not after it
    kw = dict(seed=FLAGS.seed, progress=True, **_sampling_kwargs())  # checked before the model loads
    pipe = _load_pipeline()
    prompts = [p for p in FLAGS.prompt for _ in range(FLAGS.num_images)]
    try:
        if FLAGS.mask and not FLAGS.init_image:
            raise ValueError("--mask needs --init_image (the image whose unmasked pixels are kept)")
        (h, w, c), resize = pipe.image_shape, FLAGS.resize
        if FLAGS.init_image and FLAGS.mask:
            images = pipe.inpaint(prompts, read_image(FLAGS.init_image, c, (h, w), resize, "--init_image"),
                                  read_image(FLAGS.mask, 1, (h, w), resize, "--mask", mask=True), **kw)
        elif FLAGS.init_image:
            images = pipe.img2img(prompts, read_image(FLAGS.init_image, c, (h, w), resize, "--init_image"),
                                  strength=FLAGS.strength, **kw)
        else:
            images = pipe.generate(prompts, **kw)
    except (ValueError, OSError) as e:
        fail(e)
    paths = pixels.write_samples(images, out, prompts, rows=len(FLAGS.prompt))
    print(f"wrote {len(paths)} images and grid.png to {out}")


def export_or_convert() -> None:
    from diffjax.pipeline import Text2Image

    if not FLAGS.out or (FLAGS.mode == "convert" and not FLAGS.diffusers):
        fail(ValueError("--mode=export needs --out (the model folder to write)" if FLAGS.mode == "export" else
                         "--mode=convert needs --diffusers (a diffusers pipeline folder or Hub id) and --out"))
    _check_writable(FLAGS.out, "--out")
    # convert: the whole conversion happens before anything is written; the folder is written atomically
    pipe = _load_pipeline() if FLAGS.mode == "export" else None
    try:
        pipe = pipe or Text2Image.from_diffusers(FLAGS.diffusers, dtype=FLAGS.dtype)
        path = pipe.save_pretrained(FLAGS.out)
    except (ValueError, OSError) as e:
        fail(e)
    print(f"exported step {pipe.step} of {FLAGS.workdir} to {path}" if FLAGS.mode == "export" else
          f"converted {FLAGS.diffusers} to {path}")
