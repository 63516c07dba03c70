"""Export and import at size, with every process's peak memory measured.

A synthetic export of 5 XL-width blocks (1.07 GB of fp32 weights, tensors up to 170 MB) is
imported into a weights-only training checkpoint (weights and EMA: 2.1 GB). Then:
  - `ecdit-convert export --max-shard-size 256MB` streams it into diffusers shards; its peak
    RSS stays within the largest shard + the largest tensor + 1 GiB (torch and the libraries),
    far below the checkpoint, and diffusers' own loader reads the folder;
  - that folder imported under torchrun at TP2 x EP2: each rank's peak RSS stays within its
    share of the weights + the largest tensor + 1 GiB, and the checkpoint it writes is bit for
    bit the one the import wrote before it streamed (the whole file read, shards cut from it);
  - a bf16 export imports in one process without an fp32 copy of the whole file.
Peak RSS: getrusage's ru_maxrss of a child (the export) or of each rank itself (the imports).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ecdit.checkpoint.exported import INDEX, WeightsFolder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests/distributed/check_export.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1")
CONVERT = str(Path(sys.executable).parent / "ecdit-convert")
GiB = 1 << 30
SHARD = 256_000_000  # --max-shard-size 256MB, as huggingface_hub counts it


def run(cmd: list[str], nproc: int = 0) -> str:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(nproc)] if nproc else [])
    result = subprocess.run([*launcher, *cmd], capture_output=True, text=True, env=ENV,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def peak_rss_of(cmd: list[str]) -> int:
    """Peak resident bytes of `cmd`, run as the only child of a fresh process."""
    probe = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    return int(run([sys.executable, "-c", probe, *cmd]).split()[-1]) * 1024


def reports(folder: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(folder.glob("rank*.json"))]


def size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    s = {name: root / name for name in ("synthetic", "imported", "exported", "bf16", "tp2ep2",
                                        "reference", "from-bf16")}
    run([sys.executable, str(SCRIPT), "synthetic", str(s["synthetic"]), "model.num_layers=5"])
    run([sys.executable, str(SCRIPT), "import", str(s["synthetic"]), str(s["imported"]),
         str(root / "report-synthetic")])
    checkpoint = s["imported"] / "checkpoints" / "step_0000000"
    peaks = {dtype: peak_rss_of([CONVERT, "export", str(checkpoint), str(s[name]),
                                 "--max-shard-size", "256MB", "--dtype", dtype, "--no-progress"])
             for name, dtype in (("exported", "fp32"), ("bf16", "bf16"))}
    run([str(SCRIPT), "import", str(s["exported"]), str(s["tp2ep2"]), str(root / "report-4"),
         "parallel.tp=2", "parallel.ep=2"], nproc=4)
    run([sys.executable, str(SCRIPT), "reference", str(s["exported"]), str(s["reference"])])
    run([sys.executable, str(SCRIPT), "import", str(s["bf16"]), str(s["from-bf16"]),
         str(root / "report-bf16")])
    yield {"root": root, "paths": s, "checkpoint": checkpoint, "export_peak": peaks,
           "tp2ep2": reports(root / "report-4"), "from_bf16": reports(root / "report-bf16")[0]}
    shutil.rmtree(root, ignore_errors=True)  # 10 GB


def test_the_export_streams_in_bounded_memory(big):
    folder, checkpoint = big["paths"]["exported"], big["checkpoint"]
    ckpt_bytes = size_of(checkpoint)
    assert ckpt_bytes > 2e9
    weights = WeightsFolder(folder)
    largest_tensor = max(spec.nbytes for spec in weights.specs.values())
    shards = [folder / name for name in weights.shard_files]
    largest_shard = max(f.stat().st_size for f in shards)
    assert len(shards) >= 4 and largest_shard <= SHARD + (1 << 20)
    peak = big["export_peak"]["fp32"]
    print(f"\nexport: checkpoint {ckpt_bytes / 1e9:.2f} GB, shards {len(shards)} (largest "
          f"{largest_shard / 1e6:.0f} MB), largest tensor {largest_tensor / 1e6:.0f} MB, peak "
          f"RSS {peak / 1e9:.2f} GB (fp32), {big['export_peak']['bf16'] / 1e9:.2f} GB (bf16)")
    assert peak <= largest_shard + largest_tensor + GiB, peak
    assert peak < ckpt_bytes / 2
    assert big["export_peak"]["bf16"] <= largest_shard + largest_tensor + GiB


def test_the_shards_and_index_are_what_diffusers_reads(big):
    from megatron_ecdit.pipelines import ECDiTTransformer2DModel

    folder = big["paths"]["exported"]
    index = json.loads((folder / INDEX).read_text())
    source = WeightsFolder(big["paths"]["synthetic"])
    assert sorted(index["weight_map"]) == source.names
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in source.specs.values())
    model = ECDiTTransformer2DModel.from_pretrained(folder)
    assert model.config.hidden_size == 1152 and model.config.num_layers == 5
    loaded = dict(model.named_parameters())
    assert sorted(loaded) == source.names
    different = [n for n in source.names if not torch.equal(loaded[n], source.read(n))]
    assert different == []  # synthetic fp32 -> import -> EMA -> export fp32: unchanged


def test_an_import_at_tp2_ep2_reads_only_its_share_and_equals_the_whole_file_import(big, ctx):
    from megatron.core import dist_checkpointing

    ranks = big["tp2ep2"]
    assert len(ranks) == 4
    whole_file = size_of(big["paths"]["exported"])
    for r in ranks:
        print(f"\nimport TP2xEP2 rank: peak RSS {r['peak_rss'] / 1e9:.2f} GB, share "
              f"{r['share'] / 1e9:.2f} GB (whole export {whole_file / 1e9:.2f} GB)")
        assert r["share"] < whole_file / 2
        assert r["peak_rss"] <= r["share"] + 170_000_000 + GiB, r

    def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
        plain = dist_checkpointing.load_plain_tensors(str(checkpoint))
        return {k: v for k, v in plain.items() if isinstance(v, torch.Tensor)}

    mine = tensors(big["paths"]["tp2ep2"] / "checkpoints" / "step_0000000")
    reference = tensors(big["paths"]["reference"] / "checkpoints" / "step_0000000")
    assert sorted(mine) == sorted(reference) and any(k.startswith("ema.") for k in mine)
    assert [k for k in reference if not torch.equal(mine[k], reference[k])] == []


def test_a_bf16_export_imports_without_an_fp32_copy_of_the_file(big, ctx):
    from megatron.core import dist_checkpointing

    r = big["from_bf16"]
    fp32_file = size_of(big["paths"]["exported"])
    print(f"\nimport of the bf16 export, one process: peak RSS {r['peak_rss'] / 1e9:.2f} GB, "
          f"fp32 weights {r['share'] / 1e9:.2f} GB")
    assert r["share"] > 0.9 * fp32_file  # one process: the share is the whole fp32 model
    assert r["peak_rss"] <= r["share"] + 170_000_000 + GiB, r
    imported = dist_checkpointing.load_plain_tensors(
        str(big["paths"]["from-bf16"] / "checkpoints" / "step_0000000"))
    weights = WeightsFolder(big["paths"]["bf16"])
    name = max(weights.names, key=lambda n: weights.specs[n].nbytes)
    stored = weights.read(name)
    assert stored.dtype == torch.bfloat16
    assert imported[f"model.{name}"].dtype == torch.float32
    assert torch.equal(imported[f"model.{name}"], stored.float())
