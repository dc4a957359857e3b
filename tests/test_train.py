"""Training: overfitting, resume = straight run, sharded layouts = one device, two processes = one, errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fakes import flat, free_port

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_worker.py")


def test_loss_falls_when_overfitting_one_batch(trainer, fake_config):
    from diffjax.data import make_dataset

    it = make_dataset(fake_config.data, trainer.models.text_encoder, split="train", global_batch_size=8, seed=0)
    batch = trainer.shard_batch(next(it))
    state = trainer.init()
    key = jax.random.PRNGKey(123)
    # The same fixed timesteps and noise before and after: a deterministic measure of the fit.
    before = float(trainer.eval_step(state, batch, key))
    for _ in range(40):
        state, metrics = trainer.step(state, batch)
    after = float(trainer.eval_step(state, batch, key))
    assert np.isfinite(float(metrics["grad_norm"]))
    assert after < 0.5 * before, (before, after)
    assert int(state.step) == 40


def test_resume_equals_straight_run(trainer, fake_config, tmp_path):
    """N steps straight == N/2 steps, stop (checkpoint), resume, N/2 steps: same parameters, same data order.
    The straight run also writes TensorBoard events, a sample grid and an evaluation."""
    from diffjax import loop
    from diffjax.checkpoints import Checkpointer

    tc = fake_config.training
    assert tc.num_steps == 4
    with fake_config.unlocked():
        tc.sample_every, tc.eval_every = 4, 4
        straight = loop.train(trainer, str(tmp_path / "straight"))
        tc.sample_every, tc.eval_every = 0, 0
    first = loop.train(trainer, str(tmp_path / "resumed"), stop_at=2)
    assert int(first.step) == 2
    ckpt = Checkpointer(str(tmp_path / "resumed" / "checkpoints"))
    assert ckpt.latest_step() == 2
    _, data_state, cfg = ckpt.restore(trainer.restore_target())
    assert data_state["next_index"] == 2 and cfg["training"]["batch_size"] == 8
    ckpt.close()
    resumed = loop.train(trainer, str(tmp_path / "resumed"))
    assert int(resumed.step) == 4
    np.testing.assert_allclose(flat(resumed.params), flat(straight.params), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(flat(resumed.ema_params), flat(straight.ema_params), rtol=1e-6, atol=1e-7)
    run = tmp_path / "straight"
    assert (run / "samples" / "step_000004.png").stat().st_size > 0
    events = list((run / "tensorboard").iterdir())
    assert events and events[0].stat().st_size > 0
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]


@pytest.fixture(scope="module")
def layouts(multi_device, trainer):
    """The U-Net's layouts on 4 devices (tests/train_worker.py), beside their one-device reference: the same steps on
    the same batches by the session's Trainer (the tiny config on one device), and the 4-device checkpoint restored
    onto it and trained one step further."""
    from diffjax.checkpoints import Checkpointer
    from train_worker import STEPS, batches, run_mesh

    out = dict(np.load(os.path.join(multi_device, "layouts_unet.npz")))
    _, state, _ = run_mesh(None, None, trainer=trainer)
    out["one_device"] = flat(state.params)
    ckpt = Checkpointer.existing(os.path.join(multi_device, "ckpt"))
    restored, data_state, cfg = ckpt.restore(trainer.restore_target())
    ckpt.close()
    out["restored_1"] = flat(restored.params)
    out["restored_1_devices"] = len(jax.tree_util.tree_leaves(restored.params)[0].sharding.device_set)
    out["restored_data_state"], out["restored_config_batch"] = data_state["next_index"], cfg["training"]["batch_size"]
    continued, _ = trainer.step(restored, trainer.shard_batch(batches(trainer, STEPS + 1)[-1]))
    out["continued_1"] = flat(continued.params)
    return out


def _close(a, b, lr=1e-2, max_steps_of_lr=0.05):
    """Equal up to float reduction order. Adam normalises each gradient by its running RMS, so where a
    gradient is at rounding-noise level a different summation order can move that parameter by up to ~lr
    per step (``max_steps_of_lr`` · lr allowed); everywhere else the runs agree to 1e-5 of the parameters'
    scale."""
    diff, scale = np.abs(a - b), np.max(np.abs(b))
    assert np.quantile(diff, 0.9999) <= 1e-5 * scale, np.quantile(diff, 0.9999)
    assert diff.max() <= max_steps_of_lr * lr, diff.max()


def test_four_devices_data_and_fsdp_match_one_device(layouts):
    ref = layouts["one_device"]
    assert float(np.max(np.abs(ref))) > 0
    for key in ("data", "data_fsdp", "pmap"):
        _close(layouts[key], ref)
    assert int(layouts["fsdp_sharded_leaves"]) > 0  # the fsdp layout really splits parameters
    assert bool(layouts["pmap_replicas_equal"])


def test_checkpoint_restores_onto_another_device_count(layouts):
    np.testing.assert_array_equal(layouts["restored_1"], layouts["data"])
    np.testing.assert_array_equal(layouts["restored_fsdp"], layouts["data"])
    assert int(layouts["restored_1_devices"]) == 1
    assert int(layouts["restored_data_state"]) == 3 and int(layouts["restored_config_batch"]) == 8
    _close(layouts["continued_1"], layouts["continued_n"])


@pytest.mark.process("two jax.distributed processes are the property")
def test_two_processes_train_together_like_one(layouts, tmp_path, subprocess_env):
    """Two local processes (gloo collectives, 2 CPU devices each) each feed half of every global batch."""
    port, out = free_port(), tmp_path / "two.npz"
    procs = [subprocess.Popen([sys.executable, WORKER, "process", str(i), "2", str(port), str(out)],
                              env=subprocess_env(2),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=1800)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errs)
    res = np.load(out)
    assert int(res["devices"]) == 4
    _close(res["params"], layouts["one_device"])


def test_bad_input_fails_with_one_line_before_compiling(fake_config, tmp_path, run_main, last_error_line,
                                                         multi_device):
    tiny = "--config=experiments/configs/tiny.py"
    data = [f"--config.data.manual_dir={fake_config.data.manual_dir}", f"--config.data.data_dir={fake_config.data.data_dir}"]
    proc = run_main([tiny, f"--workdir={tmp_path}/a", "--config.training.bach_size=3"])
    assert last_error_line(proc).startswith("error: unknown config key: bach_size") and "Traceback" not in proc.stderr
    proc = run_main([tiny, f"--workdir={tmp_path}/b", f"--config.data.manual_dir={tmp_path}/nowhere",
                  f"--config.data.data_dir={tmp_path}/fresh_tfds"])
    line = last_error_line(proc)
    assert line.startswith("error:") and "nowhere" in line and "Traceback" not in proc.stderr
    with open(os.path.join(multi_device, "cli.json")) as f:  # run on 4 devices by tests/train_worker.py
        proc = subprocess.CompletedProcess([], **json.load(f), stdout="")
    assert last_error_line(proc) == "error: training.batch_size=6 is not divisible by the number of devices (4)"
    proc = run_main([tiny, f"--workdir={tmp_path}/d", "--config.diffusion.schedule=cosin", *data])
    assert "diffusion.schedule='cosin'" in last_error_line(proc)
    for d in "abd":
        assert not (tmp_path / d / "checkpoints").exists()
    assert not os.path.exists(os.path.join(multi_device, "cli", "checkpoints"))


@pytest.mark.parametrize("name", ["tiny", "fashion_mnist", "fashion_mnist_long", "fashion_mnist_dit", "cifar10",
                                  "sd_finetune_folder", "text_to_image_folder"])
def test_experiment_configs_are_valid(name):
    import importlib

    from diffjax.config import validate

    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    validate(config)
    # Tuples stay tuples, so that they can be overridden on the command line.
    assert isinstance(config.model.unet.channel_mult, tuple)
    with config.unlocked():
        config.training.bach_size = 3
    with pytest.raises(ValueError, match="unknown config key 'training.bach_size'"):
        validate(config)


def test_load_config_applies_typed_overrides_and_rejects_unknown_keys():
    from diffjax.config import load_config, validate

    config = load_config("experiments/configs/fashion_mnist.py", [
        "optim.learning_rate=1", "model.unet.attention_levels=(1, 2)", "diffusion.prediction_type=eps",
        "training.progress_bar=False", "data.num_threads=0",
    ])
    validate(config)
    assert config.optim.learning_rate == 1.0 and isinstance(config.optim.learning_rate, float)
    assert config.model.unet.attention_levels == (1, 2)
    assert config.diffusion.prediction_type == "eps"
    assert config.training.progress_bar is False
    assert config.data.num_threads == 0
    for bad in ("training.bach_size=3", "nosection.key=1", "training.batch_size"):
        with pytest.raises(ValueError, match="expected KEY=VALUE with a key of the config"):
            load_config("experiments/configs/fashion_mnist.py", [bad])


@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # clipped / left alone
def test_clip_with_the_norm_given_equals_optax_clip(max_norm):
    """train.clip_by_global_norm clips as optax's does, with the norm computed or passed in (the train step passes
    the one it computed for its guard), and has the same state, so optimizer states and checkpoints match."""
    import optax

    from diffjax.train import clip_by_global_norm

    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
    grads = jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    theirs = optax.chain(optax.clip_by_global_norm(max_norm), optax.adamw(1e-2, weight_decay=0.1))
    ours = optax.chain(clip_by_global_norm(max_norm), optax.adamw(1e-2, weight_decay=0.1))
    state = theirs.init(params)
    assert jax.tree_util.tree_structure(ours.init(params)) == jax.tree_util.tree_structure(state)
    want, want_state = theirs.update(grads, state, params)
    norm = optax.tree.norm(grads)
    for kwargs in ({}, {"global_norm": norm}):
        got, got_state = ours.update(grads, state, params, **kwargs)
        for a, b in zip(jax.tree_util.tree_leaves((got, got_state)), jax.tree_util.tree_leaves((want, want_state))):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    clipped, _ = clip_by_global_norm(max_norm).update(grads, optax.EmptyState(), global_norm=norm)
    assert np.isclose(float(optax.tree.norm(clipped)), min(float(norm), max_norm), rtol=1e-5)


def _kernels(compiled) -> int:
    """Kernels in a compiled CPU program: its fusions and custom calls (XLA:CPU compiles each as one)."""
    import re

    entry = compiled.as_text().split("ENTRY")[1]
    return len(re.findall(r" (?:fusion|custom-call)\(", entry))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="counts XLA:CPU's kernels")
def test_global_norm_concatenating_small_leaves_is_the_norm_in_one_kernel():
    """train.global_norm equals optax's norm whichever leaves it concatenates; on the CPU, the small leaves summed
    as one vector compile to a couple of kernels, where a sum per leaf compiles to one kernel per leaf."""
    import jax.numpy as jnp
    import optax

    from diffjax.train import global_norm

    rng = np.random.default_rng(1)
    tree = {f"b{i}": rng.normal(size=(i + 3,)).astype(np.float32) for i in range(40)}
    tree["w"] = rng.normal(size=(64, 48)).astype(np.float32)
    tree["half"] = jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16)  # concatenated with float32 leaves: promoted
    tree["empty"] = np.zeros((0, 3), np.float32)
    want = float(optax.tree.norm(jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)))
    for concat_below in (0, 10, 100, 10_000):
        assert np.isclose(float(global_norm(tree, concat_below)), want, rtol=1e-5), concat_below
    assert float(global_norm({}, 100)) == 0.0
    per_leaf = _kernels(jax.jit(lambda t: global_norm(t, 0)).lower(tree).compile())
    together = _kernels(jax.jit(lambda t: global_norm(t, 100)).lower(tree).compile())
    assert per_leaf >= 30 and together <= 6, (per_leaf, together)
