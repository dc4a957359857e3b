"""The longer Fashion-MNIST budget: the demo's model, data and recipe (experiments/configs/fashion_mnist.py: 30
caption wordings, the alignment term at λ = 0.005 with same-class positives, guidance only below σ = 5.42) trained
for 4000 steps at batch 64 (4.3 epochs) with a peak learning rate of 2e-3, checkpointed every 1000 steps.

Budget: about an hour on 2 CPU cores (docs/standings.md; compilation, samples and checkpoints
included). At guidance 1.5 (300 images, DPM-Solver++ 20 steps; docs/lab_notebook.md, "The longer budget") the
Fréchet distance falls at every checkpoint, 5.46 → 4.41 → 3.82 → 3.65 (train↔test floor 3.20), at a relative
conditioning accuracy of 1.01-1.04. Peak learning rates 1e-3 and 3e-3 measured to step 2000 (same section): 3e-3 is
ahead at step 1000 and behind at 2000 (FD 4.89 at the accuracy where 2e-3 has 4.41), 1e-3 behind at 1000 and even
(4.38) at 2000.

    python -m experiments.main --config=experiments/configs/fashion_mnist_long.py --workdir=runs/fashion_mnist_long
    python -m experiments.main --mode=eval --config=experiments/configs/fashion_mnist_long.py \
        --workdir=runs/fashion_mnist_long --step=4000 --guidance_scales=2,2.5,3
"""

from experiments.configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config()
    config.optim.learning_rate = 2e-3
    config.training.num_steps = 4000
    config.training.checkpoint_every = 1000
    config.training.keep_checkpoints = 4  # every checkpoint of the run, for the metrics-vs-budget curve
    config.training.sample_every = 1000
    config.training.eval_every = 1000
    # The lowest scale measured (1.5, 2, 2.5, 3): with 6.7x the demo's training the model follows prompts unguided
    # well enough that the stronger guidance the demo needs only costs diversity (FD 3.65 at 1.5, 6.79 at 3).
    config.sampling.guidance_scale = 1.5
    return config
