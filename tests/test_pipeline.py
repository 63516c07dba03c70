"""The exported diffusers pipeline as a diffusers user meets it.

`ECDiTPipeline.from_pretrained(folder)` in a plain process (no torch.distributed) draws the
demo's sample prompts; its images equal `ecdit-sample`'s for the same seeds and settings within
one level of 255. `save_pretrained` then `from_pretrained` gives the same weights bit for bit
and the same images. The transformer's diffusers config covers every model and MoE key.
"""

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))

import check_checkpoints as cc  # noqa: E402
from conftest import save_tiny_vae  # noqa: E402
from megatron_ecdit.config import ModelConfig, MoEConfig, TrainConfig  # noqa: E402
from megatron_ecdit.config import transformer_kwargs  # noqa: E402
from megatron_ecdit.evaluation.geneval import read_jsonl  # noqa: E402
from megatron_ecdit.tools import convert_checkpoint, sample_ecdit  # noqa: E402
from megatron_ecdit.training.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = TrainConfig().sample_prompts  # the demo's
STEPS, SCALE, SHIFT = 6, 4.0, 3.0

DRAW = """
import sys, torch
from megatron_ecdit.pipelines import ECDiTPipeline
folder, out, steps, scale, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), \\
    float(sys.argv[4]), sys.argv[5:]
pipe = ECDiTPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
images = pipe(prompts, num_inference_steps=steps, guidance_scale=scale,
              generator=[torch.Generator().manual_seed(s) for s in range(len(prompts))]).images
assert not torch.distributed.is_initialized()
for i, image in enumerate(images):
    image.save(f"{out}/{i:05d}.png")
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ctx):
    root = tmp_path_factory.mktemp("pipeline")
    train(cc.config(root / "run", ["train.steps=6", f"diffusion.sample_shift={SHIFT}"]))
    assert convert_checkpoint.main(["export", str(root / "run" / "checkpoints"),
                                    str(root / "pipe"), "--pipeline", "--no-progress"]) == 0
    return root


def draw(folder: Path, out: Path) -> np.ndarray:
    out.mkdir()
    result = subprocess.run([sys.executable, "-c", DRAW, str(folder), str(out), str(STEPS),
                             str(SCALE), *PROMPTS], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return images(out)


def images(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("0*.png"))])


def test_the_pipeline_draws_what_ecdit_sample_draws(exported, tmp_path):
    assert_draws_alike(exported, tmp_path)


def assert_draws_alike(exported: Path, tmp_path: Path) -> None:
    folder = exported / "pipe"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "ECDiTPipeline"
    assert index["transformer"] == ["megatron_ecdit.pipelines.transformer_ecdit",
                                    "ECDiTTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert scheduler["shift"] == SHIFT
    mine = draw(folder, tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    args = ["--prompts", str(tmp_path / "prompts.txt"), "--steps", str(STEPS), "--cfg-scale",
            str(SCALE), "--compute-maps", "0"]
    assert sample_ecdit.main([str(exported / "run" / "checkpoints"), str(tmp_path / "s"),
                              *args]) == 0
    reference = images(tmp_path / "s")
    assert [r["seed"] for r in read_jsonl(tmp_path / "s/metadata.jsonl")] == list(range(8))
    assert mine.shape == reference.shape == (8, 16, 16, 3) and reference.std() > 5
    assert np.abs(mine - reference).max() <= 1
    # ecdit-sample reads the pipeline folder as it reads the checkpoint
    assert sample_ecdit.main([str(folder), str(tmp_path / "f"), *args]) == 0
    assert np.abs(images(tmp_path / "f") - reference).max() <= 1


def test_save_pretrained_then_from_pretrained_is_bit_for_bit(exported, tmp_path):
    from megatron_ecdit.pipelines import ECDiTPipeline

    pipe = ECDiTPipeline.from_pretrained(exported / "pipe")
    pipe.save_pretrained(tmp_path / "again")
    again = ECDiTPipeline.from_pretrained(tmp_path / "again")
    for part in ("transformer", "text_encoder"):
        a, b = dict(getattr(pipe, part).state_dict()), dict(getattr(again, part).state_dict())
        assert sorted(a) == sorted(b) and a
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], part
    assert again.transformer.config["_ecdit"] == pipe.transformer.config["_ecdit"]
    assert draw(tmp_path / "again", tmp_path / "a").tolist() == \
        draw(exported / "pipe", tmp_path / "b").tolist()


def test_the_transformer_config_holds_every_model_and_moe_key():
    from megatron_ecdit.pipelines import ECDiTTransformer2DModel

    signature = inspect.signature(ECDiTTransformer2DModel.__init__).parameters
    defaults = transformer_kwargs(ModelConfig(), MoEConfig())
    assert sorted(signature) == sorted(["self", *defaults])
    assert {k: signature[k].default for k in defaults} == defaults
    assert len(defaults) == len(dataclasses.fields(ModelConfig)) + len(dataclasses.fields(
        MoEConfig))


def test_with_a_vae_the_pipeline_decodes_as_the_job_does(tmp_path_factory, tmp_path, ctx):
    """A latent-space run (a tiny AutoencoderKL with shift and scale): the pipeline folder
    carries the VAE, and decodes as the training job does."""
    root = tmp_path_factory.mktemp("pipeline-vae")
    save_tiny_vae(root / "vae", shift_factor=0.1)
    train(cc.config(root / "run", ["train.steps=3", f"vae.path={root / 'vae'}",
                                   f"diffusion.sample_shift={SHIFT}"]))
    assert convert_checkpoint.main(["export", str(root / "run" / "checkpoints"),
                                    str(root / "pipe"), "--pipeline", "--no-progress"]) == 0
    index = json.loads((root / "pipe" / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert json.loads((root / "pipe/transformer/config.json").read_text())["in_channels"] == 8
    assert_draws_alike(root, tmp_path)
