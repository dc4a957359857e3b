"""Small stand-ins for real data, shared by the tests."""

import os

import numpy as np

from diffjax import data
from diffjax.data import fashion_mnist


def write_fake_fashion_mnist(directory, n_train=40, n_test=20, seed=0):
    """Random 28×28 uint8 images with labels 0..9 as Fashion-MNIST's four IDX .gz files in ``directory``;
    returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        img_name, lbl_name = fashion_mnist.FASHION_MNIST_FILES[split]
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        imgs[:, 0, 0] = 0  # exact extremes present
        imgs[:, 0, 1] = 255
        labels = (np.arange(n) * 7 % 10).astype(np.uint8)
        data.write_idx(os.path.join(directory, img_name), imgs)
        data.write_idx(os.path.join(directory, lbl_name), labels)
        out[split] = (imgs, labels)
    return out
