"""Faults a long preemptible run meets, each injected here: non-finite and spiking updates, SIGTERM and Ctrl-C,
a second run on the same workdir, damaged and partial checkpoints. What must hold: no completed checkpoint is
lost, nothing non-finite is saved, and every stop is one line and a non-zero exit (or exit 0 with a
checkpoint, for a preemption)."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fakes import flat, free_port

# Restores that fail on purpose leave orbax/tensorstore objects whose finalisers complain at garbage collection
# ("Event loop is closed"), thousands of lines attributed to whichever test runs then.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# ------------------------------------------------------------------------------------------------------
# Divergence.
# ------------------------------------------------------------------------------------------------------


def test_update_guard_counts_and_the_running_loss_statistics():
    from diffjax.train import SPIKE_EMA_DECAY, SPIKE_WARMUP, init_guard, update_guard

    rng = np.random.default_rng(0)
    losses = 1.0 + 0.01 * rng.standard_normal(SPIKE_WARMUP + 10)
    g = init_guard()
    for i, loss in enumerate(losses):
        accept, g = update_guard(g, jnp.int32(i), jnp.float32(loss), jnp.float32(1.0), spike_sigma=6.0)
        assert bool(accept)
    # The statistics are the exponentially weighted mean and variance of the accepted losses.
    mean, var = float(losses[0]), 0.0
    for x in losses[1:]:
        d = x - mean
        mean += (1 - SPIKE_EMA_DECAY) * d
        var = SPIKE_EMA_DECAY * (var + (1 - SPIKE_EMA_DECAY) * d * d)
    assert float(g["loss_mean"]) == pytest.approx(mean, rel=1e-5) and float(g["loss_var"]) == pytest.approx(var, rel=1e-3)
    n = len(losses)
    cases = [(1.5, 1.0, False, "spike"), (float("nan"), 1.0, False, "nan loss"), (1.0, float("inf"), False, "inf grad"),
             (1.0, 1.0, True, "ordinary")]
    for k, (loss, gnorm, want, what) in enumerate(cases):
        before = g
        accept, g = update_guard(g, jnp.int32(n + k), jnp.float32(loss), jnp.float32(gnorm), spike_sigma=6.0)
        assert bool(accept) == want, what
        if not want:  # a skipped update leaves the statistics alone
            for key in ("loss_mean", "loss_var", "accepted"):
                assert float(g[key]) == float(before[key]), (what, key)
            assert int(g["last_skipped"]) == n + k + 1
    assert int(g["skipped"]) == 3 and int(g["nonfinite"]) == 2 and int(g["consecutive"]) == 0
    assert int(g["accepted"]) == n + 1
    # Off (sigma 0): a spike is an ordinary update.
    assert bool(update_guard(g, jnp.int32(0), jnp.float32(100.0), jnp.float32(1.0), spike_sigma=0.0)[0])


def test_a_non_finite_update_is_skipped_inside_the_step(trainer, fake_config):
    from diffjax.data import make_dataset

    it = make_dataset(fake_config.data, trainer.models.text_encoder, split="train", global_batch_size=8, seed=0)
    good = next(it)
    state = trainer.init()
    state, _ = trainer.step(state, trainer.shard_batch(good))
    before = jax.device_get(state)
    bad = dict(good, image=np.full_like(good["image"], np.nan))
    state, metrics = trainer.step(state, trainer.shard_batch(bad))
    after = jax.device_get(state)
    assert not np.isfinite(float(metrics["loss"]))
    for part in ("params", "ema_params", "opt_state"):
        np.testing.assert_array_equal(flat(getattr(after, part)), flat(getattr(before, part)))
    assert int(after.step) == 2 and int(after.guard["skipped"]) == 1 and int(after.guard["last_skipped"]) == 2
    assert not np.array_equal(np.asarray(after.rng), np.asarray(before.rng))
    state, metrics = trainer.step(state, trainer.shard_batch(good))  # the next good batch trains again
    assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped_updates"]) == 1
    assert not np.array_equal(flat(state.params), flat(after.params))
    assert int(state.guard["consecutive"]) == 0


def _data_flags(config):
    return [f"--config.data.manual_dir={config.data.manual_dir}", f"--config.data.data_dir={config.data.data_dir}"]


def _restore_all(trainer, workdir, parts=("params", "ema_params")):
    """{step: {part: tree}} of every checkpoint in ``workdir`` (only ``parts`` of the state are read, so the run
    may have had another optimizer than ``trainer``)."""
    from diffjax.checkpoints import Checkpointer

    target = trainer.restore_target()
    ckpt = Checkpointer.existing(os.path.join(workdir, "checkpoints"))
    out = {step: ckpt.restore_subtree({p: getattr(target, p) for p in parts}, step) for step in ckpt.steps()}
    ckpt.close()
    return out


@pytest.mark.trains("a run with a learning rate of 1e30")
@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_diverging_run_stops_with_one_line_and_finite_checkpoints(policy, fake_config, trainer, tmp_path, run_main,
                                                                   last_error_line):
    """A learning rate of 1e30: step 1 throws the parameters to ~1e30, every later loss is NaN. Step 1's checkpoint
    holds those parameters: it is moved to suspect_checkpoints/ once step 2 shows the divergence, and no state with
    skipped updates is saved."""
    workdir = tmp_path / "run"
    proc = run_main(["--config=experiments/configs/tiny.py", f"--workdir={workdir}", *_data_flags(fake_config),
                     "--config.optim.learning_rate=1e30", "--config.optim.grad_clip_norm=0",
                     "--config.training.num_steps=8", "--config.training.log_every=1",
                     "--config.training.checkpoint_every=1", f"--config.training.on_nonfinite={policy}",
                     "--config.training.max_consecutive_skips=3"])
    line = last_error_line(proc)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    if policy == "stop":
        assert line.startswith("error: the loss or gradient was not finite at step 2 (training.on_nonfinite=stop); "
                               "stopped at step 2, no good checkpoint is on disk"), line
    else:
        assert line.startswith("error: 3 updates in a row were skipped"), line
        assert "the last at step 4" in line and "no good checkpoint is on disk" in line
    assert os.listdir(workdir / "checkpoints") == []
    assert [d.split("_")[1] for d in os.listdir(workdir / "suspect_checkpoints")] == ["1"]


# ------------------------------------------------------------------------------------------------------
# Preemption, Ctrl-C, one run per workdir.
# ------------------------------------------------------------------------------------------------------


def _start(args, env):
    return subprocess.Popen([sys.executable, "-m", "experiments.main", *args], env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc, needle, timeout=600, until=None):
    """Read the process's stderr until a line contains ``needle`` (and, if given, ``until()`` holds once it has
    appeared); returns the lines read."""
    lines, seen, t0 = [], False, time.time()
    while time.time() - t0 < timeout:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        seen = seen or needle in line
        if seen and (until is None or until()):
            return lines
    raise AssertionError(f"{needle!r} never appeared" + (" with the condition met" if seen else "") + ":\n"
                         + "".join(lines[-30:]))


def _complete_steps(workdir) -> list[int]:
    """The committed checkpoint steps in ``workdir`` (orbax renames a step's directory to its number last)."""
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


@pytest.mark.process("signals reach a training process")
@pytest.mark.trains("the resumed and the straight runs, compared bitwise")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_checkpoints_exits_zero_and_resumes_bitwise(sig, fake_config, trainer, tmp_path, subprocess_env,
                                                              run_main, last_error_line):
    # A constant learning rate, so that num_steps changes nothing but where the run ends: the interrupted run
    # is set to go on for long, the resumed and the straight runs end at the same step.
    flags = ["--config=experiments/configs/tiny.py", *_data_flags(fake_config), "--config.optim.lr_schedule=constant",
             "--config.training.log_every=1", "--config.training.checkpoint_every=100000"]
    run = tmp_path / "run"
    proc = _start([f"--workdir={run}", *flags, "--config.training.num_steps=100000"], subprocess_env())
    try:
        _wait_for_line(proc, "step 3:")
        if sig == signal.SIGTERM:  # meanwhile, a second run on the same workdir refuses to start
            other = run_main([f"--workdir={run}", *flags])
            assert "is in use by another run (pid" in last_error_line(other)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "stopped at step" in err and signal.Signals(sig).name in err
    saved = _restore_all(trainer, str(run))
    (stopped_at,) = saved
    assert stopped_at >= 3
    if sig == signal.SIGINT:
        return
    # Resume for 3 more steps; an uninterrupted run to the same step gives bitwise the same parameters.
    steps = stopped_at + 3
    flags.append(f"--config.training.num_steps={steps}")
    proc = run_main([f"--workdir={run}", *flags, "--verbosity=0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # At INFO, diffjax's lines without orbax's bookkeeping and the config dump; --verbosity=1 shows those too.
    assert f"resumed from step {stopped_at}" in proc.stderr and f"step {steps}: loss" in proc.stderr
    assert "CheckpointManager" not in proc.stderr and "config (shown" not in proc.stderr, proc.stderr
    straight = tmp_path / "straight"
    proc = run_main([f"--workdir={straight}", *flags, "--verbosity=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CheckpointManager created" in proc.stderr and "config (shown with --verbosity=1):" in proc.stderr
    parts = ("params", "ema_params", "opt_state", "rng", "guard")
    resumed, direct = (_restore_all(trainer, str(w), parts)[steps] for w in (run, straight))
    for part in parts:
        np.testing.assert_array_equal(flat(resumed[part]), flat(direct[part]), err_msg=part)


@pytest.mark.process("the lock's holder is a process that dies")
def test_the_workdir_lock_is_released_when_its_holder_dies(tmp_path):
    from diffjax.loop import RunError, workdir_lock

    code = (f"import fcntl, os; f = open({str(tmp_path / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            f"f.write('pid %d' % os.getpid()); f.flush(); print('locked', flush=True); import time; time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=f"is in use by another run \\(pid {holder.pid}\\)"):
            with workdir_lock(str(tmp_path)):
                pass
    finally:
        holder.kill()
        holder.wait()
    with workdir_lock(str(tmp_path)):  # SIGKILLed holder: no stale lock
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()


def _start_pair(run, fake_config, subprocess_env, num_steps, heartbeat_timeout=10):
    """Two experiments.main processes of one run (gloo collectives on 127.0.0.1, one CPU device each)."""
    port = free_port()
    procs = []
    for i in range(2):
        env = dict(subprocess_env(1), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   DIFFJAX_HEARTBEAT_TIMEOUT_SECONDS=str(heartbeat_timeout))
        procs.append(_start([f"--workdir={run}", "--config=experiments/configs/tiny.py", *_data_flags(fake_config),
                             "--config.optim.lr_schedule=constant", "--config.training.log_every=1",
                             "--config.training.checkpoint_every=4", f"--config.training.num_steps={num_steps}"], env))
    return procs


@pytest.mark.process("two jax.distributed processes, a signal, and one of them killed")
@pytest.mark.slow
def test_a_pair_of_processes_stops_together_on_sigterm_stops_when_one_dies_and_resumes(fake_config, trainer, tmp_path,
                                                                                      subprocess_env):
    """Two processes of one run (gloo on 127.0.0.1), three times over one workdir:
    1. a preemption notice reaches one host: JAX's preemption sync makes both checkpoint the same step and exit 0;
    2. resumed, one is SIGKILLed mid-run: the other stops within the heartbeat timeout, naming the cause,
       instead of hanging in a collective;
    3. a rerun of both resumes from the newest complete checkpoint and finishes."""
    run = tmp_path / "run"
    timeout = 10

    procs = _start_pair(run, fake_config, subprocess_env, 100000, heartbeat_timeout=60)
    try:
        _wait_for_line(procs[0], "step 6:")
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    stops = [int(re.search(r"stopped at step (\d+)", err).group(1)) for _, err in outs]
    assert stops[0] == stops[1] >= 6
    assert stops[0] in _restore_all(trainer, str(run))

    procs = _start_pair(run, fake_config, subprocess_env, 100000, heartbeat_timeout=timeout)
    try:  # killed once a save of this run is committed (on a loaded machine that takes several steps)
        seen = _wait_for_line(procs[0], f"step {stops[0] + 2}:",
                              until=lambda: any(step > stops[0] for step in _complete_steps(run)))
        procs[1].kill()
        t0 = time.time()
        _, err = procs[0].communicate(timeout=timeout + 170)  # bounded: the heartbeat timeout and a margin
        waited = time.time() - t0
    finally:
        for p in procs:
            p.kill()
    assert f"resumed from step {stops[0]}" in "".join(seen)
    assert procs[0].returncode != 0, (procs[0].returncode, waited)
    assert "another task died" in err or "heartbeat" in err, err[-3000:]
    complete = _complete_steps(run)
    assert complete and complete[-1] > stops[0], complete

    procs = _start_pair(run, fake_config, subprocess_env, complete[-1] + 3, heartbeat_timeout=timeout)
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:] + outs[1][1][-3000:]
    assert f"resumed from step {complete[-1]}" in outs[0][1]
    assert complete[-1] + 3 in _restore_all(trainer, str(run))


# ------------------------------------------------------------------------------------------------------
# Damaged and partial checkpoints.
# ------------------------------------------------------------------------------------------------------


def _damage(step_dir, how):
    data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
    biggest = max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)
    if how == "truncate":
        with open(biggest, "r+b") as f:
            f.truncate(os.path.getsize(biggest) // 2)
    elif how == "zero":
        size = os.path.getsize(biggest)
        with open(biggest, "r+b") as f:
            f.write(b"\0" * size)
    elif how == "delete_metadata":
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
    elif how == "empty":
        open(os.path.join(step_dir, "state", "manifest.ocdbt"), "w").close()


@pytest.fixture(scope="module")
def run_to_3(trainer, tmp_path_factory):
    """The fake run trained to step 2, then resumed to step 3: checkpoints 2 and 3 (copied by ``_copy_run``)."""
    from diffjax import loop

    workdir = str(tmp_path_factory.mktemp("run_to_3") / "run")
    loop.train(trainer, workdir, stop_at=2)
    loop.train(trainer, workdir, stop_at=3)
    return workdir


def _copy_run(run_to_3, tmp_path, steps=(2, 3)) -> str:
    """A copy of ``run_to_3``'s workdir keeping the checkpoints of ``steps``."""
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(run_to_3, workdir)
    for step in {2, 3} - set(steps):
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    return workdir


@pytest.mark.parametrize("how", ["truncate", "zero", "delete_metadata", "empty"])
def test_a_damaged_newest_checkpoint_is_named_then_set_aside(how, trainer, fake_config, run_to_3, tmp_path):
    from diffjax import loop

    tc = fake_config.training
    workdir = _copy_run(run_to_3, tmp_path)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["2", "3"]
    _damage(os.path.join(ckpt_dir, "3"), how)
    # The newest step and what is wrong with it, in one line; nothing moved or deleted.
    with fake_config.unlocked():
        tc.on_corrupt_checkpoint = "fail"
        try:
            with pytest.raises(loop.RunError) as e:
                loop.train(trainer, workdir)
        finally:
            tc.on_corrupt_checkpoint = "fallback"
    message = str(e.value)
    assert message.startswith("checkpoint step 3 cannot be read: ") and "\n" not in message
    assert {"truncate": "cannot give the array", "zero": "cannot give the array",
            "delete_metadata": "state/_METADATA is missing", "empty": "state/manifest.ocdbt is empty"}[how] in message
    assert sorted(os.listdir(ckpt_dir)) == ["2", "3"]
    # fallback (the default): step 3 is moved aside for inspection, the run resumes from step 2 and finishes.
    state = loop.train(trainer, workdir)
    assert int(state.step) == tc.num_steps
    (aside,) = os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
    assert aside.startswith("step_3_")
    assert 2 in [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()]


@pytest.mark.parametrize("how", ["truncate", "empty"])
def test_sampling_from_a_damaged_newest_checkpoint_falls_back_with_one_warning(how, trainer, run_to_3, tmp_path,
                                                                               caplog):
    """Text2Image.from_checkpoint (--mode=sample/eval/export) of a workdir whose newest checkpoint is damaged: the
    previous step's parameters, with one warning naming the damaged step and file (it used to raise orbax's
    errors); with that step asked for, one ValueError line naming the damage. Nothing on disk changes."""
    from diffjax.pipeline import Text2Image

    workdir = _copy_run(run_to_3, tmp_path)
    _damage(os.path.join(workdir, "checkpoints", "3"), how)
    with caplog.at_level("WARNING"):
        pipe = Text2Image.from_checkpoint(workdir)
    assert pipe.step == 2
    warned = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("checkpoint step 3 cannot be read (") \
        and "using the previous one" in warned[0], warned
    good = _restore_all(trainer, str(run_to_3))[2]["ema_params"]["unet"]
    np.testing.assert_array_equal(flat(pipe.denoiser_params), flat(good))
    with pytest.raises(ValueError, match=r"^checkpoint step 3 cannot be read: .*checkpoints/3") as e:
        Text2Image.from_checkpoint(workdir, step=3)
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]


def test_no_fresh_start_over_unreadable_or_mismatched_checkpoints(trainer, fake_config, run_to_3, tmp_path):
    """The only checkpoint damaged: RunError and nothing moved, also on the next attempt (an automatic restart
    must not begin again at step 0). A checkpoint whose files are whole but whose state does not fit the run
    (a changed config) is not "corrupt": RunError, nothing moved."""
    from diffjax import loop
    from diffjax.checkpoints import Checkpointer

    workdir = _copy_run(run_to_3, tmp_path, steps=(2,))
    _damage(os.path.join(workdir, "checkpoints", "2"), "truncate")
    for _ in range(2):
        with pytest.raises(loop.RunError, match="no checkpoint in .* can be read .*step 2.*nothing was moved"):
            loop.train(trainer, workdir)
        assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
        assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))
    # A whole checkpoint of another state layout (here: the state without its optimizer moments).
    other = str(tmp_path / "other")
    state = trainer.init()
    ckpt = Checkpointer(os.path.join(other, "checkpoints"))
    ckpt.save(1, state.replace(opt_state=()), None, fake_config)
    ckpt.close()
    with pytest.raises(loop.RunError, match="step 1 .* cannot be restored into this run's state .* was the config "
                                            "changed"):
        loop.train(trainer, other)
    assert os.listdir(os.path.join(other, "checkpoints")) == ["1"]


def test_from_checkpoint_with_a_frozen_text_encoder_reads_its_parameters(tmp_path):
    """A frozen encoder's parameters live in TrainState.frozen; use_ema picks the EMA or the raw U-Net."""
    from diffjax.checkpoints import Checkpointer
    from diffjax.pipeline import Text2Image
    from diffjax.train import Trainer
    from fakes import tiny_config

    config = tiny_config()
    config.text.trainable = False
    trainer = Trainer(config, image_shape=(8, 8, 1))
    # A state of the run's layout with random values (no initialisation to compile): what is read back is compared.
    rng = np.random.default_rng(0)
    state = jax.tree_util.tree_map(lambda s: jax.device_put(rng.normal(size=s.shape).astype(s.dtype), s.sharding),
                                   trainer.abstract_state)
    assert "text" not in state.params and "text" in state.frozen
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(5, state, None, config)
    ckpt.close()
    for use_ema, unet in ((True, state.ema_params["unet"]), (False, state.params["unet"])):
        pipe = Text2Image.from_checkpoint(str(tmp_path), use_ema=use_ema)
        np.testing.assert_array_equal(flat(pipe.denoiser_params), flat(unet))
        np.testing.assert_array_equal(flat(pipe.text_params), flat(state.frozen["text"]))


def test_a_partial_checkpoint_is_ignored_and_reported(trainer, fake_config, run_to_3, tmp_path, caplog):
    from diffjax import loop

    workdir = _copy_run(run_to_3, tmp_path, steps=(2,))
    # What a save killed before its rename leaves: orbax's temporary directory.
    partial = os.path.join(workdir, "checkpoints", "3.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(partial, "state"))
    with caplog.at_level("WARNING"):
        state = loop.train(trainer, workdir, stop_at=3)
    assert int(state.step) == 3
    assert any("ignoring 1 partial checkpoint(s)" in r.getMessage() for r in caplog.records)


@pytest.mark.trains("a good run resumed with a learning rate of 1e30, through the command line")
def test_a_good_run_that_diverges_keeps_its_last_good_checkpoint_and_fails(trainer, fake_config, run_to_3, tmp_path,
                                                                          run_main, last_error_line):
    """Resumed from step 3 with a learning rate of 1e30 and keep_checkpoints=1: step 4's update throws the
    parameters to ~1e30 (finite, so it is saved), every later loss is NaN. Step 4's checkpoint is set aside once step
    5 shows the divergence, no later state is saved, step 3 is never rotated out, and the run ends in one line with
    exit status 2 (it used to exit 0 with only the diverged checkpoints left)."""
    workdir = _copy_run(run_to_3, tmp_path)
    before = _restore_all(trainer, workdir)[3]
    proc = run_main(["--config=experiments/configs/tiny.py", f"--workdir={workdir}", *_data_flags(fake_config),
                     "--config.optim.learning_rate=1e30", "--config.training.num_steps=7",
                     "--config.training.checkpoint_every=1", "--config.training.keep_checkpoints=1",
                     "--config.training.max_consecutive_skips=0"])
    line = last_error_line(proc)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert line == ("error: the run ended at step 7 with its last 3 update(s) skipped (non-finite or spiking loss): "
                    "the run diverged and its state was not saved; the last good checkpoint (step 3) is intact; "
                    "lower optim.learning_rate"), line
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
    assert [d.split("_")[1] for d in os.listdir(os.path.join(workdir, "suspect_checkpoints"))] == ["4"]
    kept = _restore_all(trainer, workdir)[3]  # loads, and is the good run's
    for part in ("params", "ema_params"):
        np.testing.assert_array_equal(flat(kept[part]), flat(before[part]))


def test_rotation_never_deletes_the_last_good_checkpoint_for_an_unfinished_one(trainer, fake_config, tmp_path,
                                                                              monkeypatch):
    """keep_checkpoints=1: a save that dies before it is committed (here: the commit raises, as a process
    killed at that point would never reach it) must leave the previous checkpoint on disk and restorable."""
    import orbax.checkpoint as ocp

    from diffjax.checkpoints import Checkpointer

    state = trainer.init()
    directory = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(directory, max_to_keep=1)
    ckpt.save(1, state, None, fake_config)
    ckpt.wait()

    def crash(self, step):
        raise RuntimeError("killed during the commit")

    monkeypatch.setattr(ocp.CheckpointManager, "_finalize_checkpoint", crash)
    ckpt.save(2, state.replace(step=state.step + 1), None, fake_config)
    with pytest.raises(Exception):
        ckpt.close()
    monkeypatch.undo()
    fresh = Checkpointer(directory, max_to_keep=1)
    assert 1 in fresh.steps()  # not rotated out: deletion of old steps runs only after a successful commit
    restored, _, _ = fresh.restore(trainer.restore_target(), 1)
    np.testing.assert_array_equal(flat(restored.params), flat(state.params))
    fresh.close()


@pytest.mark.parametrize("key, value, message", [
    ("training.keep_checkpoints", 0, "config.training.keep_checkpoints=0 must be a positive integer"),
    ("training.eval_every", -5, "config.training.eval_every=-5 must be >= 0"),
    ("optim.learning_rate", -1.0, "config.optim.learning_rate=-1.0 must be >= 0"),
    ("data.image_size", 30, "config.data.image_size=30 is not a multiple of 4"),
    ("data.channels", 3, "config.model.unet.in_channels=1 does not match config.data.channels=3"),
    ("training.on_nonfinite", "ignore", "config.training.on_nonfinite='ignore': expected one of skip, stop"),
    ("training.on_corrupt_checkpoint", "retry", "expected one of fallback, fail"),
    ("training.max_consecutive_skips", -1, "config.training.max_consecutive_skips=-1 must be >= 0"),
    ("sampling.num_steps", 0, "config.sampling.num_steps=0 must be in 1..1000"),
])
def test_inconsistent_or_out_of_range_config_values_fail_in_one_line(key, value, message):
    from diffjax.config import load_config, validate

    config = load_config("experiments/configs/fashion_mnist.py", [f"{key}={value}"])
    with pytest.raises(ValueError) as e:
        validate(config)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.fixture()
def small_filesystem(tmp_path):
    """``mount(size_kb, read_only=False)``: a tmpfs under tmp_path (the machines run as root; skipped where
    mounting is not allowed), unmounted at the end."""
    mounted = []

    def mount(size_kb, read_only=False):
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        options = f"size={size_kb}k" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], capture_output=True)


@pytest.mark.process("the exit path that silences orbax's threads, and mount")
def test_disk_full_at_save_time_and_a_read_only_workdir(trainer, fake_config, run_to_3, tmp_path, run_main,
                                                        last_error_line, small_filesystem):
    step_dir = os.path.join(run_to_3, "checkpoints", "2")  # the size of one checkpoint
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(step_dir) for f in fs)
    disk = small_filesystem(int(size * 1.6) // 1024)  # room for one checkpoint, not two
    workdir = disk / "run"
    flags = ["--config=experiments/configs/tiny.py", *_data_flags(fake_config), "--config.training.num_steps=8",
             "--config.training.checkpoint_every=2"]
    proc = run_main([f"--workdir={workdir}", *flags], process=True)  # the exit path that silences orbax's threads
    line = last_error_line(proc)
    assert proc.returncode == 2 and line.startswith(f"error: saving a checkpoint in {workdir / 'checkpoints'} failed"), (
        proc.returncode, proc.stderr[-3000:])
    # Which save runs out of room depends on how well each checkpoint compresses (step 4's may still fit): the
    # line must name the newest complete checkpoint on disk, and that one must restore.
    named = re.search(r"the last complete checkpoint \(step (\d+)\) is intact$", line)
    complete = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert named and complete and int(named.group(1)) == complete[-1] < 8, (line, complete)
    assert complete[-1] in _restore_all(trainer, str(workdir)), os.listdir(workdir / "checkpoints")
    read_only = small_filesystem(64, read_only=True)
    proc = run_main([f"--workdir={read_only / 'run'}", *flags], process=True)
    assert proc.returncode == 2 and "Read-only file system" in last_error_line(proc), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
