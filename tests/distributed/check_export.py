"""Export and import at size, with each process's peak memory (tests/test_export.py).

    check_export.py synthetic FOLDER [overrides]      a synthetic export of that model: random
        fp32 tensors drawn one at a time and streamed into shards of 256MB
    check_export.py import FOLDER OUT REPORT [overrides]     ecdit-convert's import at the
        layout of the launch; each rank writes REPORT/rank<R>.json with its peak RSS, the bytes
        of its share of the weights and of its largest slice
    check_export.py reference FOLDER OUT [overrides]  the import as it was before streaming
        (the whole file read, each rank's shards cut from full tensors), one process
Peak RSS is this process's own (getrusage(RUSAGE_SELF).ru_maxrss), read when the job is done.
"""

import json
import os
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Light for the helper megatron-core's checkpoint writer spawns (see run_entry_point.py).
if __name__ != "__mp_main__":
    import torch  # noqa: E402
    import torch.distributed as dist  # noqa: E402

    from megatron_ecdit.checkpoint.consolidated import meta_model, write_config  # noqa: E402
    from megatron_ecdit.checkpoint.exported import (TensorSpec, WeightsFolder,  # noqa: E402
                                                    staged, write_shards)
    from megatron_ecdit.config import load_config  # noqa: E402

# XL width (Table 1), experts on every other block, pixel space: 0.98 GB of fp32 weights per 4
# blocks; the largest tensor (8 experts' w1) is 170 MB.
XL_WIDTH = ["model.hidden_size=1152", "model.num_heads=18", "model.num_kv_heads=6",
            "model.cond_dim=768", "moe.num_experts=8", "model.in_channels=3",
            "model.input_size=32", "model.text_dim=384", "train.progress=false",
            "train.tensorboard=false"]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthetic(folder: Path, overrides: list[str]) -> None:
    """A synthetic export: the model's names and shapes (meta device), tensors drawn one at a
    time, so this process never holds the model either."""
    cfg = load_config(overrides=[*XL_WIDTH, *overrides])
    specs = {name: TensorSpec(tuple(p.shape), torch.float32)
             for name, p in meta_model(cfg).named_parameters()}

    def fetch(names):
        for name in names:
            g = torch.Generator().manual_seed(sum(map(ord, name)))
            yield name, torch.randn(specs[name].shape, generator=g) * 0.02

    with staged(folder) as tmp:
        write_shards(tmp, specs, fetch, max_shard_size="256MB", progress=False)
        write_config(tmp, cfg.to_dict(), {"step": 0, "weights": "model", "dtype": "fp32",
                                          "source_layout": "synthetic"})


def import_(folder: str, out: Path, report: Path, overrides: list[str]) -> None:
    from megatron_ecdit.tools.convert_checkpoint import import_ as run_import
    from megatron_ecdit.training.trainer import Job

    run_import(folder, str(out), overrides)
    peak = peak_rss_bytes()
    # This rank's share: the parameters it holds at this layout (a Job with no weights loaded,
    # built once the peak is read).
    run = json.loads((Path(folder) / "config.json").read_text())["_ecdit"]["config"]
    job = Job(load_config(base=run, overrides=[f"train.output_dir={out}/share", *overrides]),
              train=False)
    sizes = [p.numel() * p.element_size() for p in job.model.parameters()]
    report.mkdir(parents=True, exist_ok=True)
    (report / f"rank{dist.get_rank()}.json").write_text(json.dumps(
        {"peak_rss": peak, "share": sum(sizes), "largest": max(sizes)}))


def reference(folder: str, out: Path, overrides: list[str]) -> None:
    """Every tensor read whole in fp32, each rank's shard cut from it (parallel.sharding's
    load_full_state), the EMA a copy of the weights: the import before streaming."""
    from megatron_ecdit.parallel.sharding import load_full_state
    from megatron_ecdit.training.optim import EMA
    from megatron_ecdit.training.trainer import Job

    weights = WeightsFolder(folder)
    state = {name: weights.read(name).float() for name in weights.names}
    run = json.loads((Path(folder) / "config.json").read_text())["_ecdit"]["config"]
    job = Job(load_config(base=run, overrides=[f"train.output_dir={out}", "train.resume=never",
                                               *overrides]))
    for chunk in job.chunks:
        load_full_state(chunk, state, job.ctx)
    job.backend.reload_model_params()
    job.ema = EMA(job.model, job.cfg.optim.ema_decay, job.backend.local)
    job.save(0, weights_only=True)


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "synthetic":
        synthetic(Path(args[0]), args[1:])
    elif mode == "import":
        import_(args[0], Path(args[1]), Path(args[2]), args[3:])
    else:
        reference(args[0], Path(args[1]), args[2:])


if __name__ == "__main__":
    main()
