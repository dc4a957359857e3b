"""Power-function EMA and post-hoc EMA reconstruction (diffjax.posthoc_ema): Karras et al. 2024's widths, EMA
profiles against the recurrence, reconstruction against a directly computed EMA, and snapshots written by training
and read back by ``Text2Image.from_checkpoint(..., ema_sigma_rel=...)``."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from diffjax import posthoc_ema as P
from fakes import flat


def run_ema(thetas: np.ndarray, decays: np.ndarray) -> np.ndarray:
    """e_0 = θ_0, e_{k+1} = d_k e_k + (1 - d_k) θ_{k+1}: the EMA after every update (as train_step computes it)."""
    out = [thetas[0]]
    for k, d in enumerate(decays):
        out.append(d * out[-1] + (1.0 - d) * thetas[k + 1])
    return np.stack(out)


def test_sigma_rel_and_gamma_match_karras():
    # Karras et al. 2024, section 3.2: the two EMAs they store have σ_rel 0.05 and 0.10, i.e. γ = 16.97 and 6.94.
    assert P.gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=5e-3)
    assert P.gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=5e-3)
    for s in (0.01, 0.07, 0.2, P.SIGMA_REL_MAX):
        assert P.sigma_rel_of_gamma(P.gamma_of_sigma_rel(s)) == pytest.approx(s, rel=1e-9)
    assert P.gamma_of_sigma_rel(P.SIGMA_REL_MAX) == pytest.approx(0.0, abs=1e-6)  # the uniform average
    for bad in (0.0, -0.1, 0.3, float("nan")):
        with pytest.raises(ValueError, match="--ema_sigma_rel"):
            P.check_sigma_rel(bad, "--ema_sigma_rel")


def test_ema_profile_reproduces_the_recurrence_and_the_train_steps_decays():
    from diffjax.train import ema_decay

    rng = np.random.default_rng(0)
    decays = rng.uniform(0.0, 1.0, 40)
    thetas = rng.normal(size=(41, 5))
    w = P.ema_profile(decays)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(w @ thetas, run_ema(thetas, decays)[-1], rtol=1e-12, atol=1e-12)
    # The decays the profiles assume are the ones the compiled train step uses.
    steps = np.arange(3000)
    np.testing.assert_allclose(np.asarray(ema_decay(steps, 0.999, True)), P.warmup_decays(3000, 0.999, True), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ema_decay(steps, 0.99, False)), P.warmup_decays(3000, 0.99, False), rtol=1e-6)
    gamma = P.gamma_of_sigma_rel(0.1)
    np.testing.assert_allclose(np.asarray(ema_decay(steps, 0.999, True, gamma)), P.power_decays(3000, gamma),
                               rtol=1e-5, atol=1e-6)
    cfg = ml_collections.ConfigDict(dict(decay=0.999, warmup=True, sigma_rel=0.1))
    np.testing.assert_array_equal(P.ema_decays(cfg, 50), P.power_decays(50, gamma))


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_power_profile_has_the_requested_width_at_every_length(sigma_rel):
    gamma = P.gamma_of_sigma_rel(sigma_rel)
    for n in (500, 4000):
        w = P.ema_profile(P.power_decays(n, gamma))
        s = np.arange(n + 1) / n
        mean = w @ s
        assert np.sqrt(w @ s**2 - mean**2) == pytest.approx(sigma_rel, rel=2e-3)
        # The shape (γ + 1) s^γ / n^(γ + 1) of the continuous profile, away from the first steps.
        tail = slice(n // 4, None)
        np.testing.assert_allclose(w[tail] * n, (gamma + 1) * s[tail] ** gamma, rtol=0.05, atol=1e-4)


def test_reconstruction_recovers_a_power_ema_from_the_warmup_emas_snapshots():
    """A training-like trajectory (drift + noise), the configs' EMA (warmup, decay 0.999) snapshotted every 10
    steps with the raw parameters: the post-hoc EMA of σ_rel 0.05 / 0.1 / 0.15 equals the power-function EMA
    computed along the trajectory to within a small fraction of how far the parameters moved."""
    rng = np.random.default_rng(1)
    n, dim = 600, 64
    thetas = np.cumsum(rng.normal(size=(n + 1, dim)), axis=0) * 0.05 + rng.normal(size=(n + 1, dim)) * 0.5
    cfg = ml_collections.ConfigDict(dict(decay=0.999, warmup=True, sigma_rel=0.0))
    emas = run_ema(thetas, P.ema_decays(cfg, n))
    steps = list(range(10, n + 1, 10))
    for sigma_rel in (0.05, 0.1, 0.15):
        plan, residual = P.plan(steps, cfg, n, sigma_rel)
        built = sum(w * (emas[s] if which == "ema_params" else thetas[s]) for s, which, w in plan)
        direct = run_ema(thetas, P.power_decays(n, P.gamma_of_sigma_rel(sigma_rel)))[-1]
        assert residual < 0.05, (sigma_rel, residual)
        assert sum(w for *_, w in plan) == pytest.approx(1.0, abs=1e-9)
        err = np.abs(built - direct).max()
        moved = np.abs(direct - emas[-1]).max()  # how far the target is from the EMA the run kept
        assert err < 0.02 * np.abs(thetas[-1] - thetas[0]).max() and err < 0.2 * moved, (sigma_rel, err, moved)
    # A run whose EMA is the target's power function: its last snapshot alone, exactly.
    power = ml_collections.ConfigDict(dict(decay=0.999, warmup=True, sigma_rel=0.1))
    plan, residual = P.plan(steps, power, n, 0.1)
    weights = {(s, which): w for s, which, w in plan}
    assert residual < 1e-9 and weights[(n, "ema_params")] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(FileNotFoundError, match="no EMA snapshot at step 605; snapshots: 10, 20, ..., 600"):
        P.plan(steps, cfg, 605, 0.1)


def test_training_writes_snapshots_that_build_the_post_hoc_ema(trainer, fake_config, tmp_path):
    """snapshot_every = 1 on the 4-step fake run, stopped at step 2 and resumed (a stale snapshot at step 3 of the
    abandoned trajectory is replaced): every snapshot holds that step's parameters and EMA, and from_checkpoint
    with ema_sigma_rel gives the plan's weighted sum of them; the frozen parts come from the checkpoint."""
    from diffjax import loop
    from diffjax.checkpoints import Checkpointer
    from diffjax.pipeline import Text2Image

    work = str(tmp_path / "run")
    with fake_config.unlocked():
        fake_config.ema.snapshot_every = 1
    try:
        loop.train(trainer, work, stop_at=2)
        snaps = Checkpointer(os.path.join(work, P.SNAPSHOT_DIR))
        stale = trainer.init(seed=5)
        snaps.save(3, P.snapshot_state(stale), None, fake_config)
        snaps.close()
        state = loop.train(trainer, work)
    finally:
        with fake_config.unlocked():
            fake_config.ema.snapshot_every = 0
    snaps = Checkpointer.existing(os.path.join(work, P.SNAPSHOT_DIR))
    assert snaps.steps() == [1, 2, 3, 4]
    target = {"params": trainer.restore_target().params, "ema_params": trainer.restore_target().ema_params}
    saved = {s: snaps.restore_subtree(target, s) for s in snaps.steps()}
    snaps.close()
    np.testing.assert_array_equal(flat(saved[4]["params"]), flat(state.params))
    np.testing.assert_array_equal(flat(saved[4]["ema_params"]), flat(state.ema_params))
    assert not np.array_equal(flat(saved[3]["params"]), flat(stale.params))  # replaced by the resumed run's

    for step in (4, 2):  # at step 2, the snapshots up to step 2 only
        plan, _ = P.plan([1, 2, 3, 4], fake_config.ema, step, 0.15)
        assert {s for s, *_ in plan} == set(range(1, step + 1))
        pipe = Text2Image.from_checkpoint(work, step=step, ema_sigma_rel=0.15)
        assert pipe.step == step and pipe.ema_sigma_rel == 0.15
        for part, got in (("unet", pipe.denoiser_params), ("text", pipe.text_params)):
            expect = sum(w * flat(saved[s][which][part]) for s, which, w in plan)
            np.testing.assert_allclose(flat(got), expect, rtol=1e-5, atol=1e-6)
    assert not np.allclose(flat(pipe.denoiser_params), flat(saved[2]["ema_params"]["unet"]))
    with pytest.raises(FileNotFoundError, match="no EMA snapshots in"):
        ckpt = Checkpointer(str(tmp_path / "plain" / "checkpoints"))
        ckpt.save(4, state, None, fake_config)
        ckpt.close()
        Text2Image.from_checkpoint(str(tmp_path / "plain"), ema_sigma_rel=0.1)


def test_command_line_errors(run_main, tmp_path, last_error_line):
    for args, message in [(["--mode=sample", f"--workdir={tmp_path}", "--prompt=a bag", "--ema_sigma_rel=0.5"],
                           "error: --ema_sigma_rel=0.5 must be in (0, 0.2887]"),
                          (["--mode=sample", f"--model={tmp_path}", "--prompt=a bag", "--ema_sigma_rel=0.1",
                            f"--out={tmp_path}/o"], "error: --ema_sigma_rel needs a training run's snapshots"),
                          (["--mode=eval", f"--workdir={tmp_path}", "--eval_tag=../x"], "error: --eval_tag='../x'")]:
        assert last_error_line(run_main(args)).startswith(message), message
