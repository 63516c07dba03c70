"""Under torchrun: what one save and one load cost each rank (tests/test_checkpoint_io.py,
benchmarks/RESULTS.md).

    check_checkpoint_io.py OUT [overrides]
A job takes two training steps and saves after each; jobs at the same layout load the second.
Each rank writes OUT/io/rank<R>.json with (first_* for the first save)
  save_seconds, save_sync_seconds  the save, and the part of it the step waits for
  save_added_rss                   peak resident bytes during the save above those before it
                                   (the peak is reset first through /proc/self/clear_refs)
  save_wchar, load_rchar           bytes through write() during the save, through read()
                                   during the second load (/proc/self/io: page cache
                                   included; the first load also counts the modules Python
                                   imports on the way)
  load_seconds, loaded_step
  config                           the job's config, as it derived and resolved it
The bytes each rank wrote are its files in the checkpoint (`__<rank>_<n>.distcp`), counted by
the test.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Light for the helper megatron-core's checkpoint writer spawns (see run_entry_point.py).
if __name__ != "__mp_main__":
    import torch.distributed as dist  # noqa: E402

    import check_checkpoints as cc  # noqa: E402
    from megatron_ecdit.training.trainer import Job  # noqa: E402


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def io_counter(name: str) -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        key, value = line.split(":")
        if key == name:
            return int(value)
    raise KeyError(name)


def measured_save(job: Job, step: int) -> dict:
    dist.barrier()
    rss, wchar = status_kib("VmRSS"), io_counter("wchar")
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
    start = time.perf_counter()
    path = job.save(step)
    sync_seconds = time.perf_counter() - start
    job.checkpointer.finalize(blocking=True)
    return {"save_seconds": time.perf_counter() - start, "save_sync_seconds": sync_seconds,
            "save_added_rss": (status_kib("VmHWM") - rss) * 1024,
            "save_wchar": io_counter("wchar") - wchar, "path": str(path)}


def main() -> None:
    """Two saves (the first plans and validates, the second reuses the plan), then two loads
    (the first imports what loading imports; the second is measured)."""
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    job = Job(cc.config(out, ["train.resume=never", *overrides]))
    batches = job.batches()
    for step in (1, 2):
        job.backend.zero_grad()
        job.forward_backward([next(batches) for _ in range(job.cfg.train.num_microbatches)], step)
        job.backend.step(job.cfg.optim.lr)
        job.ema.update(job.model)
        report = {f"first_{k}": v for k, v in report.items()} if step == 2 else {}
        report.update(measured_save(job, step))
    report["config"] = job.cfg.to_dict()  # as the job derived and resolved it
    job.checkpointer.close()
    del job
    for _ in range(2):
        dist.barrier()
        job = Job(cc.config(out, [f"train.resume={report['path']}", *overrides]))
        rchar, start = io_counter("rchar"), time.perf_counter()
        report["loaded_step"] = job.resume()
        report.update(load_seconds=time.perf_counter() - start,
                      load_rchar=io_counter("rchar") - rchar)
        del job
    (out / "io").mkdir(parents=True, exist_ok=True)
    (out / "io" / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    main()
