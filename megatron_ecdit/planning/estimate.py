"""One layout on one cluster: memory per GPU, FLOPs, communication, step time and MFU.

Memory follows the code as it runs, per parameter held by a rank (P = dense + expert; S =
P_dense / DP + P_expert / EDP, what ZeRO shards):
    fp32: weights 4 P, EMA 4 P (an fp32 copy on every rank)
        megatron-core: gradients 4 P (fp32 grad buffer), Adam moments 8 S (distributed
            optimizer, ZeRO-1) or 8 P (zero_stage 0); the parameters are the main weights
        DeepSpeed ZeRO-1/2: gradients 4 P (ZeRO-1) or 4 S (ZeRO-2), fp32 master partition and
            moments 12 S, two 5e8-element fp32 buckets at most
    bf16 (megatron-style mixed precision): weights 2 P, EMA 4 P; the optimizer state counts
        the fp32 main weights with the Adam moments
        megatron-core: gradients 4 P (fp32 grad buffer, grad_reduce_in_fp32), fp32 main weights
            and moments 12 S (distributed optimizer) or 12 P (zero_stage 0)
        DeepSpeed ZeRO-1 (its BF16_Optimizer): gradients 4 P (fp32) + 2 P (the parameters' bf16
            gradients, kept through the step), fp32 master partition and moments 12 S, an fp32
            all-reduce bucket and its bf16 copy; ZeRO-2: gradients 4 S (an fp32 partition),
            12 S, one bf16 reduce bucket
    DeepSpeed ZeRO-3 (either precision): as ZeRO-2, with the weights and the EMA partitioned
        too (S in place of P) plus about one block's weights gathered
    activations: activations.py per block, times the micro-batches a pipeline stage holds
        (1F1B: pp - stage; interleaved: megatron's warm-up count of chunks), plus one
        recomputed block, the text/caption/final-layer tensors and the largest collective buffer
    reserved: CUDA context, NCCL and allocator fragmentation (a stated constant)
The worst pipeline stage decides.

Time: compute at peak x an efficiency that grows with the rows of a GEMM (tokens per expert
per GEMM caps the expert GEMMs), plus the communication left exposed, the pipeline bubble.
What overlaps is what the job overlaps: with `parallel.overlap_grad_reduce` (PP = 1 only) the
gradient buckets (megatron-core's: max(40M, 1M x DP) parameters; DeepSpeed's: 5e8) are reduced
while the last micro-batch's backward runs; bucket i is ready at i / n of it, the last one only
at its end, so max(R / n, R - B (n - 1) / n) of a reduction R stays exposed behind a backward
B (its compute and TP traffic; not its expert all-to-alls, which share the inter-node links).
Everything else is on the critical path, each for its reason (`EXPOSED`): TP and EP collectives
feed the next GEMM, a pipeline stage waits for its input, the distributed optimizer's parameter
all-gather runs after the step. Links: NVLink inside a node, a stated bandwidth between nodes; a
group whose ranks span nodes runs at the inter-node rate. Every constant is in `Cluster` and
printed.
The checkpoint's size, bytes per rank and save time: planning/checkpoints.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_ecdit.config import Config
from megatron_ecdit.models.ecdit import stage_layers
from megatron_ecdit.parallel.layout import ParallelLayout
from megatron_ecdit.planning import activations as act
from megatron_ecdit.planning.checkpoints import CheckpointPlan, Storage, checkpoint_plan
from megatron_ecdit.planning.params import ParamCount, rank_params

GiB = 1024 ** 3
DEEPSPEED_BUCKET = 500_000_000  # elements: DeepSpeed's default reduce and all-gather buckets
# Why each kind of traffic sits on the critical path in the job as it is.
EXPOSED = {
    "tp": "each TP all-reduce (all-gather, reduce-scatter under SP) feeds the next GEMM",
    "ep": "the dispatch all-to-all feeds the experts, the combine the next block",
    "pp": "a stage waits for its input and its output gradient (1F1B)",
    "dp_gather": "the distributed optimizer's parameter all-gather runs after the step "
                 "(overlap_param_gather is not built: the EMA reads every parameter then)",
    "dp_pp": "overlap_grad_reduce needs parallel.pp = 1 (the conditioning embedders replicated "
             "on every stage are summed over the pipeline before the data-parallel reduction)",
    "dp_off": "parallel.overlap_grad_reduce is off",
    "dp_buckets": "the last gradient bucket is ready only when the backward ends, and the "
                  "backward of the last micro-batch is shorter than the rest of the reduction",
}
PRECISION = {"fp32": "fp32 parameters, activations, gradients, Adam moments and EMA",
             "bf16": "bf16 parameters and activations (megatron-style mixed precision); fp32 "
                     "main weights, gradients, Adam moments and EMA"}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    gpu_tflops: float = 989.0  # peak dense bf16 (H100 SXM)
    nvlink_gb_s: float = 300.0  # achievable bus bandwidth per GPU inside a node
    internode_gb_s: float = 40.0  # per GPU between nodes (8 x 400 Gb/s NICs per node, ~80%)
    reserved_gib: float = 6.0  # CUDA context, NCCL buffers, allocator fragmentation
    max_gemm_efficiency: float = 0.6  # of peak, for large bf16 GEMMs in eager PyTorch
    half_efficiency_rows: int = 512  # a GEMM with this many rows reaches half of that
    storage: Storage = Storage()  # where checkpoints go

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def efficiency(self, rows: float) -> float:
        return self.max_gemm_efficiency * rows / (rows + self.half_efficiency_rows)

    def bandwidth(self, span: int) -> float:
        """Bytes/s of a group whose ranks lie within `span` consecutive ranks."""
        inside = span <= self.gpus_per_node
        return (self.nvlink_gb_s if inside else self.internode_gb_s) * 1e9

    def assumptions(self, precision: str) -> list[str]:
        return [f"{self.nodes} nodes x {self.gpus_per_node} GPUs, {self.gpu_memory_gib:g} GiB "
                f"each, {self.reserved_gib:g} GiB reserved (CUDA context, NCCL, fragmentation)",
                f"peak {self.gpu_tflops:g} TFLOP/s bf16; a GEMM of r rows runs at "
                f"{self.max_gemm_efficiency:g} x r / (r + {self.half_efficiency_rows}) of peak",
                f"links: {self.nvlink_gb_s:g} GB/s per GPU inside a node (NVLink), "
                f"{self.internode_gb_s:g} GB/s per GPU between nodes; a group spanning nodes "
                "runs at the inter-node rate; only gradient buckets overlap compute (the last "
                "micro-batch's backward, under overlap_grad_reduce)",
                PRECISION[precision] + "; rank order tp-ep-dp-pp (megatron-core)",
                self.storage.describe()]


@dataclass(frozen=True)
class Run:
    """What the planner varies besides the degrees: batch split and `train.precision`."""

    global_batch: int
    micro_batch: int
    precision: str = "bf16"

    def num_microbatches(self, dp: int) -> int:
        return self.global_batch // (self.micro_batch * dp)


@dataclass
class Estimate:
    layout: ParallelLayout
    run: Run
    num_microbatches: int
    params: ParamCount  # on the worst stage's ranks
    memory: dict[str, float]  # bytes per GPU, itemised, worst stage
    flops: float  # executed per step, all GPUs (recompute included)
    model_flops: float  # 3 x forward per step, all GPUs
    comm: dict[str, float]  # bytes sent per GPU per step
    times: dict[str, float]  # seconds per step on the critical path, itemised (exposed)
    expert_gemm_rows: int  # tokens per expert per GEMM
    peak_flops: float  # per GPU, FLOP/s
    checkpoint: CheckpointPlan
    hidden: dict[str, float] = dataclasses.field(default_factory=dict)  # s behind compute
    why_exposed: dict[str, str] = dataclasses.field(default_factory=dict)  # kind: reason
    fits: bool = True

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())

    @property
    def step_time(self) -> float:
        return sum(self.times.values())

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_time * self.layout.world_size * self.peak_flops)

    @property
    def images_per_s(self) -> float:
        return self.run.global_batch / self.step_time

    @property
    def gpu_hours_per_million_images(self) -> float:
        return self.layout.world_size * self.step_time / 3600 * 1e6 / self.run.global_batch


def _shape(cfg: Config, layout: ParallelLayout, run: Run) -> act.Shape:
    tokens = round(cfg.model.num_patches * (1 - cfg.diffusion.mask_ratio))
    return act.Shape(run.micro_batch, tokens, cfg.text_encoder.max_length, layout.tp,
                     layout.sp, layout.etp, 2 if run.precision == "bf16" else 4)


def _capacity_factors(cfg: Config) -> dict[int, float]:
    moe_layers = cfg.moe.moe_layer_indices(cfg.model.num_layers)
    return {i: cfg.moe.capacity_factor_of(k) for k, i in enumerate(moe_layers)}


def forward_flops(cfg: Config, shape: act.Shape) -> tuple[float, float]:
    """(dense, expert) FLOPs of one forward pass of a micro-batch through the whole network:
    f_c experts' worth of tokens at MoE blocks, the router, self- and cross-attention, adaLN
    once per image (Megatron's 2 x rows x in x out per GEMM)."""
    m, moe = cfg.model, cfg.moe
    b, S, L, D = shape.batch, shape.tokens, shape.text_tokens, m.hidden_size
    kv = m.num_kv_heads * m.head_dim
    attn = (2 * b * S * (2 * D * D + 2 * D * kv) + 4 * b * S * S * D  # self
            + 2 * b * S * 2 * D * D + 2 * b * L * 2 * D * kv + 4 * b * S * L * D)  # cross
    adaln = 2 * b * m.cond_size * 6 * D
    ffn = 2 * b * S * 2 * D * m.ffn_size
    full = dataclasses.replace(shape, tp=1, sp=False, etp=1)
    factors = _capacity_factors(cfg)
    dense = expert = 0.0
    for i in range(m.num_layers):
        dense += attn + adaln
        if i in factors:
            expert += act.expert_tokens(full, moe, factors[i]) * 2 * 2 * D * m.ffn_size
            dense += 2 * b * S * D * moe.num_experts
        else:
            dense += ffn
    dense += 2 * b * L * (m.text_dim * D + D * D) + 2 * b * S * D * m.patch_size ** 2 * m.in_channels
    return dense, expert


def estimate(cfg: Config, layout: ParallelLayout, cluster: Cluster, run: Run) -> Estimate:
    m, moe, lay = cfg.model, cfg.moe, layout
    shape = _shape(cfg, lay, run)
    nmb = run.num_microbatches(lay.dp)
    cbytes = shape.compute_bytes
    factors = _capacity_factors(cfg)

    # ---- memory, per pipeline stage; the worst one decides
    worst: tuple[float, dict, ParamCount] | None = None
    stages = []
    for r in range(lay.pp):
        p = rank_params(m, moe, tp=lay.tp, pp=lay.pp, vpp=lay.vpp, ep=lay.ep, etp=lay.etp,
                        pp_rank=r)
        stages.append(p)
        mem = _model_states(m.num_layers // lay.pp, lay, p, run.precision)
        blocks = [i for v in range(lay.vpp) for i in stage_layers(m.num_layers, lay.pp, lay.vpp, r, v)]
        per_mb = sum(act.block_bytes(m, moe, shape, factors.get(i), lay.recompute) for i in blocks)
        chunk = per_mb / lay.vpp
        in_flight = _chunks_in_flight(lay, nmb, r)
        extra = act.stage_extra_bytes(m, shape, r == 0, r == lay.pp - 1) * lay.vpp
        mem["activations"] = chunk * in_flight + extra * min(in_flight, lay.vpp * nmb)
        mem["recompute_peak"] = max((act.recompute_peak(m, moe, shape, factors.get(i), lay.recompute)
                                     for i in blocks), default=0)
        mem["collective_buffers"] = _buffers(cfg, lay, shape, p, run.precision)
        mem["reserved"] = cluster.reserved_gib * GiB
        total = sum(mem.values())
        if worst is None or total > worst[0]:
            worst = (total, mem, p)
    _, memory, params = worst

    # ---- FLOPs
    dense_f, expert_f = forward_flops(cfg, shape)
    micro_total = run.global_batch // run.micro_batch
    model_flops = 3 * (dense_f + expert_f) * micro_total
    redo = {"none": 0.0, "full": dense_f + expert_f, "moe_only": expert_f}[lay.recompute]
    flops = model_flops + redo * micro_total

    # ---- GEMM sizes and compute time
    world = lay.world_size
    rows_dense = shape.batch * shape.tokens
    rows_expert = 0
    if factors:
        pools, capacity = act.pools_capacity(shape, moe, max(factors.values()))
        rows_expert = lay.ep * pools * capacity
    expert_share = expert_f / (dense_f + expert_f) if expert_f else 0.0
    peak = cluster.gpu_tflops * 1e12
    per_gpu = flops / world
    compute = (per_gpu * (1 - expert_share) / (peak * cluster.efficiency(rows_dense))
               + (per_gpu * expert_share / (peak * cluster.efficiency(rows_expert))
                  if rows_expert else 0.0))

    # ---- communication per GPU per step, its time, and what of it compute hides
    comm, times = _communication(cfg, lay, cluster, shape, nmb, params, factors)
    bubble = (lay.pp - 1) / (lay.vpp * nmb) if lay.pp > 1 else 0.0
    times = {"compute": compute, **times}
    on_path = compute + times.get("tp", 0) + times.get("ep", 0) + times.get("pp", 0)
    hidden, why = {}, {k: EXPOSED[k] for k in ("tp", "ep", "pp") if k in times}
    if "dp" in times:
        # the last micro-batch's backward: its compute and TP traffic (NVLink); the expert
        # all-to-alls would share the inter-node links with the buckets
        backward = (compute + times.get("tp", 0)) * (1 - model_flops / 3 / flops) / nmb
        times["dp"], hid, why["dp"] = _data_parallel_exposed(lay, params, times["dp"],
                                                             backward, run.precision)
        hidden = {"dp": hid} if hid else {}
    times["pipeline_bubble"] = on_path * bubble
    ckpt = checkpoint_plan(lay, stages, run.precision, cluster.gpus_per_node, cluster.storage,
                           sum(times.values()))
    est = Estimate(lay, run, nmb, params, memory, flops, model_flops, comm, times, rows_expert,
                   peak, ckpt, hidden, why)
    est.fits = est.memory_total <= cluster.gpu_memory_gib * GiB
    return est


def _data_parallel_exposed(lay: ParallelLayout, p: ParamCount, total: float, backward: float,
                           precision: str) -> tuple[float, float, str]:
    """(exposed, hidden, why) of the data-parallel traffic of a step taking `total` seconds on
    its links, behind a last micro-batch whose backward takes `backward` (module docstring)."""
    gathered = _dp_gather_bytes(lay, precision)
    # megatron-core without ZeRO all-reduces in its buckets; otherwise the reduction is
    # 4 / (4 + gathered) of the bytes and the parameter all-gather the rest
    all_reduce = lay.zero == "megatron" and lay.zero_stage == 0
    reduce = total if all_reduce else total * 4 / (4 + gathered)
    gather = total - reduce
    reasons = [EXPOSED["dp_gather"]] if gather else []
    if not lay.overlap_grad_reduce:
        reasons.insert(0, EXPOSED["dp_pp" if lay.pp > 1 else "dp_off"])
        return total, 0.0, "; ".join(reasons)
    if lay.zero == "megatron":
        buckets = sum(-(-count // max(40_000_000, 1_000_000 * size))
                      for count, size in ((p.dense, lay.dp), (p.expert, lay.expert_dp)) if count)
    else:
        buckets = -(-p.total // DEEPSPEED_BUCKET)
    n = max(int(buckets), 1)
    exposed = max(reduce / n, reduce - backward * (n - 1) / n)
    reasons.insert(0, f"{EXPOSED['dp_buckets']} ({n} bucket{'s' if n > 1 else ''})")
    return exposed + gather, reduce - exposed, "; ".join(reasons)


def _dp_gather_bytes(lay: ParallelLayout, precision: str) -> int:
    """Bytes per parameter of the data-parallel all-gather: megatron-core's distributed
    optimizer gathers the parameters in their dtype; the rest is counted as fp32."""
    if lay.zero == "megatron" and lay.zero_stage >= 1:
        return 2 if precision == "bf16" else 4
    return 4


def _chunks_in_flight(lay: ParallelLayout, nmb: int, r: int) -> int:
    """Model-chunk micro-batches whose activations stage r holds at once (megatron-core's
    warm-up counts: 1F1B pp - r; interleaved 2 (pp - r - 1) + (vpp - 1) pp + 1)."""
    if lay.pp == 1:
        return 1  # gradient accumulation: one micro-batch at a time
    if lay.vpp == 1:
        return min(nmb, lay.pp - r)
    return min(nmb * lay.vpp, 2 * (lay.pp - r - 1) + (lay.vpp - 1) * lay.pp + 1)


def _model_states(stage_blocks: int, lay: ParallelLayout, p: ParamCount,
                  precision: str) -> dict[str, float]:
    """Weights, EMA, gradients and optimizer state of a rank holding `p` on a stage of
    `stage_blocks` blocks (the module's docstring says what each backend keeps)."""
    bf16 = precision == "bf16"
    weight_bytes = 2 if bf16 else 4
    sharded = p.dense / lay.dp + p.expert / lay.expert_dp
    if lay.zero == "deepspeed" and lay.zero_stage == 3:
        # parameters and EMA partitioned over DP, plus about one block's weights gathered
        one_block = p.total / stage_blocks
        mem = {"weights": weight_bytes * (sharded + one_block), "ema": 4 * sharded}
    else:
        mem = {"weights": weight_bytes * p.total, "ema": 4 * p.total}
    if lay.zero == "megatron":
        main = 4 if bf16 else 0  # fp32 main weights beside bf16 parameters
        mem["gradients"] = 4 * p.total
        mem["optimizer"] = (main + 8) * (sharded if lay.zero_stage >= 1 else p.total)
    else:
        mem["gradients"] = 4 * (sharded if lay.zero_stage >= 2 else p.total)
        if bf16 and lay.zero_stage == 1:
            mem["gradients"] += 2 * p.total  # BF16_Optimizer keeps the bf16 gradients too
        mem["optimizer"] = 12 * sharded
    return mem


def _deepspeed_bucket_bytes(lay: ParallelLayout, precision: str) -> int:
    """Bytes per element of DeepSpeed's gradient buckets: in fp32 a reduce and an all-gather
    bucket; in bf16 under ZeRO-1 (BF16_Optimizer) the fp32 gradients flattened into a bucket
    and its bf16 copy that is all-reduced, under ZeRO-2/3 one bf16 reduce bucket."""
    if precision != "bf16":
        return 2 * 4
    return 4 + 2 if lay.zero_stage == 1 else 2


def _buffers(cfg: Config, lay: ParallelLayout, s: act.Shape, p: ParamCount,
             precision: str) -> float:
    """The largest temporary of a collective: an SP all-gather of the sequence, an expert
    all-to-all's receive buffer, or DeepSpeed's reduce and all-gather buckets."""
    full = s.batch * s.tokens * cfg.model.hidden_size * s.compute_bytes
    biggest = full if lay.sp else 0
    if lay.ep > 1:
        factors = _capacity_factors(cfg).values()
        rows = max(act.expert_tokens(s, cfg.moe, f) for f in factors)
        biggest = max(biggest, rows * cfg.model.hidden_size * s.compute_bytes)
    if lay.zero == "deepspeed":
        biggest += _deepspeed_bucket_bytes(lay, precision) * min(DEEPSPEED_BUCKET, p.total)
    return biggest


def _communication(cfg: Config, lay: ParallelLayout, cluster: Cluster, s: act.Shape, nmb: int,
                   p: ParamCount, factors: dict[int, float]) -> tuple[dict, dict]:
    """Bytes each GPU sends per step, per kind, and their time on the links the group spans."""
    m = cfg.model
    a = s.batch * s.tokens * m.hidden_size * s.compute_bytes  # one hidden state, full sequence
    moe_here = len(factors) / lay.pp
    dense_here = m.num_layers / lay.pp - moe_here
    rows = max((act.expert_tokens(s, cfg.moe, f) for f in factors.values()), default=0)
    buffer = rows * m.hidden_size * s.compute_bytes  # one (E, N, D) expert buffer
    # forward + backward, and a recomputed forward
    passes = 3 if lay.recompute == "full" else 2
    moe_passes = 3 if lay.recompute in ("full", "moe_only") else 2
    comm: dict[str, float] = {}
    times: dict[str, float] = {}

    def ring(size: int) -> float:  # bytes a rank sends per byte all-reduced over `size` ranks
        return 2 * (size - 1) / size

    if lay.tp > 1:
        # All-reduce (all-gather + reduce-scatter under SP) after self-attention,
        # cross-attention and the dense FFN; the EC layer gathers and scatters the sequence
        # under SP and reduces the expert outputs over expert-TP.
        moe_layer = (2 * a if lay.sp else 0) + buffer
        volume = nmb * ring(lay.tp) * (passes * (3 * a * dense_here + 2 * a * moe_here)
                                       + moe_passes * moe_layer * moe_here)
        comm["tp"] = volume
        times["tp"] = volume / cluster.bandwidth(lay.tp)
    if lay.ep > 1:  # dispatch and combine all-to-alls, both directions
        volume = nmb * moe_here * moe_passes * 2 * buffer * (lay.ep - 1) / lay.ep
        comm["ep"] = volume
        peers_inside = min(lay.ep, max(cluster.gpus_per_node // lay.tp, 1)) - 1
        inside = peers_inside / (lay.ep - 1)
        times["ep"] = (volume * inside / (cluster.nvlink_gb_s * 1e9)
                       + volume * (1 - inside) / (cluster.internode_gb_s * 1e9))
    if lay.pp > 1:  # hidden states (the parameters' dtype, megatron's pipeline_dtype) forward,
        # their gradients back
        volume = nmb * lay.vpp * 2 * 2 * a / (lay.tp if lay.sp else 1)
        comm["pp"] = volume
        times["pp"] = volume / cluster.bandwidth(lay.world_size // lay.pp + 1)
    if lay.world_size > lay.pp * lay.tp or lay.expert_dp > 1:
        # megatron-core's distributed optimizer: a reduce-scatter of fp32 gradients, then an
        # all-gather of the updated parameters in their dtype (bf16 under bf16), each sending
        # half an all-reduce's bytes; zero_stage 0 all-reduces fp32 gradients. Both groups span
        # world / pp ranks. DeepSpeed is counted as fp32 both ways (its bf16 gradient
        # communication is not modelled).
        gathered = _dp_gather_bytes(lay, "bf16" if s.compute_bytes == 2 else "fp32")
        per_param = (4 + gathered) / 2  # bytes per parameter per all-reduce's worth
        volume = per_param * (p.dense * ring(lay.dp) + p.expert * ring(lay.expert_dp))
        comm["dp"] = volume
        times["dp"] = volume / cluster.bandwidth(lay.world_size // lay.pp)
    return comm, times
