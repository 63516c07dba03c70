"""The planner's parameters per rank against the real shard, at the real world size.

Run by tests/test_planning.py. For each case torch.distributed starts with torch's fake
process group (no communication, no peers: one process plays one rank of a 64- to 512-rank
world), megatron-core's groups are created at the planned degrees, and the rank's model chunks
are built on the meta device exactly as the training job builds them. Their parameters must
equal planning.params.rank_params exactly, dense and expert apart. Prints one line per rank
and exits non-zero on a mismatch.
"""

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_ecdit.models.ecdit import stage_chunks
from megatron_ecdit.layers.param_tags import is_expert
from megatron_ecdit.parallel.layout import ParallelLayout
from megatron_ecdit.parallel.setup import parallel_context
from megatron_ecdit.planning.params import rank_params
from megatron_ecdit.tools.plan_layout import paper_config

# (paper size, world size, degrees, ranks to build): first and last pipeline stage, EP ranks
# other than 0, TP ranks other than 0.
CASES = [
    ("M-64E", 512, dict(tp=4, sp=True, pp=2, ep=64), [0, 3, 255, 256, 300, 511]),
    ("M-64E", 512, dict(tp=2, sp=True, pp=2, vpp=19, ep=8), [0, 17, 256, 511]),
    ("XL-8E", 64, dict(tp=2, sp=True, ep=4), [0, 5, 63]),
    ("3XL-32E", 128, dict(tp=2, sp=True, pp=2, ep=16), [0, 37, 64, 127]),
]


def check(size: str, world: int, degrees: dict, rank: int) -> bool:
    cfg = paper_config(size)
    for key, value in degrees.items():
        setattr(cfg.parallel, key, value)
    if cfg.parallel.vpp > 1:
        cfg.train.num_microbatches = cfg.parallel.pp
    layout = ParallelLayout.build(cfg, world)
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
            expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
            create_gloo_process_groups=False)  # gloo cannot join a fake world
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        with torch.device("meta"):
            chunks = stage_chunks(cfg.model, cfg.moe, parallel_context(layout), layout.pp,
                                  layout.vpp, pp_rank)
        params = [p for chunk in chunks for p in chunk.parameters()]
        built = (sum(p.numel() for p in params if not is_expert(p)),
                 sum(p.numel() for p in params if is_expert(p)))
        planned = rank_params(cfg.model, cfg.moe, tp=layout.tp, pp=layout.pp, vpp=layout.vpp,
                              ep=layout.ep, etp=layout.etp, pp_rank=pp_rank)
        ok = built == (planned.dense, planned.expert) and all(p.is_meta for p in params)
        print(f"{size} world {world} {layout.describe()} rank {rank} (pp {pp_rank}, ep "
              f"{parallel_state.get_expert_model_parallel_rank()}, tp "
              f"{parallel_state.get_tensor_model_parallel_rank()}): built {built[0]} dense + "
              f"{built[1]} expert, planned {planned.dense} + {planned.expert} "
              f"{'OK' if ok else 'MISMATCH'}", flush=True)
        return ok
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    results = [check(size, world, degrees, rank)
               for size, world, degrees, ranks in CASES for rank in ranks]
    sys.exit(0 if all(results) else 1)
