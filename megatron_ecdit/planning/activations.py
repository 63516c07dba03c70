"""Bytes autograd saves for backward, per block and micro-batch, term by term.

Each term is one tensor the block's forward saves (checked against `saved_tensors_hooks` in
tests/test_planning.py, dense and EC blocks, in fp32 and bf16 in one process and in fp32 at
TP2+SP and EP2 under gloo).
`a` is one hidden-state tensor of the micro-batch, b x S x D elements (S = tokens kept per
image after MaskDiT masking). Tensors of the residual stream are divided by TP only under
sequence parallelism (megatron-core saves a column-parallel layer's *local* input and gathers
it again in backward); per-head tensors (q, k, v, attention output) and the FFN hidden by TP;
expert buffers hold E x N tokens per rank (N = C x pools on every EP rank, C = ceil(S f_c / E)
per image), with their hidden split by expert-TP. The EC layer routes the whole gathered
sequence on every TP rank, so its input is never divided.

dtype: tensors take the parameters' dtype (`train.precision`; 2 bytes under bf16) except
norm statistics, router probabilities and the attention log-sum-exp, which stay fp32, and under
bf16 the router's fp32 copy of its input; indices are int64. That is the GPU: a CPU saves bf16
norm statistics and runs the attention core in fp32 (models/attention.py), so there q, k, v and
the attention output are saved in fp32.

Recompute (`parallel.activation_checkpointing`): `full` keeps only each block's input and
recomputes the block in backward (one block's activations live again at a time); `moe_only`
keeps the MoE layer's input in place of its buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ecdit.config import ModelConfig, MoEConfig
from megatron_ecdit.moe.router import expert_capacity, pool_shape

FP32, COMPUTE, INDEX = "fp32", "compute", "index"


@dataclass(frozen=True)
class Shape:
    """The sizes a block's activations depend on, for one micro-batch on one rank."""

    batch: int  # images per micro-batch
    tokens: int  # image tokens per image that the blocks process (after masking)
    text_tokens: int
    tp: int = 1
    sp: bool = False
    etp: int = 1
    compute_bytes: int = 4  # the parameters' dtype: 2 under bf16

    @property
    def seq_div(self) -> int:
        return self.tp if self.sp else 1


def pools_capacity(s: Shape, moe: MoEConfig, capacity_factor: float) -> tuple[int, int]:
    """(pools per micro-batch, C = token slots per expert per pool), as the router sizes them."""
    pools, per_pool = pool_shape(s.tokens, s.batch, moe.pool, moe.group_size)
    top_k = moe.top_k if moe.router == "token_choice" else 1
    return pools, expert_capacity(per_pool, moe.num_experts, capacity_factor, top_k)


def expert_tokens(s: Shape, moe: MoEConfig, capacity_factor: float) -> int:
    """E x N: token rows in one MoE layer's expert buffers on a rank (any EP degree)."""
    pools, capacity = pools_capacity(s, moe, capacity_factor)
    return moe.num_experts * pools * capacity


def _attention_terms(m: ModelConfig, s: Shape, kv_len: int, prefix: str) -> dict:
    b, S, t = s.batch, s.tokens, s.tp
    heads, kv = m.num_heads // t, m.num_kv_heads * m.head_dim // t
    return {f"{prefix}.q": (b * S * m.hidden_size // t, COMPUTE),
            f"{prefix}.kv": (2 * b * kv_len * kv, COMPUTE),
            f"{prefix}.out": (b * S * m.hidden_size // t, COMPUTE),
            f"{prefix}.lse": (b * heads * S, FP32)}


def block_terms(m: ModelConfig, moe: MoEConfig, s: Shape,
                capacity_factor: float | None) -> dict[str, tuple[int, str]]:
    """Every tensor a block saves: name -> (elements, dtype class). capacity_factor None =
    a dense block."""
    b, S, D = s.batch, s.tokens, m.hidden_size
    a_local = b * S * D // s.seq_div
    stats = 2 * b * S // s.seq_div
    terms = {
        "cond": (b * m.cond_size + 6 * b * D + 2 * b * D, COMPUTE),  # SiLU(c), modulation, 1+scale
        "self.norm_in": (a_local, COMPUTE), "self.norm_stats": (stats, FP32),
        "self.normed": (a_local, COMPUTE), "self.qkv_in": (a_local, COMPUTE),
        **_attention_terms(m, s, S, "self"),
        "self.gated": (a_local, COMPUTE),
        "cross.norm_in": (a_local, COMPUTE), "cross.norm_stats": (stats, FP32),
        "cross.q_in": (a_local, COMPUTE),
        **_attention_terms(m, s, s.text_tokens, "cross"),
        "cross.mask": (b * s.text_tokens, FP32),
        "ffn.norm_in": (a_local, COMPUTE), "ffn.norm_stats": (stats, FP32),
        "ffn.normed": (a_local, COMPUTE), "ffn.in": (a_local, COMPUTE),
        "ffn.gated": (a_local, COMPUTE),
    }
    terms.update(ffn_terms(m, moe, s, capacity_factor))
    return terms


def ffn_terms(m: ModelConfig, moe: MoEConfig, s: Shape,
              capacity_factor: float | None) -> dict[str, tuple[int, str]]:
    """The FFN's own saves beyond its input (what `moe_only` recompute drops)."""
    b, S, D = s.batch, s.tokens, m.hidden_size
    if capacity_factor is None:
        hidden = b * S * m.ffn_size // s.tp
        return {"ffn.hidden": (2 * hidden, COMPUTE)}  # GELU input and output
    rows = expert_tokens(s, moe, capacity_factor)
    hidden = rows * m.ffn_size // s.etp
    return {
        "moe.routed_in": (b * S * D if s.sp else 0, COMPUTE),  # the gathered sequence
        "moe.router_in": (b * S * D if s.compute_bytes < 4 else 0, FP32),  # its fp32 copy
        "moe.probs": (b * S * moe.num_experts, FP32),
        "moe.index": (2 * rows, INDEX),  # per pool, and flat
        "moe.buffers": (3 * rows * D, COMPUTE),  # dispatched x, expert output, weighted
        "moe.hidden": (2 * hidden, COMPUTE),
        "moe.gate": (rows, COMPUTE),
    }


def nbytes(terms: dict[str, tuple[int, str]], compute_bytes: int) -> int:
    size = {FP32: 4, COMPUTE: compute_bytes, INDEX: 8}
    return sum(n * size[kind] for n, kind in terms.values())


def block_bytes(m: ModelConfig, moe: MoEConfig, s: Shape, capacity_factor: float | None,
                recompute: str = "none") -> int:
    """Bytes one block keeps for backward between its forward and its backward."""
    if recompute == "full":
        return b_s_d(m, s) * s.compute_bytes
    terms = block_terms(m, moe, s, capacity_factor)
    if recompute == "moe_only" and capacity_factor is not None:
        for name in ffn_terms(m, moe, s, capacity_factor):
            terms.pop(name)
    return nbytes(terms, s.compute_bytes)


def b_s_d(m: ModelConfig, s: Shape) -> int:
    """Elements of the residual stream of a micro-batch on a rank."""
    return s.batch * s.tokens * m.hidden_size // s.seq_div


def recompute_peak(m: ModelConfig, moe: MoEConfig, s: Shape, capacity_factor: float | None,
                   recompute: str) -> int:
    """Bytes live again while one recomputed block (or MoE layer) runs its backward."""
    if recompute == "full":
        return nbytes(block_terms(m, moe, s, capacity_factor), s.compute_bytes)
    if recompute == "moe_only" and capacity_factor is not None:
        return nbytes(ffn_terms(m, moe, s, capacity_factor), s.compute_bytes)
    return 0


def stage_extra_bytes(m: ModelConfig, s: Shape, first: bool, last: bool) -> int:
    """Saved outside the blocks, once per model chunk: the projected text tokens and the
    caption MLP, the timestep MLP, and on the last stage the final layer (full sequence)."""
    b, L, D = s.batch, s.text_tokens, m.hidden_size
    elems = b * L * (m.text_dim + 3 * D) + 4 * b * m.cond_size
    if first:
        elems += b * s.tokens * (D + m.patch_size ** 2 * m.in_channels)
    if last:
        elems += 3 * b * s.tokens * D
    return elems * s.compute_bytes

