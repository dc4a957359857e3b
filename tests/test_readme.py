"""Every fenced code block of README.md and docs/*.md runs as written, at tiny sizes, or is listed in BLOCKS below with
the reason it is not run. A block that BLOCKS does not know fails the test, and so does an entry of BLOCKS that no
block matches, so that a new or renamed block is never skipped silently.

How a block runs, in a fresh temporary working directory:

* ``python``: executed as written, after one substitution: the demo's model folder (``runs/demo/model``, or
  ``models/fashion_mnist`` in docs/generation.md) becomes a tiny model folder (``fakes.random_text2image``: the tiny
  config's U-Net and text encoder with random weights, 8×8×1, saved with ``save_pretrained``), so that the block
  needs no trained demo.
* ``bash``: each command must be ``python -m experiments.smoke`` or ``python -m experiments.main ...`` (the
  ``.venv/bin/`` prefix allowed); it runs in this process with the same substitution, the smoke check with the
  tiny settings of tests/test_smoke_demo.py appended (``--num_steps=10 --seeds=2``: the same programs, so a session
  that runs both compiles them once).
* ``text``: not code (a folder layout, say); never run. A block without a language fails: tag it.

A block is named by its page and the start of its first line.
"""

import os
import re
import shlex

import pytest

from fakes import random_text2image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md") and f != "lab_notebook.md")
# docs/lab_notebook.md is not a page of instructions: a dated record whose commands (indented, not fenced) are
# history and take minutes to hours.
MODEL_FOLDERS = ("runs/demo/model", "models/fashion_mnist")
RUN = "run"  # the block runs as written (python) or in process (bash)

_TRAINS_DEMO = "trains the demo config on the real Fashion-MNIST (minutes); tests/test_train.py trains through the " \
               "command line at tiny size"
_NEEDS_RUN = "needs a trained run's checkpoints (runs/demo); tests/test_pipeline.py samples and exports from a " \
             "tiny run's, and the model-folder commands here run"
_DOWNLOADS = "downloads Stable Diffusion (~4 GB) from the Hub; tests/test_diffusers_format.py converts random-initialised " \
             "diffusers models of the same layouts"
_BENCHMARKS = "benchmark runs of minutes to hours; tests/test_benchmarks.py runs benchmarks/suite/run.py at tiny size"

BLOCKS = {
    ("README.md", "make demo "): "make demo trains for 9-24 min (its parts are tested at tiny size: test_train, "
                                 "test_evaluation, test_pipeline); make test is the suite itself",
    ("README.md", "import numpy as np"): RUN,
    ("README.md", ".venv/bin/python -m experiments.smoke"): RUN,
    ("README.md", ".venv/bin/python -m experiments.main --config=experiments/configs/fashion_mnist.py"): _TRAINS_DEMO,
    ("README.md", ".venv/bin/python -m experiments.main --mode=sample --model=runs/demo/model"): RUN,
    ("README.md", ".venv/bin/python -m experiments.main --mode=convert"): _DOWNLOADS,
    ("docs/evaluation.md", ".venv/bin/python -m experiments.main --mode=train_classifier"):
        "trains the classifier on the real Fashion-MNIST and evaluates runs/demo; tests/test_evaluation.py runs "
        "both commands at tiny size",
    ("docs/generation.md", "# images from a trained run"): _NEEDS_RUN,
    ("docs/generation.md", ".venv/bin/python -m experiments.main --mode=export"): _NEEDS_RUN,
    ("docs/generation.md", ".venv/bin/python -m experiments.main --mode=sample --model=models/fashion_mnist"): RUN,
    ("docs/generation.md", "import numpy as np"): RUN,
    ("docs/generation.md", "python -m experiments.main --mode=sample --workdir=runs/aligned"):
        "needs a run trained with the alignment term; tests/test_alignment.py guides from the command line",
    ("docs/generation.md", "import jax, jax.numpy as jnp"): RUN,
    ("docs/performance.md", ".venv/bin/python benchmarks/suite/run.py"): _BENCHMARKS,
    ("docs/stable_diffusion.md", "# a diffusers Stable Diffusion folder"): _DOWNLOADS,
    ("docs/stable_diffusion.md", "from diffjax.pipeline import Text2Image"): _DOWNLOADS,
    ("docs/standings.md", ".venv/bin/python benchmarks/suite/run.py"): _BENCHMARKS,
    ("docs/standings.md", "make demo "): "trains the demo and the long config (minutes to an hour); their "
                                         "commands are tested at tiny size by test_train and test_evaluation",
    ("docs/standings.md", "make test "): "the suite itself",
    ("docs/training.md", ".venv/bin/python -m experiments.main --config=experiments/configs/fashion_mnist.py"):
        _TRAINS_DEMO,
    ("docs/training.md", "python -m experiments.main --config=experiments/configs/fashion_mnist.py"): _TRAINS_DEMO,
}

_FENCE = re.compile(r"^```(.*)$")


def code_blocks(page):
    """(language, first line, text, line number) of every fenced block of ``page``."""
    out, lang, start, body = [], None, 0, []
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            m = _FENCE.match(line.rstrip("\n"))
            if m and lang is None:
                lang, start, body = m.group(1).strip(), n, []
            elif m:
                text = "".join(body)
                out.append((lang, text.lstrip("\n").split("\n", 1)[0], text, start))
                lang = None
            elif lang is not None:
                body.append(line)
    assert lang is None, f"{page}:{start}: a code block is never closed"
    return out


def entry(page, first_line):
    """The one BLOCKS key whose page is ``page`` and whose text starts ``first_line``."""
    keys = [k for k in BLOCKS if k[0] == page and first_line.startswith(k[1])]
    assert len(keys) <= 1, f"{page}: {first_line!r} matches several entries of BLOCKS: {keys}"
    return keys[0] if keys else None


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    return random_text2image().save_pretrained(str(tmp_path_factory.mktemp("readme") / "model"))


def _substitute(text, folder):
    for name in MODEL_FOLDERS:
        text = text.replace(name, folder)
    return text


def _commands(text):
    """The shell commands of a block: backslash continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def _run_shell(text, where, folder, run_main):
    from experiments import smoke

    for argv in _commands(_substitute(text, folder)):
        assert argv[0] in ("python", ".venv/bin/python") and argv[1] == "-m", f"{where}: cannot run {argv}"
        if argv[2] == "experiments.smoke":
            results = smoke.main(argv[3:] + ["--num_steps=10", "--seeds=2"])
            assert all(acc == 1.0 for acc in results.values()), (where, results)
            workdir = next((a.split("=", 1)[1] for a in argv[3:] if a.startswith("--workdir=")), "runs/smoke")
            assert sorted(os.listdir(workdir)) == sorted(f"samples_{name}.png" for name in results), where
        elif argv[2] == "experiments.main":
            proc = run_main(argv[3:])
            assert proc.returncode == 0, f"{where}: {' '.join(argv)}\n{proc.stderr[-3000:]}"
        else:
            raise AssertionError(f"{where}: cannot run {argv}")


@pytest.mark.parametrize("page", PAGES)
def test_every_code_block_runs_or_says_why_not(page, tiny_model_folder, run_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what the blocks write (samples.png, runs/smoke, ...) lands here
    unknown, ran = [], []
    for lang, first, text, line in code_blocks(page):
        where = f"{page}:{line}"
        if lang == "text":
            continue
        assert lang in ("python", "bash"), f"{where}: tag the block python, bash or text (it says {lang!r})"
        key = entry(page, first)
        if key is None:
            unknown.append(f"{where}: {first!r}")
        elif BLOCKS[key] == RUN and lang == "python":
            exec(compile(_substitute(text, tiny_model_folder), where, "exec"), {"__name__": "__readme__"})
            ran.append(where)
        elif BLOCKS[key] == RUN:
            _run_shell(text, where, tiny_model_folder, run_main)
            ran.append(where)
    assert not unknown, "blocks that tests/test_readme.py neither runs nor lists with a reason (add them to " \
                        "BLOCKS):\n" + "\n".join(unknown)
    if page == "README.md":  # the example of the first screen wrote what it says it writes
        assert os.path.getsize(tmp_path / "samples.png") > 0
        assert sorted(os.listdir(tmp_path / "samples"))[-2:] == ["grid.png", "prompts.json"]


def test_every_entry_names_a_block():
    firsts = {(page, first) for page in PAGES for lang, first, _, _ in code_blocks(page) if lang != "text"}
    stale = [k for k in BLOCKS if not any(p == k[0] and f.startswith(k[1]) for p, f in firsts)]
    assert not stale, f"entries of BLOCKS whose block is gone: {stale}"
