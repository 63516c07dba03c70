"""Frozen encoders: text encoders (MiniLM package, tiny CLIP and T5 built here) and VAEs.

Every model except the packaged MiniLM is built tiny with random weights and saved to a
temporary folder, so the tests need no network and run in seconds on a CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import save_tiny_vae  # noqa: E402

from megatron_ecdit.encoders import (  # noqa: E402
    DiffusersVAE,
    IdentityVAE,
    TextEncoder,
    build_vae,
    default_text_encoder_path,
)

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

MINILM = default_text_encoder_path()
T5_WORDS = ["a", "cat", "dog", "red", "blue", "on", "the", "mat", "photo", "of"]


# --------------------------------------------------------------------------------------------
# Fixtures: tiny models saved to disk once per module
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(MINILM), local_files_only=True)


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder(max_length=32)


def _tiny_clip_text_config(tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, minilm_tokenizer):
    """A tiny CLIPTextModel with the MiniLM tokenizer saved into the same folder."""
    folder = tmp_path_factory.mktemp("clip_text")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**_tiny_clip_text_config(minilm_tokenizer))
    transformers.CLIPTextModel(config).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny T5EncoderModel with a tiny Unigram T5 tokenizer (no sentencepiece needed)."""
    folder = tmp_path_factory.mktemp("t5")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in T5_WORDS]
    tok = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32,
                                   num_layers=1, num_heads=2)
    transformers.T5EncoderModel(config).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------


def test_minilm_package_model_shapes_and_mask(minilm, minilm_tokenizer):
    captions = ["a photo of a red cat", ""]
    hidden, mask = minilm.encode(captions)
    assert minilm.dim == 384
    assert hidden.shape == (2, 32, 384) and hidden.dtype == torch.float32
    assert mask.shape == (2, 32) and mask.dtype == torch.bool
    n_tokens = len(minilm_tokenizer(captions[0])["input_ids"])  # [CLS] ... [SEP]
    assert mask[0].sum() == n_tokens
    assert mask[1].sum() == 2  # "" -> [CLS] [SEP]: the unconditional caption has tokens
    for row in mask:  # real tokens form a prefix
        n = int(row.sum())
        assert row[:n].all() and not row[n:].any()
    assert (hidden[~mask] == 0).all() and hidden[mask].abs().sum(-1).min() > 0


def test_minilm_matches_direct_model_call(minilm, minilm_tokenizer):
    model = transformers.AutoModel.from_pretrained(str(MINILM), local_files_only=True,
                                                   use_safetensors=True).eval()
    caption = "a blue dog on the mat"
    tokens = minilm_tokenizer([caption], return_tensors="pt")
    with torch.no_grad():
        expected = model(**tokens).last_hidden_state[0]  # (n, 384)
    minilm.clear_cache()
    hidden, mask = minilm.encode([caption])
    torch.testing.assert_close(hidden[0, :expected.shape[0]], expected, atol=1e-4, rtol=1e-4)
    assert mask[0].sum() == expected.shape[0]


def test_cache_hits_and_misses(clip_dir):
    enc = TextEncoder(clip_dir, max_length=16)
    first, mask1 = enc.encode(["a cat", "a dog", "a cat"])
    assert (enc.misses, enc.hits, enc.cache_len) == (2, 1, 2)
    again, mask2 = enc.encode(["a dog", "a cat", ""])
    assert (enc.misses, enc.hits, enc.cache_len) == (3, 3, 3)
    torch.testing.assert_close(again[0], first[1], rtol=0, atol=0)
    torch.testing.assert_close(again[1], first[0], rtol=0, atol=0)
    assert torch.equal(mask2[:2], mask1[[1, 0]])
    # Cached embeddings equal fresh ones (cache disabled: every lookup is a miss).
    fresh = TextEncoder(clip_dir, max_length=16, cache_size=0)
    hidden, _ = fresh.encode(["a cat", "a cat"])
    assert (fresh.misses, fresh.hits, fresh.cache_len) == (1, 1, 0)
    torch.testing.assert_close(hidden[0], first[0], atol=1e-5, rtol=1e-5)
    enc.clear_cache()
    assert (enc.misses, enc.hits, enc.cache_len) == (0, 0, 0)


def test_cache_is_lru_bounded(clip_dir):
    enc = TextEncoder(clip_dir, max_length=16, cache_size=2)
    enc.encode(["a"])
    enc.encode(["b"])
    enc.encode(["a"])  # hit: "a" becomes most recent
    enc.encode(["c"])  # evicts "b"
    assert enc.cache_len == 2 and (enc.hits, enc.misses) == (1, 3)
    enc.encode(["a"])
    assert enc.hits == 2
    enc.encode(["b"])
    assert enc.misses == 4


def test_tiny_clip_text_model_loads_and_encodes(clip_dir, minilm_tokenizer):
    enc = TextEncoder(clip_dir, max_length=16)
    assert isinstance(enc.model, transformers.CLIPTextModel) and enc.dim == 32
    assert not enc.model.training
    assert not any(p.requires_grad for p in enc.model.parameters())
    hidden, mask = enc.encode(["a red cat", ""])
    assert hidden.shape == (2, 16, 32) and mask.shape == (2, 16)
    assert mask[1].sum() == 2
    # Against the model called directly on the same padded ids.
    ref = transformers.CLIPTextModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
    tokens = minilm_tokenizer(["a red cat"], padding="max_length", max_length=16,
                              return_tensors="pt")
    with torch.no_grad():
        expected = ref(input_ids=tokens["input_ids"],
                       attention_mask=tokens["attention_mask"]).last_hidden_state[0]
    n = int(mask[0].sum())
    torch.testing.assert_close(hidden[0, :n], expected[:n], atol=1e-5, rtol=1e-5)


def test_separate_tokenizer_folder_and_full_clip_config(tmp_path, minilm_tokenizer):
    """A full CLIP checkpoint (text + vision) without a tokenizer: text tower only."""
    text = _tiny_clip_text_config(minilm_tokenizer)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=8, patch_size=4)
    torch.manual_seed(1)
    full = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                          projection_dim=8))
    full.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        TextEncoder(tmp_path)
    enc = TextEncoder(tmp_path, tokenizer_path=MINILM, max_length=8)
    assert isinstance(enc.model, transformers.CLIPTextModel) and enc.dim == 32
    assert torch.equal(enc.model.embeddings.token_embedding.weight,
                       full.text_model.embeddings.token_embedding.weight)
    hidden, mask = enc.encode(["a photo of a cat on a red mat"])
    assert hidden.shape == (1, 8, 32) and mask[0].all()  # truncated to max_length


def test_tiny_t5_encoder(t5_dir):
    enc = TextEncoder(t5_dir, max_length=8)
    assert isinstance(enc.model, transformers.T5EncoderModel) and enc.dim == 16
    hidden, mask = enc.encode(["a red cat on the mat", ""])
    assert hidden.shape == (2, 8, 16)
    assert mask[0].sum() == 7  # six words + </s>
    assert mask[1].sum() == 1  # "" -> </s>


def test_max_length_beyond_positions_is_rejected(clip_dir):
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(clip_dir, max_length=64)  # the tiny CLIP has 32 positions


def test_missing_text_folder_names_it(tmp_path):
    missing = tmp_path / "no_such_encoder"
    with pytest.raises(FileNotFoundError, match="no_such_encoder"):
        TextEncoder(missing)
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match=r"safetensors.*pytorch_model\.bin"):
        TextEncoder(tmp_path)


def test_missing_tokenizer_folder_names_it(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="tok_missing"):
        TextEncoder(clip_dir, tokenizer_path=tmp_path / "tok_missing")


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"), shift_factor=0.1)


def test_tiny_vae_round_trip_applies_shift_and_scale(vae_dir):
    from diffusers import AutoencoderKL

    vae = build_vae(str(vae_dir))
    assert isinstance(vae, DiffusersVAE)
    assert (vae.latent_channels, vae.downsample) == (8, 2)
    assert (vae.scaling_factor, vae.shift_factor) == (0.5, 0.1)
    assert vae.latent_size(16) == 8
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = vae.encode(images)
    assert latents.shape == (2, 8, 8, 8)
    decoded = vae.decode(latents)
    assert decoded.shape == (2, 3, 16, 16)

    ref = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).eval()
    with torch.no_grad():
        z = ref.encode(images).latent_dist.mode()
        torch.testing.assert_close(latents, (z - 0.1) * 0.5, rtol=0, atol=1e-6)
        torch.testing.assert_close(decoded, ref.decode(z).sample, rtol=1e-5, atol=1e-5)


def test_vae_without_shift_and_pipeline_folder(tmp_path):
    save_tiny_vae(tmp_path / "vae", shift_factor=None)
    vae = build_vae(tmp_path)  # pipeline root: its vae/ subfolder is used
    assert vae.shift_factor == 0.0 and vae.path == tmp_path / "vae"
    images = torch.zeros(1, 3, 8, 8)
    with torch.no_grad():
        z = vae.vae.encode(images).latent_dist.mode()
    torch.testing.assert_close(vae.encode(images), z * 0.5, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(torch.zeros(1, 3, 7, 8))


def test_vae_is_frozen(vae_dir):
    vae = build_vae(vae_dir)
    vae.train()
    assert not vae.training and not vae.vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    out = vae.encode(torch.zeros(1, 3, 8, 8, requires_grad=True))
    assert not out.requires_grad


def test_missing_vae_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        build_vae(tmp_path / "no_such_vae")
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_vae(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        build_vae(tmp_path)


def test_identity_vae_is_identity():
    vae = build_vae(None)
    assert isinstance(vae, IdentityVAE)
    assert (vae.latent_channels, vae.downsample) == (3, 1)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(vae.encode(images), images)
    assert torch.equal(vae.decode(images), images)
    assert vae.latent_size(32) == 32
