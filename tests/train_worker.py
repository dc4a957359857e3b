"""What the tests run on several simulated devices or processes, each needing a process of its own (the device
count is fixed when JAX starts). conftest.py's ``multi_device`` fixture runs ``all`` once per session; the tests
compare its results with what one device computes in their own process.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/train_worker.py all DIR
    XLA_FLAGS=--xla_force_host_platform_device_count=3 python tests/train_worker.py load_exported DIR OUT.npz
    python tests/train_worker.py process I N PORT OUT.npz      (one of N gloo processes, 2 devices each)

``all`` writes DIR/layouts_{unet,dit,alignment}.npz: the tiny config's U-Net, DiT, and U-Net with the alignment
term, trained on data 4 and on data 2 x fsdp 2 on the same synthetic global batches (``batches``), the DiT also
on one device; the U-Net also under pmap and through a checkpoint (DIR/ckpt) restored onto data x fsdp and
trained one step further. Then DIR/export/: the data 2 x fsdp 2 U-Net run checkpointed and exported, with the
images it samples from the checkpoint on all four devices (DIR/export/trained.npz). And DIR/cli.json: the
command line's error for a batch that the devices do not divide (on fake Fashion-MNIST files of its own). Four
devices are the fewest with both a data and an fsdp axis of two.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fakes import GLOBAL_BATCH, flat, tiny_config

STEPS = 3


def batches(trainer, num, batch_size=GLOBAL_BATCH):
    """Deterministic global batches (numpy): images, and prompts tokenized by the run's text encoder."""
    rng = np.random.default_rng(0)
    words = ["a photo of a sneaker", "a dress", "an ankle boot", "a bag"]
    out = []
    for _ in range(num):
        ids, mask = trainer.models.text_encoder.tokenize([words[i] for i in rng.integers(0, 4, batch_size)])
        image = rng.uniform(-1, 1, (batch_size,) + trainer.image_shape).astype(np.float32)
        out.append({"image": image, "token_ids": ids, "mask": mask})
    return out


def run_mesh(config, mesh, local_slice=slice(None), trainer=None):
    """``STEPS`` steps from the initial state on ``batches``; the Trainer (on ``mesh``), the state, the last loss."""
    from diffjax.train import Trainer

    trainer = trainer or Trainer(config, mesh=mesh)
    state = trainer.init()
    for b in batches(trainer, STEPS):
        state, metrics = trainer.step(state, trainer.shard_batch({k: v[local_slice] for k, v in b.items()}))
    return trainer, state, float(metrics["loss"])


def layout_config(model="unet", fsdp=1):
    """The tiny config of the layout runs: its U-Net, its DiT (``model="dit"``) or its U-Net with the alignment term
    (``model="alignment"``)."""
    config = tiny_config()
    config.model.name, config.sharding.fsdp = ("unet" if model == "alignment" else model), fsdp
    if model == "alignment":
        config.alignment.weight = 0.5
        # Adam's ε well above rounding level: a gradient that is 0 on one layout and 1e-9 on another (the
        # batch-wide softmax sums in another order) would otherwise move a parameter by a whole lr.
        config.optim.eps = 1e-4
    return config


def layouts(out_path, model="unet"):
    """``layout_config(model)`` trained on 4 devices (data) and on data 2 x fsdp 2 (the DiT also on one device; the
    tests run the others' one-device reference in their own process, where its programs are compiled anyway); the
    U-Net also under pmap, and checkpointed on one mesh and restored onto another. Returns the data x fsdp
    Trainer and state."""
    from diffjax import sharding
    from diffjax.checkpoints import Checkpointer
    from diffjax.train import make_train_step

    devs = jax.devices()
    n = len(devs)
    results = {}
    if model == "dit":
        _, s1, _ = run_mesh(layout_config(model), sharding.create_mesh(1, devs[:1]))
        results["one_device"] = flat(s1.params)
    tn, sn, _ = run_mesh(layout_config(model), sharding.create_mesh(1, devs))
    results["data"] = flat(sn.params)
    t42, s42, _ = run_mesh(layout_config(model, fsdp=2), sharding.create_mesh(2, devs))
    results["data_fsdp"] = flat(s42.params)
    # Some parameters must really be split over the fsdp axis.
    specs = [leaf.sharding.spec for leaf in jax.tree_util.tree_leaves(s42.params)]
    results["fsdp_sharded_leaves"] = np.array(sum(sharding.FSDP in tuple(s) for s in specs))
    if model != "unet":
        np.savez(out_path, **results)
        return t42, s42

    # pmap over the devices: the same pure step with axis_name, per-device batch slices.
    config = layout_config(model)
    step = jax.pmap(make_train_step(config, tn.models, tn.tx, tn.lr_schedule, *tn.uncond, axis_name="batch"),
                    axis_name="batch")
    state = jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (n,) + x.shape), jax.device_get(tn.init()))
    for b in batches(tn, STEPS):
        state, _ = step(state, {k: v.reshape((n, -1) + v.shape[1:]) for k, v in b.items()})
    results["pmap"] = flat(jax.tree_util.tree_map(lambda x: x[0], state.params))
    results["pmap_replicas_equal"] = np.array(all(
        bool(jnp.all(x == x[0])) for x in jax.tree_util.tree_leaves(state.params)))

    # Save on 4 devices (data axis), restore onto data x fsdp (the tests restore it onto one device).
    ckpt = Checkpointer(os.path.join(os.path.dirname(os.path.abspath(out_path)), "ckpt"), async_save=False)
    ckpt.save(STEPS, sn, {"next_index": STEPS}, config)
    ckpt.wait()
    r42, _, _ = ckpt.restore(t42.restore_target())
    results["restored_fsdp"] = flat(r42.params)
    ckpt.close()
    # Training continues from the saved state on 4 devices; the tests continue from it on one.
    cont, _ = tn.step(sn, tn.shard_batch(batches(tn, STEPS + 1)[-1]))
    results["continued_n"] = flat(cont.params)
    np.savez(out_path, **results)
    return t42, s42


def process(index, count, port, out_path):
    from diffjax import sharding

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=count, process_id=index,
                               local_device_ids=None)
    assert jax.process_count() == count
    config = tiny_config()
    local = GLOBAL_BATCH // count
    _, state, loss = run_mesh(config, sharding.create_mesh(1), slice(index * local, (index + 1) * local))
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(state.params, tiled=True)
    if index == 0:
        np.savez(out_path, params=flat(params), devices=np.array(jax.device_count()), loss=np.array(loss))
    jax.distributed.shutdown()


EXPORT_PROMPTS = ["a photo of a sneaker", "a dress", "an ankle boot", "a bag", "a shirt"]


def export_images(pipe):
    """The images every loading path of tests/test_pipeline.py's export test is compared on: 5 prompts in chunks of
    4, so that on several devices each chunk is split over them and the last one is padded."""
    return pipe.generate(EXPORT_PROMPTS, seed=5, num_steps=3, guidance_scale=3.0, batch_size=4)


def export(directory, trainer, state):
    """The data 2 x fsdp 2 run of ``layouts`` checkpointed, sampled from the checkpoint and exported as a model
    folder (directory/run, directory/model, directory/trained.npz)."""
    from diffjax import sharding
    from diffjax.checkpoints import Checkpointer
    from diffjax.pipeline import Text2Image

    assert trainer.mesh.shape == {sharding.DATA: 2, sharding.FSDP: 2}
    fsdp_split = sum(sharding.FSDP in tuple(x.sharding.spec) for x in jax.tree_util.tree_leaves(state.ema_params))
    ckpt = Checkpointer(os.path.join(directory, "run", "checkpoints"))
    ckpt.save(STEPS, state, None, trainer.config)
    ckpt.close()
    pipe = Text2Image.from_checkpoint(os.path.join(directory, "run"))
    assert pipe.mesh.devices.size == jax.device_count()
    pipe.save_pretrained(os.path.join(directory, "model"))
    np.savez(os.path.join(directory, "trained.npz"), images=export_images(pipe), fsdp_split=np.array(fsdp_split))


def command_line(out_path, manual_dir, data_dir):
    """The command line's one-line error for a global batch that the devices do not divide (in this process:
    experiments.main.run), on the fake Fashion-MNIST (IDX files in ``manual_dir``, prepared in ``data_dir``)."""
    import json

    from fakes import run_main_in_process

    here = os.path.dirname(out_path)
    proc = run_main_in_process(["--config=experiments/configs/tiny.py", f"--workdir={here}/cli",
                                f"--config.data.manual_dir={manual_dir}", f"--config.data.data_dir={data_dir}",
                                "--config.training.batch_size=6"])
    with open(out_path, "w") as f:
        json.dump({"returncode": proc.returncode, "stderr": proc.stderr}, f)

def load_exported(directory):
    """On this process's devices: images from the model folder and from the training checkpoint."""
    from diffjax.pipeline import Text2Image

    folder = Text2Image.from_pretrained(os.path.join(directory, "model"))
    ckpt = Text2Image.from_checkpoint(os.path.join(directory, "run"))
    return export_images(folder), export_images(ckpt), folder.mesh.devices.size


def run_all(directory):
    """Everything above on 4 devices, into ``directory``; ``directory + ".done"`` marks success, ``".failed"`` an
    error (the waiting tests poll for them: this runs in the background, see conftest.start_in_background)."""
    import time

    from fakes import write_fake_fashion_mnist

    try:
        assert jax.device_count() == 4, jax.devices()
        os.makedirs(directory, exist_ok=True)
        manual_dir = os.path.join(directory, "idx")
        os.makedirs(manual_dir)
        write_fake_fashion_mnist(manual_dir, n_train=60, n_test=20)  # conftest's fake_fashion_mnist_dir

        def timed(name, fn, *args):
            t0 = time.perf_counter()
            out = fn(*args)
            print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            return out

        trainer, state = timed("layouts unet", layouts, os.path.join(directory, "layouts_unet.npz"))
        timed("export", export, os.path.join(directory, "export"), trainer, state)
        timed("layouts dit", layouts, os.path.join(directory, "layouts_dit.npz"), "dit")
        timed("layouts alignment", layouts, os.path.join(directory, "layouts_alignment.npz"), "alignment")
        timed("command line", command_line, os.path.join(directory, "cli.json"), manual_dir,
              os.path.join(directory, "tfds"))
    except BaseException:
        open(directory + ".failed", "w").close()
        raise
    open(directory + ".done", "w").close()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if sys.argv[1] == "all":
        run_all(sys.argv[2])
    elif sys.argv[1] == "load_exported":
        folder, ckpt, n = load_exported(sys.argv[2])
        np.savez(sys.argv[3], folder=folder, checkpoint=ckpt, devices=np.array(n))
    else:
        process(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
