"""The command-line tools as a user meets them: console scripts, what they accept as a
checkpoint, and bad input that ends in one clear line and a non-zero exit (no traceback)."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))

import check_checkpoints as cc  # noqa: E402
import torch  # noqa: E402

from megatron_ecdit.tools import convert_checkpoint, inspect_checkpoint, sample_ecdit  # noqa: E402
from megatron_ecdit.training.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_torch_requirement_is_a_range_a_cluster_torch_satisfies():
    torch_req = next(Requirement(r) for r in importlib.metadata.requires("megatron_ecdit")
                     if Requirement(r).name == "torch")
    spec = torch_req.specifier
    for version in ("2.6.0", "2.9.1", "2.13.0", "2.13.0+cpu", "2.14.0"):
        assert spec.contains(version), version
    # an NGC container's own CUDA build (a local pre-release version)
    assert spec.contains("2.8.0a0+5228986c39.nv25.05", prereleases=True)
    assert not spec.contains("2.5.1")  # megatron-core 0.16 needs torch >= 2.6


@pytest.mark.parametrize("script", ["ecdit-convert", "ecdit-inspect", "ecdit-preprocess",
                                    "ecdit-count-params", "ecdit-make-shards",
                                    "ecdit-evaluate", "ecdit-sample", "ecdit-plan"])
def test_console_scripts_are_installed(script):
    path = shutil.which(script, path=str(BIN))
    assert path is not None, f"{script} is not in {BIN}"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ctx):
    out = tmp_path_factory.mktemp("tools") / "out"
    train(cc.config(out, ["train.steps=2", "checkpoint.save_interval=1"]))
    return out / "checkpoints"


@pytest.mark.parametrize("given", ["checkpoints", "latest", "step_0000002"])
def test_tools_accept_a_checkpoints_folder_its_latest_pointer_or_a_step(trained, tmp_path,
                                                                       capsys, given):
    path = {"checkpoints": trained, "latest": trained / "latest",
            "step_0000002": trained / "step_0000002"}[given]
    assert inspect_checkpoint.main([str(path)]) == 0
    assert "step: 2" in capsys.readouterr().out
    assert convert_checkpoint.main(["export", str(path), str(tmp_path / "exported")]) == 0
    assert inspect_checkpoint.main([str(tmp_path / "exported")]) == 0
    assert "step: 2" in capsys.readouterr().out


def one_line_error(code: int, err: str, expected_code: int, text: str) -> None:
    assert code == expected_code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], err
    assert "Traceback" not in err


def test_inspect_a_corrupt_safetensors_file(trained, tmp_path, capsys):
    folder = tmp_path / "exported"
    assert convert_checkpoint.main(["export", str(trained), str(folder)]) == 0
    capsys.readouterr()
    shard = folder / "diffusion_pytorch_model.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    code = inspect_checkpoint.main([str(folder)])
    one_line_error(code, capsys.readouterr().err, 2,
                   "diffusion_pytorch_model.safetensors is corrupt or truncated")


def test_inspect_a_folder_without_config_json(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    code = inspect_checkpoint.main([str(tmp_path)])
    one_line_error(code, capsys.readouterr().err, 2, "config.json is missing")


def test_inspect_a_latest_pointer_to_nothing(tmp_path, capsys):
    (tmp_path / "latest").write_text("step_0000009")
    code = inspect_checkpoint.main([str(tmp_path)])
    one_line_error(code, capsys.readouterr().err, 2, "which is not there")


def test_a_layout_error_found_at_start_is_one_line_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_ecdit.py"), "--config",
         str(ROOT / "examples/configs/demo.yaml"), "moe.num_experts=7", "parallel.ep=2",
         f"train.output_dir={tmp_path}"], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    one_line_error(result.returncode, result.stderr, 2, "config error: world size 1 is not "
                   "divisible by parallel.etp x parallel.ep x parallel.pp = 1 x 2 x 1")


# --------------------------------------------------------------------------------------------
# Exported folders that are broken
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "exported"
    assert convert_checkpoint.main(["export", str(trained), str(out), "--max-shard-size", "50KB",
                                    "--no-progress"]) == 0
    assert len(list(out.glob("diffusion_pytorch_model-*-of-*.safetensors"))) >= 3
    return out


def break_export(sharded: Path, tmp_path: Path, how: str) -> Path:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "exported"
    shutil.copytree(sharded, folder)
    shards = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))
    if how == "missing shard":
        shards[1].unlink()
    elif how == "truncated shard":
        shards[1].write_bytes(shards[1].read_bytes()[:-64])
    elif how == "wrong shape":
        tensors = load_file(str(shards[0]))
        name = next(iter(tensors))
        tensors[name] = torch.zeros(*tensors[name].shape[:-1], tensors[name].shape[-1] + 1)
        save_file(tensors, str(shards[0]), metadata={"format": "pt"})
    else:  # killed while writing: only the marked temporary folder is there
        partial = tmp_path / ".exported.partial"
        os.replace(folder, partial)
        (partial / ".incomplete").write_text("")
        return partial if how == "half written" else folder
    return folder


@pytest.mark.parametrize("how,text", [
    ("missing shard", "names the shard diffusion_pytorch_model-00002-of-"),
    ("truncated shard", "diffusion_pytorch_model-00002-of-"),
    ("wrong shape", "the model expects"),
    ("half written", "is a half-written export"),
    ("interrupted", "an export into it was interrupted"),
])
def test_a_broken_export_is_one_line_and_a_nonzero_exit(sharded, tmp_path, capsys, how, text):
    folder = break_export(sharded, tmp_path, how)
    capsys.readouterr()
    code = sample_ecdit.main([str(folder), str(tmp_path / "samples"), "--steps", "1"])
    one_line_error(code, capsys.readouterr().err, 2, text)
    code = convert_checkpoint.main(["import", str(folder), str(tmp_path / "imported")])
    one_line_error(code, capsys.readouterr().err, 2, text)
    if how != "wrong shape":  # inspect lists what is stored; the model's shapes are not its
        code = inspect_checkpoint.main([str(folder)])
        one_line_error(code, capsys.readouterr().err, 2, text)


def test_an_export_appears_only_when_complete(trained, sharded, tmp_path, capsys):
    """A failing export leaves neither a partial folder nor a changed output folder."""
    from megatron_ecdit.checkpoint import exported

    out = tmp_path / "out"
    shutil.copytree(sharded, out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RuntimeError, match="disk gone"):
        with exported.staged(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("disk gone")
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    code = convert_checkpoint.main(["export", str(trained), str(out), "--max-shard-size",
                                    "10XB", "--no-progress"])
    one_line_error(code, capsys.readouterr().err, 2, "max shard size '10XB'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_earlier_single_file_export_still_loads(sharded, tmp_path, capsys):
    """config.json {"config", "export"} + one model.safetensors, as exports were written before
    they were sharded: sampled, imported and loaded like a sharded one."""
    from safetensors.torch import save_file

    from megatron_ecdit.checkpoint import consolidated
    from megatron_ecdit.checkpoint.exported import WeightsFolder

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    weights = WeightsFolder(sharded)
    save_file({n: weights.read(n) for n in weights.names}, str(legacy / "model.safetensors"),
              metadata={"format": "pt"})
    saved = json.loads((sharded / "config.json").read_text())["_ecdit"]
    (legacy / "config.json").write_text(json.dumps({"config": saved["config"],
                                                    "export": saved["export"]}))
    _, old = consolidated.load_pretrained(legacy)
    _, new = consolidated.load_pretrained(sharded)
    assert all(torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters()))
    for folder in (legacy, sharded):
        assert sample_ecdit.main([str(folder), str(tmp_path / f"s-{folder.name}"), "--steps",
                                  "2", "--compute-maps", "0"]) == 0
    assert (tmp_path / "s-legacy/00000.png").read_bytes() == \
        (tmp_path / "s-exported/00000.png").read_bytes()
    assert convert_checkpoint.main(["import", str(legacy), str(tmp_path / "imported")]) == 0
    assert inspect_checkpoint.main([str(legacy)]) == 0
    assert "step: 2" in capsys.readouterr().out
