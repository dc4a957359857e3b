"""diffjax.models.inception against pytorch-fid 0.3.0 (``pytorch_fid.inception.InceptionV3``).

The reference is pytorch-fid's own code, built with random weights (its ``fid_inception_v3`` would download
the real ones): the test saves the state dict to a file in the layout of ``pt_inception-2015-12-05-*.pth``,
loads it with :func:`load_pytorch_fid_weights` and compares the pool3 features of 32x32 images (resized to
299 by both sides) and the fc logits.

pytorch-fid subclasses torchvision's Inception blocks. PyPI's torchvision wheels are CUDA builds that do
not import beside the CPU build of torch (``operator torchvision::nms does not exist``), and installing one
breaks ``import diffusers`` in the same environment, so when ``import torchvision`` fails the test puts a
stand-in module ``torchvision.models.inception`` in ``sys.modules`` for its duration. The stand-in is our
own minimal definition of torchvision's Inception-v3 layer layout (module names, channel counts, kernel
sizes, strides and paddings, from the tables ``_BLOCK_LAYOUT``, ``_STEM_LAYOUT`` and ``_MIXED_LAYOUT``),
built by one generic constructor. The forwards under test for the A, C and E blocks (``Mixed_5b``-``5d``,
``6b``-``6e``, ``7b``, ``7c``) are pytorch-fid's own ``FIDInception*`` ones; the stand-in only supplies the
conv + BatchNorm + ReLU unit, the forward of the two grid-reduction blocks (``Mixed_6a``, ``Mixed_7a``:
conv branches and a stride-2 max pool, concatenated), the stem convolutions that pytorch-fid's
``InceptionV3`` chains itself, and ``fc``, which this test applies to the features to get the logits.
"""

import importlib
import sys
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import inception as inc

B, SIZE = 2, 32  # batch and side of the test images


# --------------------------------------------------------------------------------------------------
# Tests that need neither torch nor pytorch-fid
# --------------------------------------------------------------------------------------------------


def test_preprocess_ranges_and_grayscale():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (B, 8, 8, 3), dtype=np.uint8)
    want = inc.preprocess_images(u8, size=16)
    assert want.shape == (B, 16, 16, 3) and want.dtype == jnp.float32
    np.testing.assert_allclose(inc.preprocess_images(u8 / 127.5 - 1.0, size=16), want, atol=1e-6)
    np.testing.assert_allclose(inc.preprocess_images(u8 / 255.0, (0, 1), size=16), want, atol=1e-6)
    gray = u8[..., :1]
    np.testing.assert_array_equal(
        inc.preprocess_images(gray, size=16), inc.preprocess_images(np.repeat(gray, 3, -1), size=16)
    )
    with pytest.raises(ValueError, match="1 or 3 channels"):
        inc.preprocess_images(np.zeros((B, 8, 8, 4), np.uint8))


def test_converter_and_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch-fid Inception weights not found"):
        inc.load_pytorch_fid_weights(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing"):
        inc.convert_pytorch_fid_state_dict({"fc.bias": np.zeros(1008)})
    with pytest.raises(ValueError, match="unexpected tensor"):
        inc.convert_pytorch_fid_state_dict({"AuxLogits.fc.bias": np.zeros(1008)})
    with pytest.raises(ValueError, match="shape"):
        inc.convert_pytorch_fid_state_dict({"fc.bias": np.zeros(1000)})


def test_loader_without_torch(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match="needs torch"):
        inc.load_pytorch_fid_weights(path)


# --------------------------------------------------------------------------------------------------
# The reference: pytorch-fid with random weights
# --------------------------------------------------------------------------------------------------


# The layer layout of torchvision's Inception-v3 that pytorch-fid builds on, as its state dict fixes it: one
# row per conv + BatchNorm layer, (attribute, in channels, out channels, kernel[, stride[, padding]]). A
# kernel (h, w) is a factorised 1xn / nx1 convolution; the padding defaults to half the kernel ("same" at
# stride 1). A channel count given as a string is the block's constructor argument of that name.
_BLOCK_LAYOUT = {
    "InceptionA": (("in", "pool_features"), [
        ("branch1x1", "in", 64, 1),
        ("branch5x5_1", "in", 48, 1),
        ("branch5x5_2", 48, 64, 5),
        ("branch3x3dbl_1", "in", 64, 1),
        ("branch3x3dbl_2", 64, 96, 3),
        ("branch3x3dbl_3", 96, 96, 3),
        ("branch_pool", "in", "pool_features", 1),
    ]),
    "InceptionB": (("in",), [
        ("branch3x3", "in", 384, 3, 2, 0),
        ("branch3x3dbl_1", "in", 64, 1),
        ("branch3x3dbl_2", 64, 96, 3),
        ("branch3x3dbl_3", 96, 96, 3, 2, 0),
    ]),
    "InceptionC": (("in", "c7"), [
        ("branch1x1", "in", 192, 1),
        ("branch7x7_1", "in", "c7", 1),
        ("branch7x7_2", "c7", "c7", (1, 7)),
        ("branch7x7_3", "c7", 192, (7, 1)),
        ("branch7x7dbl_1", "in", "c7", 1),
        ("branch7x7dbl_2", "c7", "c7", (7, 1)),
        ("branch7x7dbl_3", "c7", "c7", (1, 7)),
        ("branch7x7dbl_4", "c7", "c7", (7, 1)),
        ("branch7x7dbl_5", "c7", 192, (1, 7)),
        ("branch_pool", "in", 192, 1),
    ]),
    "InceptionD": (("in",), [
        ("branch3x3_1", "in", 192, 1),
        ("branch3x3_2", 192, 320, 3, 2, 0),
        ("branch7x7x3_1", "in", 192, 1),
        ("branch7x7x3_2", 192, 192, (1, 7)),
        ("branch7x7x3_3", 192, 192, (7, 1)),
        ("branch7x7x3_4", 192, 192, 3, 2, 0),
    ]),
    "InceptionE": (("in",), [
        ("branch1x1", "in", 320, 1),
        ("branch3x3_1", "in", 384, 1),
        ("branch3x3_2a", 384, 384, (1, 3)),
        ("branch3x3_2b", 384, 384, (3, 1)),
        ("branch3x3dbl_1", "in", 448, 1),
        ("branch3x3dbl_2", 448, 384, 3),
        ("branch3x3dbl_3a", 384, 384, (1, 3)),
        ("branch3x3dbl_3b", 384, 384, (3, 1)),
        ("branch_pool", "in", 192, 1),
    ]),
}
# Inception3's parametrised children in order: the stem's conv rows, then (attribute, block, arguments).
_STEM_LAYOUT = [
    ("Conv2d_1a_3x3", 3, 32, 3, 2, 0),
    ("Conv2d_2a_3x3", 32, 32, 3, 1, 0),
    ("Conv2d_2b_3x3", 32, 64, 3),
    ("Conv2d_3b_1x1", 64, 80, 1),
    ("Conv2d_4a_3x3", 80, 192, 3, 1, 0),
]
_MIXED_LAYOUT = [
    ("Mixed_5b", "InceptionA", 192, 32),
    ("Mixed_5c", "InceptionA", 256, 64),
    ("Mixed_5d", "InceptionA", 288, 64),
    ("Mixed_6a", "InceptionB", 288),
    ("Mixed_6b", "InceptionC", 768, 128),
    ("Mixed_6c", "InceptionC", 768, 160),
    ("Mixed_6d", "InceptionC", 768, 160),
    ("Mixed_6e", "InceptionC", 768, 192),
    ("Mixed_7a", "InceptionD", 768),
    ("Mixed_7b", "InceptionE", 1280),
    ("Mixed_7c", "InceptionE", 2048),
]


def _torchvision_standin():
    """A minimal ``torchvision`` whose ``models.inception`` builds the layers of the tables above."""
    import torch
    from torch import nn

    class BasicConv2d(nn.Module):
        """Conv (no bias), BatchNorm (eps 1e-3), ReLU; ``conv`` and ``bn`` are the state dict's names."""

        def __init__(self, cin, cout, kernel, stride=1, padding=None):
            super().__init__()
            kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
            padding = tuple(k // 2 for k in kernel) if padding is None else padding
            self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=1e-3)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    def add_convs(module, rows, sizes):
        for name, cin, cout, *conv in rows:
            setattr(module, name, BasicConv2d(sizes.get(cin, cin), sizes.get(cout, cout), *conv))

    def reduction_forward(self, x):
        """InceptionB and InceptionD, whose forward pytorch-fid keeps: each conv branch (the layers named
        ``<branch>`` or ``<branch>_<i>``, in table order) is a chain applied to ``x``, a 3x3 stride-2 max
        pool of ``x`` is the last branch, and the branch outputs are concatenated along channels."""
        chains = {}
        for name, layer in self.named_children():
            chains.setdefault(name.rsplit("_", 1)[0], []).append(layer)
        outputs = []
        for chain in chains.values():
            h = x
            for layer in chain:
                h = layer(h)
            outputs.append(h)
        return torch.cat(outputs + [nn.functional.max_pool2d(x, 3, 2)], 1)

    def block_class(name, arg_names, rows):
        def __init__(self, *args):
            assert len(args) == len(arg_names), (name, args)
            nn.Module.__init__(self)
            add_convs(self, rows, dict(zip(arg_names, args)))

        attrs = {"__init__": __init__}
        if name in ("InceptionB", "InceptionD"):  # A, C and E: pytorch-fid's FID* subclasses bring forward
            attrs["forward"] = reduction_forward
        return type(name, (nn.Module,), attrs)

    blocks = {name: block_class(name, *spec) for name, spec in _BLOCK_LAYOUT.items()}

    class Inception3(nn.Module):
        """The children pytorch-fid takes (no forward: pytorch-fid chains them itself) and ``fc``."""

        def __init__(self, num_classes=1000, aux_logits=True, **_):
            super().__init__()
            assert not aux_logits  # pytorch-fid asks for no auxiliary classifier
            add_convs(self, _STEM_LAYOUT, {})
            for name, block, *args in _MIXED_LAYOUT:
                setattr(self, name, blocks[block](*args))
            self.fc = nn.Linear(2048, num_classes)

    def inception_v3(weights=None, **kwargs):
        assert weights is None  # the stand-in has no pretrained weights
        return Inception3(**kwargs)

    module = types.ModuleType("torchvision.models.inception")
    for obj in (BasicConv2d, Inception3, inception_v3, *blocks.values()):
        setattr(module, obj.__name__, obj)
    models = types.ModuleType("torchvision.models")
    models.inception = module
    models.inception_v3 = inception_v3
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.28.0"  # pytorch-fid reads it to pass init_weights=False
    tv.models = models
    return {"torchvision": tv, "torchvision.models": models, "torchvision.models.inception": module}


def _import_pytorch_fid_inception(mp):
    """Import ``pytorch_fid.inception`` on the real torchvision or, if that fails, on the stand-in."""
    sys.modules.pop("pytorch_fid.inception", None)
    try:
        import torchvision.models.inception  # noqa: F401
    except (ImportError, RuntimeError, OSError):  # not installed, or PyPI's CUDA build beside torch+cpu
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            mp.delitem(sys.modules, name)
        for name, module in _torchvision_standin().items():
            mp.setitem(sys.modules, name, module)
    return importlib.import_module("pytorch_fid.inception")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(pytorch_fid InceptionV3([3]) with random weights, its fid_inception_v3 net, the saved .pth path)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_fid")
    with pytest.MonkeyPatch.context() as mp:
        fid = _import_pytorch_fid_inception(mp)
        nets = []
        build = fid.fid_inception_v3

        def build_and_keep():
            nets.append(build())
            return nets[-1]

        # No download: keep the random init (load_state_dict of the random net is a no-op).
        mp.setattr(fid, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(sys.modules["torchvision.models.inception"].Inception3, "load_state_dict",
                   lambda self, state_dict, strict=True: None)
        mp.setattr(fid, "fid_inception_v3", build_and_keep)
        torch.manual_seed(0)
        model = fid.InceptionV3([fid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                normalize_input=True)
        net = nets[0]
        sys.modules.pop("pytorch_fid.inception", None)  # it may hold the stand-in's classes

    # BatchNorm statistics: those of a calibration batch (so that activations stay O(1) through the 94
    # layers), then perturbed, with random affine parameters, so that every tensor matters.
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.rand(B, 3, SIZE, SIZE))
        for bn in bns:
            n = bn.num_features
            bn.running_mean += 0.2 * bn.running_var.sqrt() * torch.randn(n)
            bn.running_var *= torch.empty(n).uniform_(0.5, 2.0)
            bn.weight.copy_(torch.empty(n).uniform_(0.5, 1.5))
            bn.bias.copy_(0.2 * torch.randn(n))
    model.eval()
    path = tmp_path_factory.mktemp("fid") / inc.FID_WEIGHTS_FILENAME
    torch.save(net.state_dict(), path)
    return model, net, path


def test_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    for side, size in ((SIZE, 299), (64, 41), (37, 299)):  # up, down (no antialiasing), odd ratio
        x = rng.random((B, side, side, 3), dtype=np.float32)
        got = np.asarray(inc.preprocess_images(x, (0, 1), size=size))
        want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
                             align_corners=False).permute(0, 2, 3, 1).numpy() * 2 - 1
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=f"{side} -> {size}")


def test_features_match_pytorch_fid(reference):
    import torch

    model, net, path = reference
    variables = inc.load_pytorch_fid_weights(path)
    images = np.random.default_rng(2).random((B, SIZE, SIZE, 3), dtype=np.float32)  # [0, 1]
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        want = model(x)[0].flatten(1)
        want_logits = net.fc(want).numpy()
        want = want.numpy()

    t0 = time.perf_counter()
    got, logits = inc.fid_features(variables, images * 2 - 1, return_logits=True)  # diffjax's [-1, 1]
    got, logits = np.asarray(got), np.asarray(logits)
    print(f"fid_features: {time.perf_counter() - t0:.1f}s (compile + run)")

    assert got.shape == (B, inc.FEATURE_DIM) and logits.shape == (B, inc.NUM_CLASSES)
    assert want.std() > 0.1  # activations did not vanish, so the comparison means something
    rel = np.abs(got - want).max() / np.abs(want).max()
    rel_logits = np.abs(logits - want_logits).max() / np.abs(want_logits).max()
    print(f"max relative difference: features {rel:.2e}, logits {rel_logits:.2e}")
    assert rel < 1e-4 and rel_logits < 1e-4
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

