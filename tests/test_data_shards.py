"""The shard stream in one process: sources, exact resume, bad input, and preprocessed shards.

Tiny shards (16x16 synthetic scenes) are written to temporary folders. Checks: brace lists,
"::" lists and pipe: commands read the same samples; a resume after N batches gives exactly
the next batches (keys and tensors) with 0 and 2 DataLoader workers; each kind of bad input
injected into real shards is skipped with exact counts and a warning naming shard and key; the
bad-input ceiling stops the run; shards from tools/preprocess_shards.py give the latents and
text embeddings that encoding on the fly gives (identity VAE and a tiny AutoencoderKL, MiniLM);
preprocessing resumes per shard.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
import webdataset as wds

from megatron_ecdit.config import DataConfig
from megatron_ecdit.data.bad_input import DataError, check_bad_fraction, zero_counts
from megatron_ecdit.data.decode import encode_tensors
from megatron_ecdit.data.shards import BatchStream, detect_format, read_shard
from megatron_ecdit.data.synthetic import write_synthetic_shards
from megatron_ecdit.encoders import TextEncoder, build_vae

ROOT = Path(__file__).resolve().parents[1]
from megatron_ecdit.tools import preprocess_shards  # noqa: E402

SIZE, PER_SHARD, MAX_LENGTH, DIM = 16, 12, 32, 384
PIXEL_SHAPES = dict(latent_shape=(3, SIZE, SIZE), text_shape=(MAX_LENGTH, DIM))


def keys_of(n_shards: int) -> list[str]:
    return [f"{s:05d}{i:04d}" for s in range(n_shards) for i in range(PER_SHARD)]


def stream(urls: str, workers: int = 0, batch: int = 4, shapes=PIXEL_SHAPES, epochs=None,
           **data) -> BatchStream:
    data = {"image_size": SIZE, "shuffle_buffer": 8, **data}
    return BatchStream(DataConfig(urls=urls, num_workers=workers, **data), batch, dp_rank=0,
                       dp_size=1, epochs=epochs, **shapes)


def take(batches, n: int) -> list[dict]:
    return [next(batches) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def preprocess(raw: str, out: Path, *extra: str) -> int:
    return preprocess_shards.main(["--input", raw, "--output", str(out),
                                   f"data.image_size={SIZE}", *extra])


@pytest.fixture(scope="module")
def raw_urls(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("raw")
    write_synthetic_shards(out, 4, PER_SHARD, image_size=SIZE, seed=0)
    return str(out / "{000000..000003}.tar")


@pytest.fixture(scope="module")
def pre_urls(raw_urls, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("pre")
    assert preprocess(raw_urls, out) == 0
    return str(out / "{000000..000003}.tar")


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    return TextEncoder(None, None, MAX_LENGTH)


# --------------------------------------------------------------------------------------------
# Sources and splitting
# --------------------------------------------------------------------------------------------


def test_brace_list_explicit_list_and_pipe_read_the_same(raw_urls):
    folder = Path(raw_urls).parent
    explicit = "::".join(str(folder / f"{s:06d}.tar") for s in range(4))
    piped = f"pipe:cat {raw_urls}"
    reference = take(stream(raw_urls), 6)
    assert_same_batches(take(stream(explicit), 6), reference)
    assert_same_batches(take(stream(piped), 6), reference)
    one_epoch = [k for b in stream(piped, resampled=False, epochs=1) for k in b["key"]]
    assert sorted(one_epoch) == keys_of(4)


def test_epochs_give_every_sample_once_per_epoch_in_a_new_order(raw_urls):
    keys = [k for b in stream(raw_urls, resampled=False, epochs=2, batch=5) for k in b["key"]]
    assert sorted(keys[:48]) == sorted(keys[48:]) == keys_of(4)
    assert keys[:48] != keys[48:]
    batches = list(stream(raw_urls, workers=2, resampled=False, epochs=2, batch=5))
    assert sorted(k for b in batches for k in b["key"]) == sorted(keys_of(4) * 2)
    # Each worker holds 2 shards, 48 samples in two epochs: 9 batches of 5, then one of 3.
    assert [len(b["key"]) for b in batches] == [5] * 18 + [3, 3]


def test_detect_format(raw_urls, pre_urls, tmp_path):
    assert detect_format(raw_urls) == "raw"
    assert detect_format(pre_urls) == "preprocessed"
    assert detect_format(f"{tmp_path}/missing.tar::{raw_urls}") == "raw"
    with pytest.raises(DataError, match="cannot tell the shard format"):
        detect_format(f"{tmp_path}/missing{{0..2}}.tar")


# --------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", ["raw-resampled", "preprocessed-epochs"])
def test_resume_gives_exactly_the_next_batches(raw_urls, pre_urls, workers, mode):
    urls, resampled = (raw_urls, True) if mode == "raw-resampled" else (pre_urls, False)
    first = stream(urls, workers, resampled=resampled)
    take(first, 7)  # preprocessed-epochs: 28 of 48 samples, the next 8 batches cross an epoch
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    if workers:
        assert state["next_worker"] == 1  # resuming must not start at physical worker 0
    expected = take(first, 8)
    resumed = stream(urls, workers, resampled=resampled)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 8), expected)
    assert resumed.state_dict() == first.state_dict()


def test_resume_refuses_a_different_stream(raw_urls):
    first = stream(raw_urls, workers=2)
    take(first, 3)
    state = first.state_dict()
    with pytest.raises(ValueError, match=r"num_workers: saved 2, now 0"):
        stream(raw_urls, workers=0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"seed: saved 0, now 1"):
        stream(raw_urls, workers=2, seed=1).load_state_dict(state)
    with pytest.raises(RuntimeError, match="before the first batch"):
        first.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def read_members(path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, in tar order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def write_members(path, samples: dict[str, dict[str, bytes]]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for key, members in samples.items():
            sink.write({"__key__": key, **members})


def truncate_inside(path, member: str) -> None:
    """Cut the tar in the middle of `member`'s data."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:info.offset_data + info.size // 2])


@pytest.fixture(scope="module")
def bad_raw(tmp_path_factory):
    """Five sources: a good shard, one with five bad samples, one truncated, a missing file
    and a failing pipe: command. Returns (urls, good keys, expected counts)."""
    folder = tmp_path_factory.mktemp("bad_raw")
    good, damaged, truncated = write_synthetic_shards(folder, 3, PER_SHARD, image_size=SIZE)
    samples = read_members(damaged)
    k = list(samples)
    samples[k[2]]["png"] = b"not a png"
    samples[k[4]]["png"] = samples[k[4]]["png"][:40]  # a truncated png
    del samples[k[9]]["png"]
    del samples[k[5]]["txt"]
    samples[k[7]]["txt"] = b"  \n"
    write_members(damaged, samples)
    truncate_inside(truncated, "000020006.png")  # samples 0..5 come through
    urls = "::".join([good, damaged, truncated, str(folder / "missing.tar"),
                      f"pipe:cat {folder}/missing.tar"])
    good_keys = sorted(keys_of(1) + [x for i, x in enumerate(k) if i not in (2, 4, 5, 7, 9)]
                       + [f"00002{i:04d}" for i in range(6)])
    expected = {"undecodable_image": 3, "missing_caption": 1, "empty_caption": 1,
                "corrupt_member": 1, "unreadable_shard": 2, "bad_latent": 0}
    expected["seen"] = len(good_keys) + sum(expected.values())
    return urls, good_keys, expected


@pytest.mark.parametrize("workers", [0, 2])
def test_each_bad_input_kind_is_skipped_and_counted(bad_raw, workers, caplog):
    urls, good_keys, expected = bad_raw
    batches = stream(urls, workers, resampled=False, epochs=1, max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="megatron_ecdit.data"):
        keys = sorted(k for b in batches for k in b["key"])
    assert keys == good_keys
    assert batches.bad_counts() == expected
    if workers == 0:  # worker processes log to their own stderr
        text = caplog.text
        assert "skipped empty_caption" in text and "000010007" in text
        assert "skipped corrupt_member" in text and "000002.tar" in text
        assert text.count("skipped unreadable_shard") == 2 and "missing.tar" in text


def test_resume_restores_the_bad_counts(bad_raw):
    urls = bad_raw[0]
    first = stream(urls, workers=2, max_bad_fraction=0.5, batch=3)
    take(first, 5)
    state = first.state_dict()
    expected = take(first, 6)
    resumed = stream(urls, workers=2, max_bad_fraction=0.5, batch=3)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 6), expected)
    assert resumed.bad_counts() == first.bad_counts()
    assert first.bad_counts()["seen"] > 33  # the endless stream went on past the bad input


def test_truncated_shard_counts_once_and_keeps_the_samples_before(bad_raw):
    truncated = bad_raw[0].split("::")[2]
    items = list(read_shard(truncated))
    assert [i["__key__"] for i in items[:-1]] == [f"00002{i:04d}" for i in range(6)]
    assert items[-1].kind == "corrupt_member" and items[-1].key == "000020006"


def test_damaged_member_header_counts_as_corrupt(tmp_path):
    [path] = write_synthetic_shards(tmp_path, 1, PER_SHARD, image_size=SIZE)
    with tarfile.open(path) as tar:
        header = tar.getmember("000000002.png").offset
    data = bytearray(Path(path).read_bytes())
    data[header + 148:header + 156] = b"9999999\0"  # a wrong header checksum
    Path(path).write_bytes(data)
    items = list(read_shard(path))
    assert [i["__key__"] for i in items[:-1]] == ["000000000", "000000001"]
    assert items[-1].kind == "corrupt_member" and "damaged member header" in items[-1].reason


@pytest.mark.parametrize("workers", [0, 2])
def test_ceiling_stops_with_a_data_error(bad_raw, workers):
    batches = stream(bad_raw[0], workers, max_bad_fraction=0.05, bad_check_after=20)
    with pytest.raises(DataError, match=r"too much bad input: skipped \d+ of \d+ items read "
                                        r"\(\d+\.\d+%\): .*above data.max_bad_fraction=0.05"):
        take(batches, 50)


def test_check_bad_fraction_threshold_and_minimum():
    counts = {**zero_counts(), "seen": 99, "undecodable_image": 50}
    check_bad_fraction(counts, 0.01, 100)  # fewer than 100 seen: not judged yet
    counts.update(seen=100, undecodable_image=1)
    check_bad_fraction(counts, 0.01, 100)  # exactly at the ceiling
    counts.update(corrupt_member=1)
    with pytest.raises(DataError, match="skipped 2 of 100 items read.*corrupt_member 1"):
        check_bad_fraction(counts, 0.01, 100)


@pytest.fixture(scope="module")
def bad_pre(pre_urls, tmp_path_factory):
    """A preprocessed shard with five bad latents or embeddings."""
    path = tmp_path_factory.mktemp("bad_pre") / "000000.tar"
    samples = read_members(Path(pre_urls).parent / "000001.tar")
    k = list(samples)
    text = np.ones((4, DIM), np.float32)
    latent = np.ones((3, SIZE, SIZE), np.float32)
    samples[k[1]]["safetensors"] = encode_tensors(np.ones((3, 8, 8), np.float32), text)
    samples[k[3]]["safetensors"] = encode_tensors(latent, np.ones((4, DIM + 1), np.float32))
    samples[k[6]]["safetensors"] = encode_tensors(latent * np.nan, text)
    samples[k[8]]["safetensors"] = b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header"
    samples[k[10]]["safetensors"] = safetensors.numpy.save({"latent": latent})  # no "text"
    write_members(path, samples)
    return str(path), sorted(x for i, x in enumerate(k) if i not in (1, 3, 6, 8, 10))


def test_bad_latents_are_skipped_and_counted(bad_pre):
    path, good_keys = bad_pre
    batches = stream(path, resampled=False, epochs=1, max_bad_fraction=0.5)
    assert sorted(k for b in batches for k in b["key"]) == good_keys
    assert batches.bad_counts() == {**zero_counts(), "seen": PER_SHARD, "bad_latent": 5}


# --------------------------------------------------------------------------------------------
# Preprocessed shards
# --------------------------------------------------------------------------------------------


def save_tiny_vae(folder: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=SIZE,
                  scaling_factor=0.5, shift_factor=0.1).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("vae_kind", ["identity", "identity-float16", "tiny_autoencoder_kl"])
def test_preprocessed_batches_equal_encoding_on_the_fly(raw_urls, pre_urls, text_encoder,
                                                        vae_kind, tmp_path):
    tol = 1e-5
    if vae_kind == "identity":
        vae, urls = build_vae(None), pre_urls
    else:
        folder = save_tiny_vae(tmp_path / "vae")
        extra = ["--dtype", "float16"] if vae_kind == "identity-float16" else \
            [f"vae.path={folder}"]
        assert preprocess(raw_urls, tmp_path / "pre", *extra) == 0
        urls = str(tmp_path / "pre" / "{000000..000003}.tar")
        vae = build_vae(None if vae_kind == "identity-float16" else str(folder))
        tol = 1e-2 if vae_kind == "identity-float16" else tol
    side = vae.latent_size(SIZE)
    shapes = dict(latent_shape=(vae.latent_channels, side, side), text_shape=(MAX_LENGTH, DIM))
    raw = list(stream(raw_urls, resampled=False, epochs=1))
    pre = list(stream(urls, resampled=False, epochs=1, shapes=shapes))
    assert [b["key"] for b in pre] == [b["key"] for b in raw]
    for r, p in zip(raw, pre):
        assert p["caption"] == r["caption"]
        assert p["latent"].dtype == p["text"].dtype == torch.float32
        assert torch.allclose(p["latent"], vae.encode(r["image"]), atol=tol)
        text, mask = text_encoder.encode(r["caption"])
        assert torch.equal(p["text_mask"], mask)
        assert torch.allclose(p["text"], text, atol=tol)


def test_preprocess_is_resumable(raw_urls, tmp_path):
    out = tmp_path / "pre"
    folder = Path(raw_urls).parent
    missing = tmp_path / "000009.tar"
    inputs = f"{folder}/{{000000..000001}}.tar::{missing}"
    # A first run with a pool of 2 processes; the missing shard fails and is not written.
    assert preprocess(inputs, out, "--workers", "2") == 1
    assert sorted(os.listdir(out)) == ["000000.tar", "000001.tar"]
    # An interrupted run: 000001 was being written when it stopped.
    done = (out / "000000.tar").stat().st_mtime_ns
    os.replace(out / "000001.tar", out / "000001.tar.partial")
    Path(out / "000001.tar.partial").write_bytes(b"half a shard")
    result = subprocess.run([sys.executable, str(ROOT / "tools/preprocess_shards.py"),
                             "--input", f"{folder}/{{000000..000003}}.tar", "--output", str(out),
                             f"data.image_size={SIZE}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 shards written, 1 skipped" in result.stdout
    assert (out / "000000.tar").stat().st_mtime_ns == done
    assert sorted(os.listdir(out)) == [f"{s:06d}.tar" for s in range(4)]
    assert [len(read_members(out / f"{s:06d}.tar")) for s in range(4)] == [PER_SHARD] * 4
