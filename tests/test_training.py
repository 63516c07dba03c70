"""The training job end to end on tiny settings: smoke run, determinism, bad input."""

import json
from pathlib import Path

import pytest
import torch

import pretrain_ecdit
from megatron_ecdit.checkpoint.distributed import latest_checkpoint, load_weights
from megatron_ecdit.config import load_config
from megatron_ecdit.models.ecdit import ECDiT
from megatron_ecdit.parallel import setup
from megatron_ecdit.training.trainer import train


def tiny(tmp_path: Path, *extra: str):
    return load_config(overrides=[
        "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "moe.num_experts=4", "train.micro_batch_size=4", "train.log_interval=5",
        f"train.output_dir={tmp_path / 'out'}", "train.progress=false",
        f"data.urls={tmp_path / 'data'}/{{000000..000001}}.tar", "data.samples_per_shard=16",
        "data.shuffle_buffer=8", "diffusion.sample_steps=4", "optim.warmup_steps=2",
        "train.sample_prompts=['a red circle', 'a blue square']", "checkpoint.save_interval=10",
        *extra])


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]


def test_twenty_step_smoke_run(tmp_path, ctx):
    cfg = tiny(tmp_path, "train.steps=20")
    summary = train(cfg)
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all(r["loss"] > 0 for r in rows)
    assert "routing/block1/mean_experts_per_token" in rows[4]
    assert rows[4]["routing/block1/mean_experts_per_token"] == pytest.approx(2.0)
    assert (out / "samples.png").stat().st_size > 1000
    assert (out / "compute_map.png").stat().st_size > 1000
    assert list((out / "tb").iterdir())
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_0000020"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == \
        ["step_0000010", "step_0000020"]
    model = ECDiT(cfg.model, cfg.moe, ctx)
    load_weights(ckpt, [model], which="ema")
    assert summary["first_loss_mean"] > 0


def test_same_seed_same_losses(tmp_path, ctx):
    train(tiny(tmp_path / "a", "train.steps=6", "train.tensorboard=false"))
    train(tiny(tmp_path / "b", "train.steps=6", "train.tensorboard=false"))
    first, second = losses(tmp_path / "a" / "out"), losses(tmp_path / "b" / "out")
    assert len(first) == 6 and first == second
    train(tiny(tmp_path / "c", "train.steps=6", "train.tensorboard=false", "train.seed=5"))
    assert losses(tmp_path / "c" / "out") != first


CPU_FLAGS = {"AVX2": "fpu sse4_2 avx2 fma", "AVX-512 BF16": "avx2 avx512f avx512_bf16",
             "AMX": "avx2 avx512f amx_bf16 amx_tile"}


def fake_cpu(monkeypatch, tmp_path: Path, cpu: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"  # not written for "none": no /proc/cpuinfo
    if cpu in CPU_FLAGS:
        cpuinfo.write_text(f"processor : 0\nflags : {CPU_FLAGS[cpu]}\n")
    monkeypatch.setattr(setup, "CPUINFO", cpuinfo)


@pytest.mark.parametrize("cpu,expected", [("AVX2", "fp32"), ("AVX-512 BF16", "bf16"),
                                          ("AMX", "bf16"), ("none", "fp32")])
def test_auto_precision_is_bf16_only_where_bf16_products_are_native(tmp_path, monkeypatch, cpu,
                                                                    expected):
    fake_cpu(monkeypatch, tmp_path, cpu)
    resolve = [setup.resolve_precision(p, torch.device("cpu")) for p in ("auto", "fp32", "bf16")]
    assert resolve == [expected, "fp32", "bf16"]


def test_a_job_records_the_precision_auto_chose(tmp_path, monkeypatch, ctx):
    fake_cpu(monkeypatch, tmp_path, "AVX2")
    cfg = tiny(tmp_path, "train.steps=2", "train.precision=auto", "train.tensorboard=false")
    train(cfg)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["train"]["precision"] == \
        "fp32"
    assert len(losses(tmp_path / "out")) == 2


def test_masked_training_and_rmsprop_and_token_choice(tmp_path, ctx):
    train(tiny(tmp_path, "train.steps=3", "diffusion.mask_ratio=0.5", "optim.name=rmsprop",
               "moe.router=token_choice", "moe.capacity_factor=1.0", "train.tensorboard=false"))
    assert len(losses(tmp_path / "out")) == 3


def test_optimizer_state_loads_only_into_the_optimizer_that_saved_it(tmp_path, ctx, capsys):
    """AdamW's moments are no RMSprop state: resumed with RMSprop, the run keeps the weights,
    starts its optimizer fresh and says why."""
    train(tiny(tmp_path, "train.steps=2", "checkpoint.save_interval=2", "train.tensorboard=false"))
    capsys.readouterr()
    train(tiny(tmp_path, "train.steps=3", "optim.name=rmsprop", "train.tensorboard=false"))
    out = capsys.readouterr().out
    assert "resumed from" in out
    assert "optimizer state not restored: saved by torch, this run uses torch-rmsprop" in out
    assert len(losses(tmp_path / "out")) == 3


@pytest.mark.parametrize("key", ["text_encoder.path", "vae.path"])
def test_missing_encoder_folder_fails_before_training(tmp_path, ctx, key):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        train(tiny(tmp_path, "train.steps=2", f"{key}={missing}"))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_entry_point_reports_config_errors(capsys):
    assert pretrain_ecdit.main(["train.stepz=3"]) == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().err
    assert pretrain_ecdit.main(["train.steps=abc"]) == 2
    assert "'train.steps' expects int" in capsys.readouterr().err


def test_preprocessed_shards_train_like_raw_shards(tmp_path, ctx):
    """Latents and text embeddings from tools/preprocess_shards.py give the losses of encoding
    on the fly (identity VAE, the packaged text encoder); caption dropout included."""
    from megatron_ecdit.data.preprocess import preprocess_shards

    raw = tiny(tmp_path, "train.steps=3", "train.tensorboard=false",
               "diffusion.caption_dropout=0.5")
    train(raw)
    preprocess_shards(raw.data.urls, tmp_path / "pre", text_cfg=raw.text_encoder,
                      vae_cfg=raw.vae, image_size=raw.data.image_size)
    pre = tiny(tmp_path / "p", "train.steps=3", "train.tensorboard=false",
               "diffusion.caption_dropout=0.5", "data.generate=never",
               f"data.urls={tmp_path / 'pre'}/{{000000..000001}}.tar")
    train(pre)
    assert losses(tmp_path / "p" / "out") == pytest.approx(losses(tmp_path / "out"), rel=1e-5)
