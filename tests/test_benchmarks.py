"""The performance suite (benchmarks/suite/run.py, suite_jobs.py): the architectures it compares are equal in every
framework, and its driver measures what it says it measures.

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
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "suite"))

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
    """benchmarks/suite/gpu.sh compares these against diffusers' PyTorch U-Net: the same architecture."""
    spec = suite_jobs.SPECS[name]
    assert _diffjax_params(spec) == _torch_params(spec)


@pytest.mark.process("benchmarks/suite/run.py is a program of its own, with its worker processes")
def test_driver_times_diffjax_and_pytorch_train_steps(tmp_path, subprocess_env):
    out = tmp_path / "suite.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "suite", "run.py"), "--spec", "tiny", "--sections", "train",
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
        assert res["faults_per_call"] >= 0 and 0 <= res["sys_share"] <= 1  # kernel time is part of the CPU time
    # XLA's and PyTorch's counters count the same step's FLOPs to within a factor (XLA counts elementwise work too)
    assert 0.5 < dj["info"]["flops"] / pt["info"]["flops"] < 3.0
    assert "diffjax train / best of pytorch train" in proc.stdout


def test_profile_step_sums_kernel_time_by_kernel_and_kind(tmp_path):
    """benchmarks/suite/profile_step.py: only kernel executions (events naming an hlo_op) count, summed per kernel and
    per kind, and each listed kernel is shown with its instruction from the dumped optimized HLO."""
    import profile_step

    def ev(name, ts, dur, op=True):
        args = {"hlo_op": name, "hlo_module": "jit_step"} if op else {}
        return {"ph": "X", "pid": 1, "tid": 2, "ts": ts, "dur": dur, "name": name, "args": args}

    trace = {"traceEvents": [
        ev("ThunkExecutor::Execute", 0, 9000, op=False),  # a wrapper, not a kernel
        ev("ynn_fusion.3", 0, 4000), ev("end: ynn_fusion.3", 3990, 0.1, op=False),
        ev("ynn_fusion.12", 4000, 2000), ev("transpose_copy_fusion.1", 6000, 1000), ev("ynn_fusion.3", 7000, 1000),
        {"ph": "M", "pid": 1, "tid": 2, "name": "thread_name", "args": {"name": "xla"}},
    ]}
    events = profile_step.kernel_events(trace)
    assert [e["name"] for e in events] == ["ynn_fusion.3", "ynn_fusion.12", "transpose_copy_fusion.1", "ynn_fusion.3"]
    assert profile_step.kind("ynn_fusion.12") == "ynn_fusion" and profile_step.kind("dot") == "dot"
    (tmp_path / "module_0007.jit_step.cpu_after_optimizations.txt").write_text(
        "HloModule jit_step\n\nENTRY %main {\n"
        "  %ynn_fusion.3 = f32[64,28,28,48]{3,2,1,0} fusion(%a, %b), kind=kCustom, metadata={op_name=\"x\"}\n"
        "  ROOT %transpose_copy_fusion.1 = f32[48,28,28,64]{3,2,1,0} fusion(%c), kind=kLoop\n}\n")
    hlo = profile_step.hlo_lines(str(tmp_path))
    assert hlo["jit_step"]["ynn_fusion.3"].startswith("f32[64,28,28,48]{3,2,1,0} fusion(%a, %b)")
    text = profile_step.summarize(trace, wall_s=0.01, top=5, hlo=hlo).splitlines()
    assert text[0].startswith("traced wall 0.010 s; 4 kernel executions, busy 0.008 s (0.80 threads")
    by_kind = text[text.index("by kind:") + 1:text.index("by kernel:") - 1]
    assert [line.split()[-2:] for line in by_kind] == [["ynn_fusion", "(x3)"], ["transpose_copy_fusion", "(x1)"]]
    assert by_kind[0].split()[0] == "0.007"  # 4 + 2 + 1 ms
    first = text[text.index("by kernel:") + 1]
    assert first.split()[:3] == ["0.005", "s", "50.0%"] and "ynn_fusion.3  = f32[64,28,28,48]" in first
    assert "metadata" not in first


def test_worker_counts_the_page_faults_and_kernel_time_of_its_calls(monkeypatch, capsys):
    """A job that writes a fresh 64 MiB mapping each call (16,384 pages, whatever the allocator) costs at least
    that many faults per call, and the kernel's time for them is part of the CPU time reported."""
    import io
    import mmap

    import run

    pages = 64 << 20 >> 12

    def fresh_block(spec):
        def call():
            with mmap.mmap(-1, pages << 12) as block:  # anonymous: fresh pages, never a malloc's reused ones
                block[::4096] = b"\1" * pages  # one write per page: each faults in
        return suite_jobs.Job(call, 1, {})

    monkeypatch.setitem(suite_jobs.JOBS, "fresh block", fresh_block)
    monkeypatch.setattr(sys, "stdin", io.StringIO("3\n"))
    run.worker("fresh block", "{}")
    lines = [json.loads(ln[len(run.TAG):]) for ln in capsys.readouterr().out.splitlines() if ln.startswith(run.TAG)]
    ready, timed = lines
    assert ready["ready"] and timed["n"] == 3
    assert timed["faults"] >= 3 * pages
    assert 0 < timed["sys"] <= timed["cpu"]


def test_suite_with_system_malloc_preloads_no_tcmalloc_in_its_jobs(monkeypatch, tmp_path, capsys):
    """``--malloc system``: the jobs' processes inherit an LD_PRELOAD without any tcmalloc or $DIFFJAX_MALLOC's
    build (other preloads kept), and the run records glibc's allocator."""
    import run

    from diffjax import xla_cpu

    mine = tmp_path / "libmymalloc.so"
    mine.write_bytes(b"")
    monkeypatch.setenv("LD_PRELOAD", f"/opt/libother.so /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 {mine}")
    monkeypatch.setenv(xla_cpu.MALLOC_ENV, str(mine))
    out = tmp_path / "suite.json"
    run.main(["--malloc", "system", "--sections", "", "--out", str(out)])
    assert os.environ["LD_PRELOAD"] == "/opt/libother.so" and os.environ[xla_cpu.MALLOC_ENV] == "system"
    assert json.loads(out.read_text())["malloc"] == "system"
    assert "memory allocator of every job: system" in capsys.readouterr().out
