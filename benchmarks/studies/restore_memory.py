"""What loading a training checkpoint for sampling reads and allocates: the whole TrainState (the path before
``Text2Image.from_checkpoint`` restored only parameters: a ``Trainer`` and ``Checkpointer.restore`` of the
full state, optimizer moments included) vs ``Text2Image.from_checkpoint`` (orbax partial restore of the EMA
parameters).

Each path runs in a fresh process on one CPU device, first once on a tiny checkpoint (jax's backend, orbax, the
tokenizer and the imports warmed up), then measured on the real one: the bytes read through system calls
(``rchar`` of /proc/self/io, page cache or not), the peak of the resident set during the load above the resident
set before it (sampled every millisecond), the bytes of the arrays it restores, and the wall time. The saved
state's optimizer moments and EMA are filled with random values, as in a trained run (zeros would compress).

    .venv/bin/python benchmarks/studies/restore_memory.py [--preset small] [--rounds 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(preset):
    from diffjax import config as defaults

    config = defaults.get_config()
    config.model.unet = defaults.unet_config(preset)
    # The state is written, not trained: its U-Net's channels (4 for the SD preset's latents, which no image dataset
    # has; the data section then leaves them to the trainer's image_shape) are the data's.
    in_channels = config.model.unet.in_channels
    config.data.image_size, config.data.channels = 32, in_channels * (in_channels in (1, 3))
    config.training.batch_size = 1
    return config


def _rchar():
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write(workdir, preset):
    """A checkpoint of a fresh TrainState (parameters, EMA, Adam moments) of ``preset`` at 32×32."""
    from diffjax.checkpoints import Checkpointer
    from diffjax.models import count_params
    from diffjax.train import Trainer

    import jax

    config = _config(preset)
    trainer = Trainer(config, image_shape=(32, 32, config.model.unet.in_channels))
    state = trainer.init()
    leaves, treedef = jax.tree_util.tree_flatten((state.ema_params, state.opt_state))
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    noisy = [jax.random.normal(k, x.shape, x.dtype) if x.dtype.kind == "f" else x for x, k in zip(leaves, keys)]
    ema, opt_state = jax.tree_util.tree_unflatten(treedef, noisy)
    state = state.replace(ema_params=ema, opt_state=opt_state)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    ckpt.save(1, state, None, config)
    ckpt.close()
    return count_params(state.params["unet"])


class _PeakRSS:
    """The largest resident set seen while the block runs (sampled every millisecond by a thread)."""

    def __enter__(self):
        import threading

        self.start, self.peak, self._stop = _rss(), _rss(), threading.Event()

        def poll():
            while not self._stop.wait(0.001):
                self.peak = max(self.peak, _rss())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _load(workdir, path):
    import jax

    if path == "full_state":
        import ml_collections

        from diffjax.checkpoints import Checkpointer
        from diffjax.train import Trainer

        ckpt = Checkpointer.existing(os.path.join(workdir, "checkpoints"))
        config = ml_collections.ConfigDict(ckpt.restore_config())
        trainer = Trainer(config, image_shape=(32, 32, config.model.unet.in_channels))
        state, _, _ = ckpt.restore(trainer.restore_target())
        ckpt.close()
        arrays = (state.ema_params, state.frozen)
    else:
        from diffjax.pipeline import Text2Image

        pipe = Text2Image.from_checkpoint(workdir)
        arrays = (pipe.denoiser_params, pipe.text_params)
    return jax.block_until_ready(arrays), state if path == "full_state" else arrays


def load(workdir, warmup_workdir, path):
    """One measurement in this process, after the same path has run once on a tiny checkpoint (so that
    jax's backend, orbax, the tokenizer and the imports are not counted)."""
    import jax

    _load(warmup_workdir, path)
    rchar0, t0 = _rchar(), time.perf_counter()
    with _PeakRSS() as mem:
        _, everything = _load(workdir, path)
    seconds = time.perf_counter() - t0
    return dict(path=path, bytes_read=_rchar() - rchar0, peak_rss_growth=mem.peak - mem.start,
                array_bytes=sum(x.nbytes for x in jax.tree_util.tree_leaves(everything)), seconds=seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--load", nargs=3, help=argparse.SUPPRESS)  # WORKDIR WARMUP_WORKDIR PATH
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    if args.load:
        print(json.dumps(load(*args.load)))
        return
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    with tempfile.TemporaryDirectory() as workdir, tempfile.TemporaryDirectory() as warmup:
        write(warmup, "tiny")
        n = write(workdir, args.preset)
        print(f"U-Net preset {args.preset!r}: {n / 1e6:.2f}M parameters; checkpoint of the full TrainState in "
              f"{workdir}")
        results = {}
        for _ in range(args.rounds):  # alternate the two paths
            for path in ("full_state", "params_only"):
                out = subprocess.run([sys.executable, __file__, "--load", workdir, warmup, path], env=env,
                                     capture_output=True, text=True, check=True).stdout
                results.setdefault(path, []).append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'path':<12} {'MB read':>9} {'peak RSS +MB':>13} {'MB returned':>12} {'seconds':>8}")
    med = {}
    for path, runs in results.items():
        m = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0] if k != "path"}
        med[path] = m
        print(f"{path:<12} {m['bytes_read'] / 1e6:9.1f} {m['peak_rss_growth'] / 1e6:13.1f} "
              f"{m['array_bytes'] / 1e6:12.1f} {m['seconds']:8.2f}")
    full, part = med["full_state"], med["params_only"]
    print(f"full / params-only: bytes read {full['bytes_read'] / part['bytes_read']:.2f}x, peak RSS growth "
          f"{full['peak_rss_growth'] / part['peak_rss_growth']:.2f}x, arrays {full['array_bytes'] / part['array_bytes']:.2f}x")


if __name__ == "__main__":
    main()
