"""Tests for diffjax.text: offline CLIP tokenizer (ids equal OpenAI's) and the Flax CLIP text encoder."""

import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import text

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]

PROMPTS = [
    "a photo of a cat",
    "A PHOTO of a Cat!!!",
    "it's 2024, isn't it? pi = 3.14159...",
    "   lots   of\t\nwhite  space   ",
    "don't we'll they've I'm you'd she's",
    "café naïve Ωmega 東京 straße İstanbul 🐱🚀",
    "Σίσυφος ΟΔΟΣ — “quotes” and ‘apostrophes’",
    "&amp;amp; <b>html</b> &lt;tags&gt;",
    "ÃƒÂ© mojibake ftfy fixes",
    "#hashtag @user http://example.com/a_b-c?d=1",
    "",
]
LONG_PROMPT = "a very long prompt about a cat " * 20  # far more than 77 tokens


@pytest.fixture(scope="module")
def openai_tokenizer():
    """OpenAI's own SimpleTokenizer, loaded by file path (importing `clip` would import torch)."""
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    path = os.path.join(os.path.dirname(text.clip_bpe_path()), "simple_tokenizer.py")
    spec = importlib.util.spec_from_file_location("_openai_clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def openai_tokenize(tokenizer, prompt, length=77):
    """`clip.tokenize(prompt, truncate=True)` without torch, but padded with EOS (HF convention)."""
    sot, eot = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]
    tokens = [sot] + tokenizer.encode(prompt) + [eot]
    if len(tokens) > length:
        tokens = tokens[:length]
        tokens[-1] = eot
    return tokens + [eot] * (length - len(tokens)), len(tokens)


@pytest.fixture(scope="module")
def tiny():
    encoder, params = text.TextEncoder.from_config("tiny", seed=0)
    return encoder, params, jax.jit(encoder.encode, static_argnames="trainable")


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_known_ids(tiny):
    encoder = tiny[0]
    ids, mask = encoder.tokenize("a photo of a cat")
    assert ids.shape == mask.shape == (1, 77)
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert ids[0, :7].tolist() == CAT
    assert (ids[0, 7:] == 49407).all()  # padded with <|endoftext|>, as the HF openai/clip-vit-* tokenizers
    assert mask[0].tolist() == [True] * 7 + [False] * 70
    ids, mask = encoder.tokenize(["", "A photo of a CAT."])
    assert ids[0, :3].tolist() == [49406, 49407, 49407] and mask[0].sum() == 2
    assert ids[1, :8].tolist() == CAT[:-1] + [269, 49407]


def test_ids_equal_openai(tiny, openai_tokenizer):
    encoder = tiny[0]
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = encoder.tokenize(PROMPTS + [LONG_PROMPT])
    for row, row_mask, prompt in zip(ids, mask, PROMPTS + [LONG_PROMPT]):
        expected, n = openai_tokenize(openai_tokenizer, prompt)
        assert row.tolist() == expected, prompt
        assert row_mask.sum() == n and row_mask[:n].all(), prompt


def test_long_prompt_truncated_with_warning(tiny):
    encoder = tiny[0]
    with pytest.warns(UserWarning, match=r"prompt 1 .*truncated.*a very long prompt"):
        ids, mask = encoder.tokenize(["a cat", LONG_PROMPT])
    assert mask[1].all() and ids[1, 0] == 49406 and ids[1, -1] == 49407
    assert (ids[1, 1:-1] != 49407).all()


def test_bad_prompts_raise(tiny):
    encoder = tiny[0]
    with pytest.raises(ValueError, match=r"prompts\[1\] is a int"):
        encoder.tokenize(["a cat", 5])
    with pytest.raises(ValueError, match=r"prompts\[0\] is a NoneType"):
        encoder.tokenize([None])
    with pytest.raises(ValueError, match="prompts must be a string or a list of strings"):
        encoder.tokenize(b"bytes")


def test_missing_bpe_file_message(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(text.importlib.metadata, "files", lambda name: [])
    with pytest.raises(ImportError, match=r"pip install --no-deps openai-clip==1\.0\.1"):
        text.clip_bpe_path()


# ---------------------------------------------------------------------------------------------
# model


def test_unknown_size_raises():
    with pytest.raises(ValueError, match=r"unknown text encoder size 'huge'; valid sizes: tiny, small, base, large"):
        text.TextEncoder.from_config("huge")


def test_preset_configs():
    base = text.text_config("base")
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads, base.intermediate_size) == (
        512, 12, 8, 2048,
    )
    large = text.text_config("large", num_hidden_layers=3)
    assert (large.hidden_size, large.num_hidden_layers) == (768, 3)
    for cfg in (base, large):
        assert (cfg.vocab_size, cfg.max_position_embeddings) == (49408, 77)
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (49406, 49407, 49407)


def test_encode_shapes_and_pooling(tiny):
    encoder, params, encode = tiny
    ids, mask = encoder.tokenize(["a photo of a cat", "a photo of a dog", ""])
    out = encode(params, ids, mask)
    d = encoder.hidden_size
    assert out.hidden_states.shape == (3, 77, d) and out.hidden_states.dtype == jnp.float32
    assert out.pooled.shape == (3, d) and out.pooled.dtype == jnp.float32
    assert out.mask.shape == (3, 77) and out.mask.dtype == jnp.bool_
    np.testing.assert_array_equal(out.mask, mask)
    # pooled = state at the EOS token (positions 6, 6, 1)
    eos = np.array([6, 6, 1])
    np.testing.assert_array_equal(out.pooled, np.asarray(out.hidden_states)[np.arange(3), eos])
    # ... which is what transformers' FlaxCLIPTextModel pools
    ref = encoder.module.apply({"params": params}, ids, mask.astype(np.int32), encoder._positions(ids))
    np.testing.assert_allclose(out.pooled, ref.pooler_output, atol=1e-6)
    # output depends on the text
    assert np.abs(out.pooled[0] - out.pooled[1]).max() > 1e-4
    assert np.abs(out.hidden_states[0, 5] - out.hidden_states[1, 5]).max() > 1e-4
    # default mask (no attention_mask): everything up to the first EOS
    out_default = encode(params, ids)
    np.testing.assert_array_equal(out_default.mask, mask)
    np.testing.assert_allclose(out_default.pooled, out.pooled, atol=1e-6)
    # ... and real tokens do not depend on the padding (causal model)
    padded_with_zeros = np.where(mask, ids, 0)
    out_zeros = encode(params, padded_with_zeros, mask)
    np.testing.assert_allclose(out_zeros.pooled, out.pooled, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out_zeros.hidden_states)[mask], np.asarray(out.hidden_states)[mask], atol=1e-6
    )
    # unconditional embedding = encoding of ""
    uncond = encoder.unconditional(params, batch_size=2)
    assert uncond.hidden_states.shape == (2, 77, d)
    np.testing.assert_allclose(uncond.hidden_states[1], out.hidden_states[2], atol=1e-6)


def test_bfloat16_compute(tiny):
    encoder, params, _ = tiny
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    bf16 = encoder.replace(dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16 and bf16.tokenizer is encoder.tokenizer
    out = bf16.encode_prompts(params, ["a cat"])
    assert out.hidden_states.dtype == jnp.bfloat16 and out.pooled.dtype == jnp.bfloat16
    ref = encoder.encode_prompts(params, ["a cat"])  # the same batch size as unconditional(): no recompile
    # layer-normed states are O(1); bfloat16 keeps ~3 significant digits through 2 layers
    np.testing.assert_allclose(out.hidden_states.astype(np.float32), ref.hidden_states, atol=0.1)
    with pytest.raises(TypeError, match="unknown field"):
        encoder.replace(hidden_size=8)


def test_frozen_vs_trainable_gradients(tiny):
    encoder, params, encode = tiny
    ids, mask = encoder.tokenize(["a photo of a cat", "a dog"])

    def loss(p, trainable):
        out = encode(p, ids, mask, trainable=trainable)
        return jnp.sum(out.hidden_states**2) + jnp.sum(out.pooled)

    frozen = jax.grad(loss)(params, False)
    trained = jax.grad(loss)(params, True)
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(frozen)) == 0.0
    assert float(jnp.abs(trained["text_model"]["final_layer_norm"]["scale"]).max()) > 0
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(trained["text_model"]["encoder"]))


def test_from_pretrained_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no text encoder directory"):
        text.TextEncoder.from_pretrained(str(tmp_path / "does-not-exist"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        text.TextEncoder.from_pretrained(tmp_path)


ROUND_TRIP_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys
    def no_network(*args, **kwargs):
        raise RuntimeError("network access attempted")
    socket.socket.connect = no_network
    socket.create_connection = no_network
    import numpy as np
    from diffjax import text
    path, prompts_file, out_file = sys.argv[1:]
    prompts = json.load(open(prompts_file))
    encoder, params = text.TextEncoder.from_pretrained(path)
    ids, mask = encoder.tokenize(prompts)
    out = encoder.encode_prompts(params, prompts)
    np.savez(out_file, ids=ids, mask=mask, hidden=out.hidden_states, pooled=out.pooled)
    try:  # a hub id that is not cached: one clear error, no network
        text.TextEncoder.from_pretrained("diffjax-tests/no-such-model")
    except OSError as e:
        assert "could not load a CLIP text model from Hugging Face Hub model" in str(e), e
        assert len(str(e).splitlines()) == 1, e
    else:
        raise AssertionError("expected OSError")
    """
)


@pytest.mark.process("transformers reads HF_HUB_OFFLINE at import: a fresh interpreter")
def test_save_pretrained_round_trip_offline(tiny, tmp_path):
    encoder, params, encode = tiny
    save_dir = tmp_path / "text_encoder"
    encoder.save_pretrained(save_dir, params)
    files = set(os.listdir(save_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"} <= files

    prompts = ["a photo of a cat", "Another, DIFFERENT prompt!", ""]
    ids, mask = encoder.tokenize(prompts)
    expected = encode(params, ids, mask)

    # A fresh process with the hub switched off (transformers reads these variables at import) and
    # sockets disabled loads the directory, tokenizer included.
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu")
    subprocess.run(
        [sys.executable, "-c", ROUND_TRIP_SCRIPT, str(save_dir), str(tmp_path / "prompts.json"),
         str(tmp_path / "out.npz")],
        check=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        timeout=600,
    )
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(got["ids"], ids)
    np.testing.assert_array_equal(got["mask"], mask)
    np.testing.assert_array_equal(got["hidden"], expected.hidden_states)
    np.testing.assert_array_equal(got["pooled"], expected.pooled)


def test_from_pretrained_without_tokenizer_files(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    encoder, params, encode = tiny
    encoder.save_pretrained(tmp_path, params)
    for name in os.listdir(tmp_path):
        if name not in ("config.json", "model.safetensors"):
            os.remove(tmp_path / name)
    loaded, loaded_params = text.TextEncoder.from_pretrained(tmp_path, trainable=True)
    assert loaded.trainable and loaded.max_length == 77
    ids, mask = loaded.tokenize("a photo of a cat")
    assert ids[0, :7].tolist() == CAT
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded_params, params)


@pytest.mark.slow
def test_from_pretrained_pytorch_weights(tiny, tmp_path):
    """A directory with only PyTorch weights loads (from_pt fallback) and matches PyTorch's outputs.

    Slow only because it imports torch."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPTextModel

    encoder, _, encode = tiny
    torch.manual_seed(0)
    pt_model = CLIPTextModel(encoder.config).eval()
    pt_model.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.isfile(tmp_path / "pytorch_model.bin")
    loaded, params = text.TextEncoder.from_pretrained(tmp_path)
    ids, mask = loaded.tokenize(["a photo of a cat", "a dog"])
    out = encode(params, ids, mask)
    with torch.no_grad():
        ref = pt_model(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64)))
    np.testing.assert_allclose(out.pooled, ref.pooler_output.numpy(), atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(out.hidden_states)[mask], ref.last_hidden_state.numpy()[mask], atol=1e-4
    )
    # PyTorch's default format, safetensors with format "pt", loads too
    pt_model.save_pretrained(tmp_path / "st", safe_serialization=True)
    _, st_params = text.TextEncoder.from_pretrained(tmp_path / "st")
    jax.tree_util.tree_map(np.testing.assert_array_equal, st_params, params)


def test_transformers_flax_deprecation_line_is_dropped_and_nothing_else():
    import inspect

    from transformers.modeling_flax_utils import FlaxPreTrainedModel

    # The line diffjax drops is the one this transformers logs when it builds a Flax model.
    assert text.FLAX_DEPRECATION in inspect.getsource(FlaxPreTrainedModel.__init__)
    log = logging.getLogger("transformers.modeling_flax_utils")  # transformers' loggers do not propagate to root
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    log.addHandler(handler)
    try:
        log.warning(text.FLAX_DEPRECATION + " and will be removed in Transformers v5.")
        log.warning("another warning of transformers")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["another warning of transformers"]
