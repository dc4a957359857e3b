"""The performance suite (benchmarks/run.py, benchmarks/suite_jobs.py): the architectures it compares are equal
in every framework, and its driver measures what it says it measures.

The timings themselves are not asserted (timed assertions are flaky); what is asserted is that the comparison is
fair (equal parameter counts, the same batch) and that the driver runs its jobs end to end and reports them.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import suite_jobs  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


def _diffjax_params(spec):
    from diffjax.models import count_params

    tr = suite_jobs.diffjax_trainer(spec)  # abstract state only: nothing is initialised or compiled
    return count_params(tr.abstract_state.params[tr.models.component])


def _torch_params(spec):
    with torch.device("meta"):  # shapes only, no memory: the sd spec is 860M parameters
        unet, _ = suite_jobs._torch_models(spec, "meta")
    return sum(p.numel() for p in unet.parameters())


def test_matched_unet_has_the_same_parameters_in_all_three_frameworks():
    spec = suite_jobs.SPECS["matched"]
    unet, _ = suite_jobs._flax_models(spec)
    flax_params = jax.eval_shape(unet.init_weights, jax.random.key(0))
    from diffjax.models import count_params

    counts = {"diffjax": _diffjax_params(spec), "diffusers-flax": count_params(flax_params),
              "pytorch": _torch_params(spec)}
    assert set(counts.values()) == {6_941_505}, counts


@pytest.mark.parametrize("name", ["small", "ddpm_cifar10", "sd"])
def test_gpu_presets_match_diffusers_pytorch(name):
    """benchmarks/gpu.sh compares these against diffusers' PyTorch U-Net: the same architecture."""
    spec = suite_jobs.SPECS[name]
    assert _diffjax_params(spec) == _torch_params(spec)


def test_driver_times_diffjax_and_pytorch_train_steps(tmp_path, subprocess_env):
    out = tmp_path / "suite.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--spec", "tiny", "--sections", "train",
         "--jobs", "matmul peak,diffjax train,pytorch train", "--rounds", "2", "--round-seconds", "0",
         "--out", str(out)], env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = json.loads(out.read_text())["train"]
    assert set(train) == {"matmul peak", "diffjax train", "pytorch train"}, proc.stdout
    dj, pt = train["diffjax train"], train["pytorch train"]
    assert dj["info"]["params"] == pt["info"]["params"]
    for res in (dj, pt):
        assert len(res["wall"]) == 2 and res["images_per_s"] > 0
        assert res["info"]["flops"] > 0 and 0 < res["flop_fraction"]
    # XLA's and PyTorch's counters count the same step's FLOPs to within a factor (XLA counts elementwise work too)
    assert 0.5 < dj["info"]["flops"] / pt["info"]["flops"] < 3.0
    assert "diffjax train / best of pytorch train" in proc.stdout
