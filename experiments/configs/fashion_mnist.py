"""The embedded default: captioned Fashion-MNIST at 28×28, a ~0.79M-parameter U-Net (cross-attention at 7×7
and in the middle block) conditioned on a tiny CLIP text transformer trained from scratch (as LDM trained its
text encoder), sized for a CPU budget: 600 steps at batch 64 take minutes on 2 cores (docs/standings.md).

    python -m experiments.main --config=experiments/configs/fashion_mnist.py --workdir=runs/fashion_mnist

Choices measured at this budget (600 steps, batch 64; conditioning accuracy relative to real images, 300
images, DPM-Solver++ 20 steps, guidance 5; docs/lab_notebook.md): learning rate 1e-3 → 0.77, 2e-3 → 0.92,
3e-3 → 0.97; ε-prediction at 2e-3 → 0.89; cross-attention also at 14×14 dropped for its step time; guidance
only below σ = 5.42 → the same accuracy at a lower Fréchet distance; EDM's log-normal noise levels → 0.62.
The image–text alignment term at λ = 0.005 (two training seeds): higher accuracy at every guidance scale, so
guidance 3 reaches 0.98 relative at a Fréchet distance of 7.2 where λ = 0 needs guidance 5 for 0.96 at 8.2.
Thirty caption wordings with same-class positives in the term: prompts in wordings never trained on are
followed nearly as well as trained ones (0.96 / 0.91 relative over two seeds at guidance 2.5, against 0.70 / 0.81
with five wordings at guidance 3). Also measured and left off: no min-SNR weighting (0.94 / 7.77 at guidance 2.5
against 0.99 / 7.64), zero terminal SNR (0.98 / 7.92), and a post-hoc EMA of another width (σ_rel 0.05: 0.99 /
7.49, within the seed-to-seed spread of the config's own EMA, whose warmup makes it σ_rel 0.091).
"""

from diffjax.data.captions import DEFAULT_TEMPLATES, VARIED_TEMPLATES
from diffjax import config as defaults


def get_config():
    config = defaults.get_config()
    config.data.name = "fashion_mnist"
    config.data.image_size = 28
    config.data.channels = 1
    # 30 wordings rather than 5: with 5 the text encoder learns the wordings, and prompts worded otherwise lose
    # most of their conditioning (docs/lab_notebook.md, "Unseen wordings"). The evaluation keeps the first five.
    config.data.caption_templates = VARIED_TEMPLATES
    config.model.unet = defaults.unet_config("small", in_channels=1, dropout=0.0, channels=24, channel_mult=(1, 2, 2),
                                            num_res_blocks=1, norm_groups=8, attention_levels=(2,))
    config.text.encoder = "tiny"  # 2 layers, width 32: plenty for ten classes in a few wordings
    config.text.max_length = 16  # the longest caption is 13 tokens (with its start and end tokens)
    config.text.trainable = True
    config.diffusion.schedule = "cosine"
    # v (Salimans & Ho 2022): with ε-prediction the first steps from ᾱ ≈ 0 turn small ε errors into large x̂0
    # errors (x̂0 = (x - σ ε̂) / α), which left salt-and-pepper samples at this budget; v keeps x̂0 = α x - σ v̂.
    config.diffusion.prediction_type = "v"
    config.diffusion.loss_weighting = "min_snr"
    config.diffusion.cond_drop_prob = 0.1
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 100
    config.ema.decay = 0.999
    config.training.batch_size = 64
    config.training.num_steps = 600
    config.training.log_every = 25
    config.training.eval_every = 200
    config.training.sample_every = 200
    config.training.checkpoint_every = 200
    config.sampling.sampler = "dpmpp_2m"
    config.sampling.num_steps = 20
    # The alignment term (diffjax.models.alignment) at λ = 0.005: measured over two seeds against λ = 0 (lab notebook,
    # "The alignment term"); λ = 0.02 already raised the Fréchet distance and λ = 0.1 broke the images. Positives
    # are the captions of the same class: with 30 wordings nearly every pair in a batch is worded differently, and
    # identical-prompt positives made the term teach the wording (0.900 relative accuracy at guidance 3 vs 0.998).
    config.alignment.weight = 0.005
    config.alignment.positives = "label"
    # With the term, guidance 2.5 meets the issue-16 target on trained and unseen wordings alike on seed 0 (0.987 /
    # 0.961 relative accuracy at a Fréchet distance of 7.64 / 7.48, floor 3.20; seed 1: 0.958 / 0.911 at 8.31 / 8.55);
    # λ = 0 with five wordings needed guidance 5 for 0.98 at 8.40.
    config.sampling.guidance_scale = 2.5
    # No guidance above σ = 5.42 (the first 3 of the 20 steps), as Kynkäänniemi et al. 2024: at guidance 5 the
    # Fréchet distance falls from 9.93 to 8.40 for a relative accuracy of 0.983 instead of 0.998 (lab notebook).
    config.sampling.guidance_interval = "0,5.42"
    config.sampling.images_per_prompt = 6
    config.evaluation.images_per_class = 30  # 300 images: minutes to generate on 2 cores
    config.evaluation.prompt_templates = DEFAULT_TEMPLATES  # the wordings every figure in docs/lab_notebook.md used
    return config


def five_wordings_recipe(config):
    """``config`` with the recipe the demo had before the alignment term: five caption wordings, λ = 0, guidance 5
    (what the DiT config's figures and the earlier long run in docs/lab_notebook.md were measured with)."""
    config.alignment.weight = 0.0
    config.data.caption_templates = DEFAULT_TEMPLATES
    config.sampling.guidance_scale = 5.0
    return config
