"""Run under torchrun (or as one process): checkpoint checks at one layout. Rank 0 prints one
`RESULT {json}` line.

    check_checkpoints.py resume OUT [overrides]   train 4 steps saving at 2 and 4; drop the
        step-4 checkpoint and resume from step 2: the losses of steps 3-4 must be bitwise equal;
        then write the model's outputs on fixed inputs (raw and EMA weights) to OUT/outputs.npz
    check_checkpoints.py load CKPT REF OUT [overrides]   load CKPT at this layout, compare the
        outputs with REF (an outputs.npz), and save the loaded state again under OUT
    check_checkpoints.py import FOLDER REF OUT [overrides]   import a consolidated folder with
        tools/convert_checkpoint.py at this layout, load it, compare outputs (EMA) with REF
    check_checkpoints.py kill STEP OUT [overrides]   train (saving as configured) and SIGKILL
        this process once step STEP has finished
    check_checkpoints.py killsave STEP OUT [overrides]   train and SIGKILL this process in the
        middle of the save of step STEP: written, not yet published
    check_checkpoints.py race OUT [overrides]   two checkpoints; then rank 1 is handed another
        `latest` than rank 0 (every rank must load rank 0's), then rank 1 cannot read the
        folder rank 0 chose (every rank must stop with one error naming rank 1)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Light for the helper megatron-core's checkpoint writer spawns (see run_entry_point.py).
if __name__ != "__mp_main__":
    import numpy as np  # noqa: E402
    import torch  # noqa: E402
    import torch.distributed as dist  # noqa: E402

    from megatron_ecdit.config import load_config  # noqa: E402
    from megatron_ecdit.training.trainer import Job, train  # noqa: E402

TINY = ["model.hidden_size=32", "model.num_layers=4", "model.num_heads=2",
        "model.num_kv_heads=2", "moe.num_experts=4", "data.image_size=16",
        "train.micro_batch_size=2", "train.progress=false", "train.tensorboard=false",
        "train.log_interval=1", "train.steps=4", "checkpoint.save_interval=2",
        "checkpoint.keep_last=3", "optim.warmup_steps=1", "diffusion.sample_steps=2",
        "train.sample_prompts=['a red circle']", "train.compute_map_prompts=0"]


def config(out: Path, overrides: list[str]):
    data = out.parent / "data"
    return load_config(overrides=[*TINY, f"train.output_dir={out}", "data.samples_per_shard=16",
                                  f"data.urls={data}/{{000000..000003}}.tar", *overrides])


def outputs(job: Job) -> dict[str, np.ndarray]:
    """Predictions on fixed inputs with the raw and the EMA weights (every rank, same inputs)."""
    with torch.no_grad():
        m = job.cfg.model
        g = torch.Generator().manual_seed(7)
        x = torch.randn(4, m.in_channels, m.input_size, m.input_size, generator=g)
        t = torch.rand(4, generator=g)
        text = torch.randn(4, 5, m.text_dim, generator=g)
        mask = torch.ones(4, 5, dtype=torch.bool)
        mask[1, 2:] = False

        def predict():
            job.model.eval()
            if job.pipeline is not None:
                pred = job.pipeline.predict((x, t, text, mask, None), x.shape)
            else:
                pred = job.model(x, t, text, mask).prediction
            job.model.train()
            return pred.float().numpy()

        raw = predict()
        with job.ema.applied(job.model):
            ema = predict()
        return {"model": raw, "ema": ema}


def compare(ours: dict, ref_path: str, against=None) -> dict[str, float]:
    """Largest relative error of our outputs against the reference's (`against` maps our
    weights kind to the reference's)."""
    ref = np.load(ref_path, allow_pickle=False)
    against = against or {"model": "model", "ema": "ema"}
    return {f"{k}_rel_err": float(np.abs(ours[k] - ref[r]).max() / np.abs(ref[r]).max())
            for k, r in against.items()}


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]


def resume(out: Path, overrides: list[str]) -> dict:
    cfg = config(out, [*overrides, "train.resume=never"])
    train(cfg)
    full = losses(out) if dist.get_rank() == 0 else None
    root = out / "checkpoints"
    if dist.get_rank() == 0:  # as if the run had died between step 2 and step 4
        shutil.copytree(root / "step_0000004", out.parent / "step_0000004-uninterrupted")
        shutil.rmtree(root / "step_0000004")
        (root / "latest").write_text("step_0000002")
        (out / "finished").unlink()
    dist.barrier()
    job_summary = train(config(out, [*overrides, "train.resume=auto"]))
    job = Job(config(out, [*overrides, "train.resume=auto"]))
    job.resume()
    result = {"stopped": job_summary["stopped"]}
    if dist.get_rank() == 0:
        resumed = losses(out)
        result.update(full=full, resumed=resumed, equal=full == resumed)
        np.savez(out / "outputs.npz", **outputs(job))
    else:
        outputs(job)
    return result


def load(ckpt: str, ref: str, out: Path, overrides: list[str]) -> dict:
    job = Job(config(out, [*overrides, f"train.resume={ckpt}"]))
    step = job.resume()
    result = {"step": step, **compare(outputs(job), ref)}
    job.save(step)
    return result


def import_(folder: str, ref: str, out: Path, overrides: list[str]) -> dict:
    from megatron_ecdit.tools.convert_checkpoint import import_ as run_import

    path = run_import(folder, str(out), overrides)
    job = Job(config(out, [*overrides, f"train.resume={path}"]))
    step = job.resume()
    # The consolidated folder holds EMA weights; an import starts raw and EMA weights from them.
    return {"step": step, **compare(outputs(job), ref, {"model": "ema", "ema": "ema"})}


def kill(step: int, out: Path, overrides: list[str]) -> None:
    import signal

    from megatron_ecdit.training import trainer

    schedule = trainer.learning_rate

    def learning_rate(cfg, total, index):  # called once per step, with step - 1
        if index == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return schedule(cfg, total, index)

    trainer.learning_rate = learning_rate
    train(config(out, overrides))


def killsave(step: int, out: Path, overrides: list[str]) -> None:
    import signal

    from megatron_ecdit.checkpoint import distributed

    publish = distributed.Checkpointer._publish

    def dying_publish(self, tmp, final, saved_step):
        if saved_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        publish(self, tmp, final, saved_step)

    distributed.Checkpointer._publish = dying_publish
    train(config(out, overrides))


def race(out: Path, overrides: list[str]) -> dict:
    from megatron_ecdit.checkpoint import distributed

    train(config(out, ["train.steps=2", "checkpoint.save_interval=1", *overrides]))
    root = out / "checkpoints"
    first = root / "step_0000001"
    if dist.get_rank() == 1:  # this rank's view of `latest` is stale
        distributed.latest_checkpoint = lambda folder: first
    loaded = [None] * dist.get_world_size()
    dist.all_gather_object(loaded, Job(config(out, ["train.resume=auto", *overrides])).resume())
    if dist.get_rank() == 1:  # and now it cannot read the checkpoint at all
        def unreadable(path):
            raise distributed.CheckpointError(f"{path}: cannot read (simulated)")
        distributed.verify = unreadable
    try:
        Job(config(out, ["train.resume=auto", *overrides])).resume()
        error = None
    except distributed.CheckpointError as err:
        error = str(err)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return {"loaded": loaded, "errors": errors}


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "kill":
        kill(int(args[0]), Path(args[1]), args[2:])
        return
    if mode == "killsave":
        killsave(int(args[0]), Path(args[1]), args[2:])
        return
    if mode == "resume":
        result = resume(Path(args[0]), args[1:])
    elif mode == "load":
        result = load(args[0], args[1], Path(args[2]), args[3:])
    elif mode == "race":
        result = race(Path(args[0]), args[1:])
    else:
        result = import_(args[0], args[1], Path(args[2]), args[3:])
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
