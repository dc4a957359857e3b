"""Runs a few training steps (or a generation) on simulated devices or processes; launched by
tests/test_train.py and tests/test_pipeline.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train_worker.py layouts OUT.npz [dit|alignment]
    python tests/train_worker.py process I N PORT OUT.npz      (one of N gloo processes, 2 devices each)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train_worker.py generate OUT.npz
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train_worker.py export DIR
    XLA_FLAGS=--xla_force_host_platform_device_count=3 python tests/train_worker.py load_exported DIR OUT.npz

Every layout trains the tiny config on the same synthetic global batches; the test compares the results.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fakes import GLOBAL_BATCH, flat, random_text2image, tiny_config

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
    from diffjax.train import Trainer

    trainer = trainer or Trainer(config, mesh=mesh)
    state = trainer.init()
    for b in batches(trainer, STEPS):
        state, metrics = trainer.step(state, trainer.shard_batch({k: v[local_slice] for k, v in b.items()}))
    return trainer, state, float(metrics["loss"])


def layouts(out_path, model="unet"):
    """The tiny config (its U-Net, or with ``model="dit"`` its DiT, or with ``model="alignment"`` its U-Net with the
    alignment term) trained on one device, 8 devices and data 4 x fsdp 2; for the U-Net also under pmap, and
    checkpointed on one mesh and restored onto others."""
    from jax.experimental import multihost_utils  # noqa: F401

    from diffjax import sharding
    from diffjax.checkpoints import Checkpointer
    from diffjax.train import make_train_step

    def config_of(fsdp=1):
        config = tiny_config()
        config.model.name, config.sharding.fsdp = ("unet" if model == "alignment" else model), fsdp
        if model == "alignment":
            config.alignment.weight = 0.5
            # Adam's ε well above rounding level: a gradient that is 0 on one layout and 1e-9 on another (the
            # batch-wide softmax sums in another order) would otherwise move a parameter by a whole lr.
            config.optim.eps = 1e-4
        return config

    config = config_of()
    devs = jax.devices()
    assert len(devs) == 8, devs
    results = {}
    t1, s1, l1 = run_mesh(config, sharding.create_mesh(1, devs[:1]))
    results["one_device"] = flat(s1.params)
    t8, s8, l8 = run_mesh(config, sharding.create_mesh(1, devs))
    results["data8"] = flat(s8.params)
    t42, s42, _ = run_mesh(config_of(fsdp=2), sharding.create_mesh(2, devs))
    results["data4_fsdp2"] = flat(s42.params)
    # Some parameters must really be split over the fsdp axis.
    specs = [leaf.sharding.spec for leaf in jax.tree_util.tree_leaves(s42.params)]
    results["fsdp_sharded_leaves"] = np.array(sum(sharding.FSDP in tuple(s) for s in specs))
    results["losses"] = np.array([l1, l8])
    if model != "unet":
        np.savez(out_path, **results)
        return

    # pmap over the 8 devices: the same pure step with axis_name, per-device batch slices.
    step = jax.pmap(make_train_step(config, t1.models, t1.tx, t1.lr_schedule, *t1.uncond, axis_name="batch"),
                    axis_name="batch")
    state = jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (8,) + x.shape), jax.device_get(t1.init()))
    for b in batches(t1, STEPS):
        state, _ = step(state, {k: v.reshape((8, -1) + v.shape[1:]) for k, v in b.items()})
    results["pmap"] = flat(jax.tree_util.tree_map(lambda x: x[0], state.params))
    results["pmap_replicas_equal"] = np.array(all(
        bool(jnp.all(x == x[0])) for x in jax.tree_util.tree_leaves(state.params)))

    # Save on 8 devices (data axis), restore onto 1 device and onto data x fsdp.
    ckpt_dir = os.path.join(os.path.dirname(os.path.abspath(out_path)), "ckpt")
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    ckpt.save(STEPS, s8, {"next_index": STEPS}, config)
    ckpt.wait()
    r1, data_state, cfg = ckpt.restore(t1.restore_target())
    results["restored_1"] = flat(r1.params)
    results["restored_1_devices"] = np.array(len(jax.tree_util.tree_leaves(r1.params)[0].sharding.device_set))
    r42, _, _ = ckpt.restore(t42.restore_target())
    results["restored_fsdp"] = flat(r42.params)
    results["restored_data_state"] = np.array(data_state["next_index"])
    results["restored_config_batch"] = np.array(cfg["training"]["batch_size"])
    # Training continues from the restored state on the other mesh exactly as it would have on 8 devices.
    b = batches(t1, STEPS + 1)[-1]
    cont1, _ = t1.step(r1, t1.shard_batch(b))
    cont8, _ = t8.step(s8, t8.shard_batch(b))
    results["continued_1"], results["continued_8"] = flat(cont1.params), flat(cont8.params)
    ckpt.close()
    np.savez(out_path, **results)


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


def generate(out_path):
    """12 images on all 8 devices (chunks of 8, each sharded one image per device)."""
    assert jax.device_count() == 8
    pipe = random_text2image()
    prompts = ["a photo of a sneaker", "a dress", "an ankle boot", "a bag"]
    images = pipe.generate([prompts[i % 4] for i in range(12)], seed=9, num_steps=3, batch_size=8)
    np.savez(out_path, images=images, devices=np.array(pipe.mesh.devices.size))


EXPORT_PROMPTS = ["a photo of a sneaker", "a dress", "an ankle boot", "a bag", "a shirt"]


def export_images(pipe):
    """The images every loading path of tests/test_pipeline.py's export test is compared on."""
    return pipe.generate(EXPORT_PROMPTS, seed=5, num_steps=3, guidance_scale=3.0)


def export(directory):
    """Train the tiny config on 8 devices with fsdp=4 and batch 24, checkpoint, sample from the checkpoint and
    export a model folder (directory/run, directory/model, directory/trained.npz)."""
    from diffjax import sharding
    from diffjax.checkpoints import Checkpointer
    from diffjax.pipeline import Text2Image
    from diffjax.train import Trainer

    assert jax.device_count() == 8
    config = tiny_config()
    config.training.batch_size, config.sharding.fsdp = 24, 4
    trainer = Trainer(config, image_shape=(8, 8, 1))
    assert trainer.mesh.shape == {sharding.DATA: 2, sharding.FSDP: 4}
    state = trainer.init()
    for b in batches(trainer, STEPS, batch_size=24):
        state, _ = trainer.step(state, trainer.shard_batch(b))
    fsdp_split = sum(sharding.FSDP in tuple(x.sharding.spec) for x in jax.tree_util.tree_leaves(state.ema_params))
    ckpt = Checkpointer(os.path.join(directory, "run", "checkpoints"))
    ckpt.save(STEPS, state, None, config)
    ckpt.close()
    pipe = Text2Image.from_checkpoint(os.path.join(directory, "run"))
    assert pipe.mesh.devices.size == 8
    pipe.save_pretrained(os.path.join(directory, "model"))
    np.savez(os.path.join(directory, "trained.npz"), images=export_images(pipe), fsdp_split=np.array(fsdp_split))


def load_exported(directory):
    """On this process's devices: images from the model folder and from the training checkpoint."""
    from diffjax.pipeline import Text2Image

    folder = Text2Image.from_pretrained(os.path.join(directory, "model"))
    ckpt = Text2Image.from_checkpoint(os.path.join(directory, "run"))
    return export_images(folder), export_images(ckpt), folder.mesh.devices.size


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if sys.argv[1] == "layouts":
        layouts(*sys.argv[2:])
    elif sys.argv[1] == "generate":
        generate(sys.argv[2])
    elif sys.argv[1] == "export":
        export(sys.argv[2])
    elif sys.argv[1] == "load_exported":
        folder, ckpt, n = load_exported(sys.argv[2])
        np.savez(sys.argv[3], folder=folder, checkpoint=ckpt, devices=np.array(n))
    else:
        process(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
