import os

from experiments import smoke


def test_smoke_demo_samples_the_prompted_classes(tmp_path):
    """The README's demo: every sampler, guided towards a class with the exact denoiser, lands on that class."""
    results = smoke.main([f"--workdir={tmp_path}", "--num_steps=10", "--seeds=2"])
    assert set(results) == {"ddpm", "ddim", "dpmpp_2m", "euler", "heun"}
    assert all(acc == 1.0 for acc in results.values()), results
    for name in results:
        assert os.path.getsize(tmp_path / f"samples_{name}.png") > 0
