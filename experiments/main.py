"""The command line: flags, the dispatch to a mode (``experiments/modes.py``), and every failure as one line.

    python -m experiments.main --config=experiments/configs/fashion_mnist.py --workdir=runs/fmnist   # train/resume
    python -m experiments.main --mode=eval --workdir=runs/fmnist          # conditioning accuracy, Fréchet distance
    python -m experiments.main --mode=sample --workdir=runs/fmnist --prompt="a sneaker" --prompt="a bag"
    python -m experiments.main --mode=export --workdir=runs/fmnist --out=models/fmnist  # a self-contained folder
    python -m experiments.main --mode=convert --diffusers=stable-diffusion-v1-5/stable-diffusion-v1-5 --out=models/sd15

Modes: train, train_classifier, eval, sample (``--model`` instead of ``--workdir`` for a model folder; img2img with
``--init_image``, inpainting with ``--mask``), export, convert; docs/training.md and docs/generation.md show them all.
Several processes (a TPU pod slice, GPU hosts) are joined through ``jax.distributed`` when the environment
configures them (``diffjax.sharding.initialize_distributed``).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import modes
from experiments.modes import Failure, fail

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
flags.DEFINE_bool("resize", False, "sample: resize (and convert) --init_image / --mask to the model's image size "
                  "instead of refusing one of another size, or a colour image for a grey model.")
flags.DEFINE_string("mask", None, "sample: inpainting mask file (white = generate, black = keep init_image).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "sample/eval/export/convert: the parameters' and "
                  "the networks' compute dtype (Text2Image.to_dtype; default: as trained or saved).")
flags.DEFINE_string("out", None, "sample: output directory (default: WORKDIR/generated); export, convert: the model "
                    "folder to write.")


def _exit_with_error(line: str) -> None:
    """Write ``error: LINE`` as the last line on stderr and end the process with status 2.

    After a failed asynchronous save, orbax's and tensorstore's threads still report the abandoned writes, from
    Python and from C, for a while and at interpreter shutdown: thousands of traceback lines after this one. So file
    descriptor 2 goes to /dev/null for every thread first, the line to the real stderr, and ``os._exit`` skips the
    finalisers. Nothing is lost: checkpoints and metric writers are closed before an error reaches here."""
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    real_stderr = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    # A leading newline: another thread may have left a partial line on stderr just before the redirection.
    os.write(real_stderr, f"\nerror: {line}\n".encode())
    os._exit(2)


def _dispatch(argv) -> None:
    if len(argv) > 1:
        fail(ValueError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)"))
    from diffjax import runtime, sharding, xla_cpu  # importing diffjax made its process settings (diffjax/runtime.py)

    runtime.quiet_logs()
    logging.info("memory allocator: %s", xla_cpu.malloc_in_use())
    if FLAGS.model and FLAGS.mode not in ("sample", "eval"):
        fail(ValueError(f"--model is for --mode=sample or --mode=eval, not --mode={FLAGS.mode}"))
    if FLAGS.workdir is None and FLAGS.mode != "convert" and not (FLAGS.model and FLAGS.mode == "sample" and FLAGS.out):
        fail(ValueError(f"--mode={FLAGS.mode} needs --workdir" + (" (or --out with --model)" if FLAGS.model else "")))
    sharding.initialize_distributed()
    if FLAGS.mode in ("train", "train_classifier") and FLAGS.config is None:
        fail(ValueError(f"--mode={FLAGS.mode} needs --config (see experiments/configs/)"))
    run_mode = {"train": modes.train, "train_classifier": modes.train_classifier, "eval": modes.evaluate_text2image,
                "sample": modes.sample, "export": modes.export_or_convert, "convert": modes.export_or_convert}
    run_mode[FLAGS.mode]()


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
