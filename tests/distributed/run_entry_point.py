"""Run several jobs through the entry point in one launch (start-up dominates on CPU).

    torchrun --nproc-per-node 2 tests/distributed/run_entry_point.py '[JOB, ...]'
    python tests/distributed/run_entry_point.py '[JOB, ...]'          (one process)

Each JOB is one of
    ["train", ARG, ...]                         pretrain_ecdit.main([ARG, ...]), as the command line
    ["fails", ARG, ...]                         the same, which must exit with 1
    ["export", CHECKPOINT, OUT]                 tools/convert_checkpoint.py export --weights model
    ["import", FOLDER, OUT, OVERRIDE, ...]      tools/convert_checkpoint.py import
    ["sample", CHECKPOINT, OUT, ARG, ...]       tools/sample_ecdit.py
in order; a job that returns non-zero stops the launch with that code.
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

# megatron-core's checkpoint writer starts a helper process by spawn, which imports this
# script again as __mp_main__: it needs none of what follows (torch and megatron-core take
# seconds to import, on every rank's first save).
if __name__ != "__mp_main__":
    import pretrain_ecdit  # noqa: E402
    import torch  # noqa: E402
    from megatron_ecdit.tools import convert_checkpoint, sample_ecdit  # noqa: E402


def main() -> int:
    linear = torch.nn.functional.linear
    for kind, *args in json.loads(sys.argv[1]):
        if kind == "train":
            code = pretrain_ecdit.main(args)
        elif kind == "fails":  # a training run that must stop with an error
            code = 0 if pretrain_ecdit.main(args) == 1 else 3
        elif kind == "sample":
            code = sample_ecdit.main(args)
        elif kind == "export":
            code = convert_checkpoint.main(["export", *args, "--weights", "model"])
        else:
            code = convert_checkpoint.main(["import", *args])
        if code:
            print(f"job {kind} {args} exited with {code}", file=sys.stderr)
            return code
        if torch.nn.functional.linear is not linear:  # later jobs would compute differently
            print(f"job {kind} {args} replaced torch.nn.functional.linear", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
