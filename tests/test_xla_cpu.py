"""diffjax.xla_cpu: the XLA flag that gives XLA:CPU's convolutions back to XLA's own kernels is set before JAX's
backend starts (and only then), takes effect in the compiled program, and leaves a user's own choice alone; the
choice of tcmalloc restarts the program once; the compile options keep remat's recomputation (and its memory
saving) through XLA:CPU's compilation."""

import os
import subprocess
import sys

import pytest

from diffjax import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys
if sys.argv[1] != "first":  # "first": diffjax is imported before jax
    import jax
if sys.argv[1] == "late":
    jax.numpy.zeros(3).block_until_ready()  # the backend starts: XLA has read its flags
from diffjax import xla_cpu  # importing diffjax sets the flag when it can (diffjax.runtime)
assert sys.argv[1] != "first" or "jax" not in sys.modules  # and does not import jax
import jax, jax.numpy as jnp
print("applied", xla_cpu.convolutions_from_xla(), xla_cpu.use_xla_convolutions())
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC")))
hlo = conv.lower(jnp.zeros((32, 32, 32, 64)), jnp.zeros((3, 3, 64, 64))).compile().as_text()
print("ynnpack", "__ynn_fusion" in hlo)
print("cache", jax.config.jax_compilation_cache_dir)  # also set when diffjax is imported (diffjax.runtime)
"""


def _run(mode, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.ENV, "JAX_COMPILATION_CACHE_DIR")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], env={**base, "PYTHONPATH": ROOT, **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()[-6:]


@pytest.mark.process("XLA reads its flags once, when its backend starts")
def test_importing_diffjax_moves_convolutions_out_of_ynnpack_before_the_backend_starts_and_caches_programs(tmp_path):
    cache = str(tmp_path / "cache")
    # Set at import, in time: XLA's own convolution; the compilation cache where DIFFJAX_COMPILATION_CACHE says,
    # whether jax was imported before diffjax or after.
    for mode in ("first", "early"):
        assert _run(mode, DIFFJAX_COMPILATION_CACHE=cache) == ["True", "True", "ynnpack", "False", "cache", cache]
    # Too late (the backend started before diffjax was imported): reported, nothing changed. A cache directory
    # the user chose stands.
    assert _run("late", JAX_COMPILATION_CACHE_DIR=cache + "2") == ["False", "False", "ynnpack", "True", "cache",
                                                                   cache + "2"]
    # The opt-outs.
    assert _run("early", **{xla_cpu.ENV: "off", "DIFFJAX_COMPILATION_CACHE": "off"}) == [
        "False", "False", "ynnpack", "True", "cache", "None"]


def test_a_users_own_setting_stands(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_convolution")
    assert xla_cpu.use_xla_convolutions() is False
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 {xla_cpu.FLAG}")
    assert xla_cpu.use_xla_convolutions() is True  # there already: not added twice
    assert os.environ["XLA_FLAGS"].count(xla_cpu.FLAG) == 1


def test_unknown_jaxlib_gets_no_flag(monkeypatch):
    """XLA aborts the process on a flag it does not know: only the jaxlib series it was measured on gets it."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv(xla_cpu.ENV, raising=False)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 11))
    assert xla_cpu.use_xla_convolutions() is False
    assert "XLA_FLAGS" not in os.environ


def test_tcmalloc_path_follows_the_environment(monkeypatch, tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    monkeypatch.setenv(xla_cpu.MALLOC_ENV, str(lib))
    assert xla_cpu.tcmalloc_path() == str(lib)
    monkeypatch.setenv(xla_cpu.MALLOC_ENV, "system")
    assert xla_cpu.tcmalloc_path() is None
    monkeypatch.setenv(xla_cpu.MALLOC_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(FileNotFoundError, match="DIFFJAX_MALLOC='.*missing.so' is neither 'system' nor"):
        xla_cpu.tcmalloc_path()
    monkeypatch.setenv(xla_cpu.MALLOC_ENV, "")
    monkeypatch.setattr(xla_cpu, "LIBRARY_DIRS", (str(tmp_path),))
    assert xla_cpu.tcmalloc_path() == str(lib)
    monkeypatch.setattr(xla_cpu, "LIBRARY_DIRS", (str(tmp_path / "nowhere"),))
    assert xla_cpu.tcmalloc_path() is None


def test_exec_with_tcmalloc_runs_once_whatever_the_librarys_name(monkeypatch, tmp_path):
    """Once the library is in LD_PRELOAD (the restarted process), nothing is started again, even for a build
    whose file name does not say tcmalloc; without a library, nothing either."""
    lib = tmp_path / "libmymalloc.so"
    lib.write_bytes(b"")
    monkeypatch.setattr(xla_cpu.os, "execve", lambda *a: pytest.fail(f"started again: {a[1]}"))
    monkeypatch.setenv(xla_cpu.MALLOC_ENV, str(lib))
    monkeypatch.setenv("LD_PRELOAD", f"/other/lib.so {lib}")
    assert xla_cpu.exec_with_tcmalloc() is None
    monkeypatch.setenv(xla_cpu.MALLOC_ENV, "system")
    monkeypatch.delenv("LD_PRELOAD")
    assert xla_cpu.exec_with_tcmalloc() is None


FAULTS = r"""
import os, resource, sys
from diffjax import xla_cpu
print("start", os.getpid(), xla_cpu.malloc_in_use(), sys.argv[1:], flush=True)
if sys.argv[1] == "exec":
    xla_cpu.exec_with_tcmalloc()
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: ((x @ w) @ w.T).sum())  # x @ w: a 64 MiB temporary (16,384 pages) in every call
x, w = jnp.ones((8192, 64)), jnp.ones((64, 2048))
for _ in range(3):
    f(x, w).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    f(x, w).block_until_ready()
print("faults", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 4)
"""


@pytest.mark.process("the allocator of a process is chosen when it starts")
@pytest.mark.skipif(not sys.platform.startswith("linux") or xla_cpu.tcmalloc_path() is None,
                    reason="tcmalloc is not installed (Debian: libtcmalloc-minimal4)")
def test_exec_with_tcmalloc_restarts_once_and_the_calls_stop_faulting_in_their_temporaries():
    """The process starts again under tcmalloc (same pid, same arguments, once), and an XLA:CPU call's 64 MiB
    temporary, which glibc hands back to the kernel and faults in again every call, is reused instead."""
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", xla_cpu.MALLOC_ENV)}
    out = {}
    for mode in ("exec", "stay"):
        proc = subprocess.run([sys.executable, "-c", FAULTS, mode, "--flag=1"], env={**base, "PYTHONPATH": ROOT},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = proc.stdout.splitlines()
    starts = [ln.split(" ", 3) for ln in out["exec"] if ln.startswith("start")]
    assert [s[2] for s in starts] == ["system", "tcmalloc"] and starts[0][1] == starts[1][1]
    assert starts[0][3] == starts[1][3] == "['exec', '--flag=1']"
    assert [s.split()[2] for s in out["stay"] if s.startswith("start")] == ["system"]
    faults = {m: float(out[m][-1].split()[1]) for m in out}
    assert faults["stay"] >= 0.9 * 16384, faults  # glibc: the temporary's pages anew each call
    assert faults["exec"] < 0.01 * 16384, faults  # tcmalloc: reused


def _dense_blocks_grad(remat: bool, options):
    """The gradient of eight matmul + tanh + sin blocks (each 256 x 512 activation is 0.5 MiB), remat per block or
    not, compiled with ``options``: (compiled program, gradients)."""
    import jax
    import jax.numpy as jnp

    def block(x, w):
        return jnp.sin(jnp.tanh(x @ w))

    def loss(ws, x):
        for w in ws:
            x = (jax.checkpoint(block) if remat else block)(x, w)
        return jnp.sum(x**2)

    ws = [jnp.full((512, 512), 0.01 + 0.001 * i) for i in range(8)]
    x = jnp.linspace(-1.0, 1.0, 256 * 512).reshape(256, 512)
    compiled = jax.jit(jax.grad(loss), compiler_options=options).lower(ws, x).compile()
    return compiled, compiled(ws, x)


def test_compiler_options_keep_remat_recomputation_apart_on_xla_cpu():
    """Without the options XLA:CPU drops remat's barriers and its CSE merges the recomputed matmuls back into the
    forward pass (the same 23 matmuls and temporaries as without remat); with them the 7 recomputed matmuls stay
    (31) and the temporaries fall to less than a third, with the same gradients. (The counts are jaxlib 0.10's,
    the version setup.cfg pins.)"""
    import numpy as np

    plain, g_plain = _dense_blocks_grad(False, None)
    merged, _ = _dense_blocks_grad(True, None)
    kept, g_kept = _dense_blocks_grad(True, xla_cpu.compiler_options("cpu"))
    dots = [c.as_text().count(" dot(") for c in (plain, merged, kept)]
    temp = [c.memory_analysis().temp_size_in_bytes for c in (plain, merged, kept)]
    assert dots == [23, 23, 31], dots
    assert temp[1] >= 0.9 * temp[0] and temp[2] < temp[0] / 3, temp
    for a, b in zip(g_plain, g_kept):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    options, _ = _dense_blocks_grad(False, xla_cpu.compiler_options("cpu"))  # no barriers: nothing changes
    assert options.as_text().count(" dot(") == 23 and options.memory_analysis().temp_size_in_bytes == temp[0]


def test_compiler_options_add_to_the_passes_xla_flags_disable(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_disable_hlo_passes=algsimp,dce")
    assert xla_cpu.compiler_options("cpu") == {"xla_disable_hlo_passes": f"algsimp,dce,{xla_cpu.BARRIER_PASS}"}
    monkeypatch.setenv("XLA_FLAGS", "--xla_disable_hlo_passes=algsimp --xla_disable_hlo_passes='dce'")
    assert xla_cpu.compiler_options("cpu") == {"xla_disable_hlo_passes": f"algsimp,dce,{xla_cpu.BARRIER_PASS}"}
    monkeypatch.setenv("XLA_FLAGS", f"--xla_disable_hlo_passes={xla_cpu.BARRIER_PASS}")
    assert xla_cpu.compiler_options("cpu") == {"xla_disable_hlo_passes": xla_cpu.BARRIER_PASS}
    assert xla_cpu.compiler_options("gpu") is None and xla_cpu.compiler_options("tpu") is None


def test_gradient_norm_concatenates_only_replicated_cpu_arrays():
    """The Trainer's ``norm_concat_below``: on the CPU with replicated parameters only (a concatenation would
    gather arrays sharded over an fsdp axis)."""
    assert xla_cpu.norm_concat_below("cpu", 1) == xla_cpu.NORM_CONCAT_BELOW > 0
    assert xla_cpu.norm_concat_below("cpu", 2) == 0
    assert xla_cpu.norm_concat_below("gpu", 1) == 0 and xla_cpu.norm_concat_below("tpu", 1) == 0


@pytest.mark.trains("a remat config's step, compiled")
def test_trainer_compiles_its_step_with_remat_barriers_kept(fake_config):
    """The step of a remat U-Net keeps its barriers through XLA:CPU's compilation (the options above are the
    Trainer's), and its gradient norm concatenates the small gradients (replicated parameters on the CPU)."""
    import jax
    import numpy as np

    from diffjax.train import Trainer

    config = fake_config.copy_and_resolve_references()
    config.model.unet.remat = True
    config.model.unet.channel_mult = (1,)  # one level, a frozen text encoder: a short compile
    config.model.unet.attention_levels = (0,)
    config.text.trainable = False
    tr = Trainer(config, image_shape=(8, 8, 1))
    b = config.training.batch_size
    ids, mask = tr.models.text_encoder.tokenize(["a photo of a coat"] * b)
    batch = {"image": np.zeros((b, 8, 8, 1), np.float32), "token_ids": ids, "mask": mask,
             "label": np.zeros((b,), np.int32)}
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
    lowered = tr.step.lower(tr.abstract_state, abstract)
    assert "opt-barrier" in lowered.compile().as_text()
    # ... and sums its small gradients' squares as one concatenated vector (xla_cpu.norm_concat_below).
    small = [x.size for x in jax.tree_util.tree_leaves(tr.abstract_state.params) if x.size < xla_cpu.NORM_CONCAT_BELOW]
    assert len(small) > 20 and f"-> tensor<{sum(small)}xf32>" in lowered.as_text()
