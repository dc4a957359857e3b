"""Tests for diffjax.data: tfds builders (array_record, no TensorFlow) and the grain pipeline.

Fast: a few dozen fake Fashion-MNIST images written as gzip'ed IDX files and a tiny image folder;
the real 70k Fashion-MNIST build is one test marked slow.
"""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from diffjax import data, pixels
from diffjax.data import captions, fashion_mnist, images
from diffjax.text import TextEncoder
from fakes import write_fake_fashion_mnist

N_TRAIN, N_TEST = 40, 20


def _fake_idx_dir(directory, seed=0):
    return write_fake_fashion_mnist(directory, N_TRAIN, N_TEST, seed)


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory):
    """(config, idx arrays): a prepared captioned Fashion-MNIST built from fake IDX files."""
    idx_dir = tmp_path_factory.mktemp("idx")
    arrays = _fake_idx_dir(str(idx_dir))
    config = data.default_data_config()
    config.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.manual_dir = str(idx_dir)
    config.cache_max_mb = 0  # read through tfds.data_source; the in-memory path is tested separately
    data.prepare_fashion_mnist(config.data_dir, idx_dir=config.manual_dir)
    return config, arrays


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder.from_config("tiny")[0]


def _batches(config, encoder, n, **kwargs):
    kwargs.setdefault("split", "train")
    kwargs.setdefault("global_batch_size", 8)
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    it = data.make_dataset(config, encoder, **kwargs)
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# -- captions --------------------------------------------------------------------------------------


def test_captions_articles_and_templates():
    assert captions.format_caption("a photo of a {}", "ankle boot") == "a photo of an ankle boot"
    assert captions.format_caption("An image of an {}", "sneaker") == "An image of a sneaker"
    assert captions.format_caption("{}", "bag") == "bag"
    assert captions.format_caption("a {}", "t-shirt") == "a t-shirt"
    assert data.caption_for(9, 1) == "an ankle boot"
    assert data.caption_for(1, 0) == "a photo of a trouser"
    assert data.caption_for(1, 0, phrase_index=1) == "a photo of a pair of trousers"
    prompts = data.class_prompts(4)
    assert len(prompts) == 10 and prompts[9] == "a black and white photo of an ankle boot"
    assert len(data.CLASS_NAMES) == 10
    with pytest.raises(ValueError, match="placeholder"):
        captions.format_caption("a photo", "bag")
    captioner = data.LabelCaptioner(data.CLASS_PHRASES)
    assert "a picture of an ankle boot" in captioner.all_captions(9)
    picked = {captioner.pick(1, a, b) for a in np.linspace(0, 0.99, 10) for b in (0.1, 0.9)}
    assert picked == set(captioner.all_captions(1))  # every template and phrase reachable


def test_held_out_wordings_have_words_no_training_wording_has():
    # The held-out prompts measure generalisation to words never trained on: each has words in no training
    # wording (only "a", "of" and "image" are shared), and the varied set extends the default one.
    words = lambda templates: {w.strip(",.").lower() for t in templates for w in t.replace("{}", " ").split()}  # noqa: E731
    trained = words(captions.VARIED_TEMPLATES)
    assert words(captions.HELD_OUT_TEMPLATES) & trained == {"a", "of", "image"}
    assert all(words([t]) - trained for t in captions.HELD_OUT_TEMPLATES)
    assert captions.VARIED_TEMPLATES[:5] == captions.DEFAULT_TEMPLATES
    assert len(set(captions.VARIED_TEMPLATES)) == len(captions.VARIED_TEMPLATES) == 30
    assert data.caption_for(9, 21, templates=captions.VARIED_TEMPLATES) == "an old ankle boot"
    assert data.caption_for(9, 1, templates=captions.HELD_OUT_TEMPLATES) == "one ankle boot for sale"


# -- images ----------------------------------------------------------------------------------------


def test_fit_image_crop_and_pad():
    x = np.arange(28 * 28, dtype=np.uint32).reshape(28, 28).astype(np.uint8)
    padded = images.fit_image(x, 32, "pad")
    assert padded.shape == (32, 32, 1)
    np.testing.assert_array_equal(padded[2:30, 2:30, 0], x)
    assert padded[:2].sum() == 0 and padded[:, :2].sum() == 0
    np.testing.assert_array_equal(images.fit_image(x, 24, "pad")[..., 0], x[2:26, 2:26])
    wide = np.zeros((10, 20, 3), np.uint8)
    wide[:, 5:15] = 200  # the center square survives a center crop
    cropped = images.fit_image(wide, 10, "crop")
    assert cropped.shape == (10, 10, 3) and (cropped == 200).all()
    assert images.fit_image(wide, 5, "crop").shape == (5, 5, 3)
    np.testing.assert_array_equal(pixels.from_uint8(np.array([0, 255], np.uint8)), [-1.0, 1.0])


# -- Fashion-MNIST builder and the pipeline ----------------------------------------------------------


def test_idx_round_trip_builder(fake_fmnist):
    config, arrays = fake_fmnist
    builder = data.prepare_fashion_mnist(config.data_dir)  # already prepared: no IDX needed
    for split, (imgs, labels) in arrays.items():
        source = builder.as_data_source(split=split)
        assert len(source) == len(imgs)
        for i in range(len(source)):
            record = source[i]
            j = int(record["index"])
            np.testing.assert_array_equal(record["image"][..., 0], imgs[j])
            assert int(record["label"]) == labels[j]
    assert "tensorflow" not in sys.modules  # written and read without TensorFlow


@pytest.mark.parametrize("cache_max_mb", [0, 64])
def test_pipeline_round_trip_pixels_labels_captions_tokens(fake_fmnist, encoder, cache_max_mb):
    config, arrays = fake_fmnist
    config = config.copy_and_resolve_references()
    config.cache_max_mb = cache_max_mb
    imgs, labels = arrays["train"]
    by_bytes = {img.tobytes(): (img, int(lbl)) for img, lbl in zip(imgs, labels)}
    it = data.make_dataset(
        config, encoder, split="train", global_batch_size=8, seed=0, process_index=0, process_count=1,
        shuffle=False, num_epochs=1, keep_captions=True,
    )
    seen = []
    captioner = data.LabelCaptioner(data.CLASS_PHRASES)
    for batch in it:
        assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 28, 28, 1)
        assert batch["token_ids"].dtype == np.int32 and batch["token_ids"].shape == (8, 77)
        assert batch["mask"].dtype == bool and batch["label"].dtype == np.int32
        pixels = np.rint((batch["image"] + 1) * 127.5).astype(np.uint8)
        for x, px, label, caption in zip(batch["image"], pixels, batch["label"], batch["caption"]):
            img, true_label = by_bytes[px[..., 0].tobytes()]
            np.testing.assert_array_equal(x[..., 0], img.astype(np.float32) / np.float32(127.5) - 1)
            assert label == true_label
            assert caption in captioner.all_captions(label)
            seen.append(px.tobytes())
        ids, mask = encoder.tokenize(list(batch["caption"]))
        np.testing.assert_array_equal(batch["token_ids"], ids)
        np.testing.assert_array_equal(batch["mask"], mask)
    assert len(seen) == N_TRAIN and len(set(seen)) == N_TRAIN  # one epoch: each image once


def test_process_shards_are_disjoint_and_union_is_global_batch(fake_fmnist, encoder):
    config, _ = fake_fmnist
    config = config.copy_and_resolve_references()
    config.random_flip = True
    steps = 12  # 40 // 8 = 5 steps per epoch: crosses two epoch boundaries
    full = _batches(config, encoder, steps, keep_captions=True)
    shards = [
        _batches(config, encoder, steps, keep_captions=True, process_index=p, process_count=2) for p in (0, 1)
    ]
    for g, s0, s1 in zip(full, *shards):
        assert s0["image"].shape[0] == s1["image"].shape[0] == 4
        assert not set(map(bytes, s0["image"])) & set(map(bytes, s1["image"]))
        union = {k: np.concatenate([s0[k], s1[k]]) for k in g}
        _assert_batches_equal(union, g)


def test_same_seed_same_batches_and_epochs_reshuffle(fake_fmnist, encoder):
    config, _ = fake_fmnist
    a = _batches(config, encoder, 10, seed=3)
    b = _batches(config, encoder, 10, seed=3)
    c = _batches(config, encoder, 10, seed=4)
    for x, y in zip(a, b):
        _assert_batches_equal(x, y)
    assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))
    epoch0 = np.concatenate([x["image"] for x in a[:5]])
    epoch1 = np.concatenate([x["image"] for x in a[5:]])
    assert not np.array_equal(epoch0, epoch1)  # a new permutation each epoch
    as_set = lambda e: sorted(map(bytes, e))  # noqa: E731
    assert as_set(epoch0) == as_set(epoch1)  # ... of the same examples


def test_random_flip_is_deterministic_and_flips_some(fake_fmnist, encoder):
    config, _ = fake_fmnist
    flip = config.copy_and_resolve_references()
    flip.random_flip = True
    plain = _batches(config, encoder, 5)
    flipped = _batches(flip, encoder, 5)
    again = _batches(flip, encoder, 5)
    n_flipped = 0
    for p, f, g in zip(plain, flipped, again):
        _assert_batches_equal(f, g)
        np.testing.assert_array_equal(p["label"], f["label"])  # same order: only the flips differ
        for x, y in zip(p["image"], f["image"]):
            if np.array_equal(x, y):
                continue
            np.testing.assert_array_equal(x[:, ::-1], y)
            n_flipped += 1
    assert 0 < n_flipped < N_TRAIN


def test_iterator_state_resumes_with_next_batch(fake_fmnist, encoder, tmp_path):
    config, _ = fake_fmnist
    k = 7
    straight = _batches(config, encoder, k + 3)
    make = lambda: data.make_dataset(  # noqa: E731
        config, encoder, split="train", global_batch_size=8, seed=0, process_index=0, process_count=1
    )
    it = make()
    for _ in range(k):
        next(it)
    state = it.get_state()
    json.dumps(state)  # JSON-able
    fresh = make()
    fresh.set_state(state)
    for i in range(3):
        _assert_batches_equal(next(fresh), straight[k + i])

    # through orbax, with grain's checkpoint handler
    import grain
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.save(k, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        restored = make()
        manager.restore(k, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(restored)))
    _assert_batches_equal(next(restored), straight[k])


def test_pad_resize_and_rgb_from_grayscale(fake_fmnist, encoder):
    config, arrays = fake_fmnist
    config = config.copy_and_resolve_references()
    config.image_size, config.resize_mode, config.channels = 32, "pad", 3
    (batch,) = _batches(config, encoder, 1, shuffle=False)
    assert batch["image"].shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(batch["image"][:, :2], -1.0)  # black border
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
    pixels = np.rint((batch["image"][:, 2:30, 2:30, 0] + 1) * 127.5).astype(np.uint8)
    known = {img.tobytes() for img in arrays["train"][0]}
    assert all(p.tobytes() in known for p in pixels)


def test_generic_tfds_dataset_with_class_names_from_info(fake_fmnist, encoder):
    config, arrays = fake_fmnist
    config = config.copy_and_resolve_references()
    config.name = "captioned_fashion_mnist"  # read as any prepared tfds dataset
    config.caption_templates = ("a photo of a {}",)
    (batch,) = _batches(config, encoder, 1, split="test", keep_captions=True, shuffle=False)
    expected = [f"a photo of a {data.CLASS_NAMES[label]}" for label in batch["label"]]
    assert list(batch["caption"]) == expected
    summary = data.describe_dataset(config, "test")
    assert summary.num_examples == N_TEST and summary.image_shape == (28, 28, 1)
    assert summary.class_names == data.CLASS_NAMES
    assert summary.prompts()[9] == "a photo of an Ankle boot"


def test_download_only_when_allowed(tmp_path, monkeypatch):
    served = tmp_path / "server"
    served.mkdir()
    _fake_idx_dir(str(served), seed=1)
    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return open(served / url.rsplit("/", 1)[1], "rb")

    monkeypatch.setattr(fashion_mnist.urllib.request, "urlopen", fake_urlopen)
    idx_dir = tmp_path / "idx"
    with pytest.raises(FileNotFoundError):
        data.prepare_fashion_mnist(str(tmp_path / "tfds"), idx_dir=str(idx_dir))
    assert not urls
    builder = data.prepare_fashion_mnist(str(tmp_path / "tfds"), idx_dir=str(idx_dir), allow_download=True)
    assert sorted(u.rsplit("/", 1)[1] for u in urls) == sorted(os.listdir(idx_dir))
    assert all(u.startswith(fashion_mnist.FASHION_MNIST_URL) for u in urls) and len(urls) == 4
    assert len(builder.as_data_source(split="test")) == N_TEST


# -- a user's image folder ---------------------------------------------------------------------------


@pytest.fixture()
def image_folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(folder / "red_wide.png")
    Image.new("L", (16, 30), 255).save(folder / "sub" / "white_tall.jpg", quality=100)
    Image.new("RGBA", (24, 24), (0, 0, 255, 255)).save(folder / "blue_rgba.png")
    pal = Image.new("P", (18, 18), 0)
    pal.putpalette([0, 255, 0] + [0] * 765)
    pal.save(folder / "green_palette.gif")
    rows = [
        ("red_wide.png", "a red rectangle"),
        ("sub/white_tall.jpg", "a white square"),
        ("blue_rgba.png", "something blue"),
        ("green_palette.gif", "green, with a comma"),
    ]
    return folder, rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in rows))


def _write_csv(path, rows):
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        writer.writerows(rows)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_image_folder_resized_and_captioned(image_folder, encoder, tmp_path, fmt):
    folder, rows = image_folder
    captions_file = folder / f"captions.{fmt}"
    (_write_jsonl if fmt == "jsonl" else _write_csv)(captions_file, rows)
    config = data.default_data_config()
    config.name, config.captions_file = "image_folder", str(captions_file)
    config.data_dir, config.image_size, config.channels = str(tmp_path / "tfds"), 8, 3
    (batch,) = _batches(config, encoder, 1, global_batch_size=4, keep_captions=True, shuffle=False)
    assert batch["image"].shape == (4, 8, 8, 3) and "label" not in batch
    colour = {
        "a red rectangle": [1, -1, -1],
        "a white square": [1, 1, 1],
        "something blue": [-1, -1, 1],
        "green, with a comma": [-1, 1, -1],
    }
    assert sorted(batch["caption"]) == sorted(colour)
    for image, caption in zip(batch["image"], batch["caption"]):
        np.testing.assert_allclose(image, np.broadcast_to(colour[caption], image.shape), atol=0.02)
    np.testing.assert_array_equal(batch["token_ids"], encoder.tokenize(list(batch["caption"]))[0])
    (again,) = _batches(config, encoder, 1, global_batch_size=4, keep_captions=True, shuffle=False)
    _assert_batches_equal(batch, again)  # from the decoded copy kept beside the dataset
    config.cache_max_mb = 0
    (streamed,) = _batches(config, encoder, 1, global_batch_size=4, keep_captions=True, shuffle=False)
    _assert_batches_equal(batch, streamed)

    config.channels = 1
    (gray,) = _batches(config, encoder, 1, global_batch_size=4, keep_captions=True, shuffle=False)
    assert gray["image"].shape == (4, 8, 8, 1)


# -- errors: one clear line each ---------------------------------------------------------------------


def test_error_missing_fashion_mnist_dir(tmp_path, encoder):
    config = data.default_data_config()
    config.data_dir = str(tmp_path / "tfds")
    config.manual_dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as excinfo:
        _batches(config, encoder, 1)
    _one_line_error(excinfo, str(tmp_path / "nowhere"), "apt-get install dataset-fashion-mnist", "data.manual_dir")
    assert not os.path.exists(tmp_path / "tfds" / "captioned_fashion_mnist")


def test_error_missing_tfds_dataset_dir(tmp_path, encoder):
    config = data.default_data_config()
    config.name, config.data_dir = "cifar10", str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as excinfo:
        _batches(config, encoder, 1)
    _one_line_error(excinfo, str(tmp_path / "missing"), "does not exist")
    (tmp_path / "empty").mkdir()
    config.data_dir = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError) as excinfo:
        _batches(config, encoder, 1)
    _one_line_error(excinfo, "'cifar10' is not prepared", str(tmp_path / "empty"), "array_record")


def test_error_captions_file_names_missing_image(image_folder, encoder, tmp_path):
    folder, rows = image_folder
    captions_file = folder / "captions.jsonl"
    _write_jsonl(captions_file, rows[:2] + [("no_such.png", "ghost")] + rows[2:])
    config = data.default_data_config()
    config.name, config.captions_file, config.data_dir = "image_folder", str(captions_file), str(tmp_path / "tfds")
    config.image_size, config.channels = 8, 3
    with pytest.raises(FileNotFoundError) as excinfo:
        _batches(config, encoder, 1, global_batch_size=2)
    _one_line_error(excinfo, "captions.jsonl line 3", "'no_such.png'")
    assert not os.path.exists(tmp_path / "tfds")  # nothing written


def test_error_corrupt_image_names_the_file_and_leaves_no_dataset(image_folder, encoder, tmp_path):
    folder, rows = image_folder
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    captions_file = folder / "captions.jsonl"
    _write_jsonl(captions_file, rows + [("broken.png", "a broken file")])
    config = data.default_data_config()
    config.name, config.captions_file, config.data_dir = "image_folder", str(captions_file), str(tmp_path / "tfds")
    config.image_size, config.channels = 8, 3
    for _ in range(2):  # the failed build left nothing that passes for a prepared dataset
        with pytest.raises(ValueError) as excinfo:
            _batches(config, encoder, 1, global_batch_size=2)
        _one_line_error(excinfo, "cannot read image", "broken.png", "captions line 5")


def test_error_batch_not_divisible_by_process_count(fake_fmnist, encoder):
    config, _ = fake_fmnist
    with pytest.raises(ValueError) as excinfo:
        _batches(config, encoder, 1, global_batch_size=9, process_index=0, process_count=2)
    _one_line_error(excinfo, "global batch size 9", "process count 2")


def test_error_unknown_dataset_name(tmp_path, encoder):
    config = data.default_data_config()
    config.name, config.data_dir = "no_such_dataset_xyz", str(tmp_path)
    with pytest.raises(ValueError) as excinfo:
        _batches(config, encoder, 1)
    _one_line_error(excinfo, "unknown dataset 'no_such_dataset_xyz'", "data.name")


def test_error_bad_config_value(fake_fmnist, encoder):
    config, _ = fake_fmnist
    config = config.copy_and_resolve_references()
    config.channels = 2
    with pytest.raises(ValueError) as excinfo:
        _batches(config, encoder, 1)
    _one_line_error(excinfo, "data.channels")
    with pytest.raises(ValueError) as excinfo:
        _batches({**config.to_dict(), "channels": 1, "imagesize": 32}, encoder, 1)
    _one_line_error(excinfo, "unknown config key data.imagesize")
    partial = {"data_dir": config.data_dir, "caption_templates": ["a {}"]}  # defaults fill the rest
    (batch,) = _batches(partial, encoder, 1, keep_captions=True)
    assert all(c.startswith("a ") or c.startswith("an ") for c in batch["caption"])


def test_default_config_documents_every_key():
    import inspect

    lines = [line.strip() for line in inspect.getsource(data.default_data_config).splitlines()]
    config = data.default_data_config()
    for key in config.keys():
        i = next(i for i, line in enumerate(lines) if line.startswith(f"c.{key} ="))
        assert "  # " in lines[i] or lines[i - 1].startswith("#"), key


# -- the real dataset ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_fashion_mnist_builds_and_matches_idx(tmp_path, encoder):
    if not os.path.isdir(fashion_mnist.DEFAULT_IDX_DIR):
        pytest.skip("dataset-fashion-mnist is not installed")
    builder = data.prepare_fashion_mnist(str(tmp_path))
    imgs = data.read_idx(os.path.join(fashion_mnist.DEFAULT_IDX_DIR, "t10k-images-idx3-ubyte.gz"))
    labels = data.read_idx(os.path.join(fashion_mnist.DEFAULT_IDX_DIR, "t10k-labels-idx1-ubyte.gz"))
    assert builder.info.splits["train"].num_examples == 60000
    source = builder.as_data_source(split="test")
    assert len(source) == 10000
    for i in range(0, 10000, 997):
        record = source[i]
        np.testing.assert_array_equal(record["image"][..., 0], imgs[record["index"]])
        assert record["label"] == labels[record["index"]]


def test_load_image_converts_palette_16_bit_and_rgb_instead_of_reading_raw_values(tmp_path):
    """Palette images give their colours' luma (not the indices), 16-bit grey is rescaled (not clipped at
    255), RGB on a one-channel model gives the luma (not the red channel)."""
    from PIL import Image

    grey16 = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(np.asarray(images.load_image(str(tmp_path / "g16.png"), 1)),
                                  np.rint(grey16 / 257.0).astype(np.uint8))
    pal = Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 255, 255, 255])
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(np.asarray(images.load_image(str(tmp_path / "p.png"), 1)), [[0, 76], [150, 255]])
    np.testing.assert_array_equal(np.asarray(images.load_image(str(tmp_path / "p.png"), 3))[0, 1], [255, 0, 0])
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(np.asarray(images.load_image(str(tmp_path / "rgb.png"), 1)), 117)


def test_read_image_refuses_another_size_or_colour_for_a_grey_model_unless_resized(tmp_path):
    """The model's size is checked (the command line's --init_image / --mask); --resize resizes and converts: bicubic
    for images, nearest for masks (a mask stays binary), colour to luma for a grey model."""
    grey = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "green.png")
    path = str(tmp_path / "grey.png")
    np.testing.assert_array_equal(images.read_image(path, 1, (16, 16)), grey)  # the model's size: as it is
    with pytest.raises(ValueError, match=r"^--init_image .*grey.png is an image of 16x16; the model's images are 8x8, "
                                         r"grey \(--resize resizes and converts it\)$"):
        images.read_image(path, 1, (8, 8), what="--init_image")
    with pytest.raises(ValueError, match=r"green.png is a colour image of 8x8"):
        images.read_image(str(tmp_path / "green.png"), 1, (8, 8))
    np.testing.assert_array_equal(images.read_image(str(tmp_path / "green.png"), 3, (8, 8)), rgb)  # colour model
    resized = images.read_image(path, 1, (8, 8), resize=True)
    expected = Image.fromarray(grey).convert("RGB").resize((8, 8), Image.Resampling.BICUBIC).convert("L")
    np.testing.assert_array_equal(resized, np.asarray(expected))
    np.testing.assert_array_equal(images.read_image(str(tmp_path / "green.png"), 1, (8, 8), resize=True), 117)
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    small = images.read_image(str(tmp_path / "mask.png"), 1, (8, 8), resize=True, mask=True)
    assert set(np.unique(small)) == {0, 255} and (small[:, 4:] == 255).all() and (small[:, :4] == 0).all()
