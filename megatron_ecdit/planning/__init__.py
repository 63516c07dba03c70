"""Layout planning for EC-DiT: what one rank holds, stores and computes at a parallel layout.

    params.py       parameters of one rank, counted from the real modules on the meta device
                    and cut by the same split rule as the code (layers/param_tags.splits_of)
    activations.py  bytes autograd saves per block and micro-batch (checked against
                    saved_tensors_hooks: measure.py)
    estimate.py     one layout on one cluster: memory per GPU itemised, FLOPs, communication,
                    a predicted step time and MFU, under stated assumptions
    search.py       every layout ParallelLayout.build accepts, estimated and ranked

The planner models the code as it runs: `train.precision` (fp32, or bf16 as megatron-style
mixed precision: bf16 parameters and activations, fp32 main weights, gradients and Adam state),
megatron-core's distributed optimizer or DeepSpeed ZeRO, the fp32 EMA copy, expert-choice
buffers of exactly C tokens per expert and pool. It refuses nothing itself:
ParallelLayout.build does.
"""
