"""Literal transcriptions used as test oracles and benchmark baselines. Never used in training.

`algorithm1` is EC-DiT's Algorithm 1 line by line, one-hot (B, E, C, S) dispatch tensor
included. `token_choice_loop` is a slow per-token loop of the GShard top-k router.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Expert = Callable[[torch.Tensor], torch.Tensor]


def algorithm1(x_p: torch.Tensor, W_r: torch.Tensor, experts: Sequence[Expert],
               C: int) -> torch.Tensor:
    """EC-DiT Algorithm 1. x_p: (B, S, d) -> (B, S, d). B is the pool axis."""
    S = x_p.shape[1]
    # 1. Compute token-expert affinity scores (router in fp32).
    router_dtype = torch.promote_types(W_r.dtype, torch.float32)
    logits = torch.einsum("bsd,de->bse", x_p.to(router_dtype), W_r.to(router_dtype))  # (B, S, E)
    affinity = logits.softmax(dim=-1)  # (B, S, E)
    affinity = torch.einsum("bse->bes", affinity)  # (B, E, S)
    # 2. Select the top-k tokens for each expert.
    gating, index = torch.topk(affinity, k=C, dim=-1)  # (B, E, C)
    dispatch = F.one_hot(index, num_classes=S).to(x_p.dtype)  # (B, E, C, S)
    # 3. Process the tokens by each expert and combine.
    x_in = torch.einsum("becs,bsd->becd", dispatch, x_p)  # (B, E, C, d)
    x_e = torch.stack([experts[e](x_in[:, e]) for e in range(len(experts))], dim=1)
    return torch.einsum("becs,bec,becd->bsd", dispatch, gating.to(x_e.dtype), x_e)


def expert_functions(w1: torch.Tensor, w2: torch.Tensor) -> list[Expert]:
    """GELU MLP experts from stacked (E, D, H) and (E, H, D) weights."""
    return [lambda x, a=w1[e], b=w2[e]: F.gelu(x @ a, approximate="tanh") @ b
            for e in range(w1.shape[0])]


def token_choice_loop(x_TD: torch.Tensor, W_r: torch.Tensor, experts: Sequence[Expert],
                      top_k: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GShard top-k over one pool, one token at a time. Returns (output, aux_loss)."""
    T, E = x_TD.shape[0], W_r.shape[1]
    router_dtype = torch.promote_types(W_r.dtype, torch.float32)
    probs = (x_TD.to(router_dtype) @ W_r.to(router_dtype)).softmax(-1)
    top, chosen = torch.topk(probs, top_k, dim=-1)
    gates = top / top.sum(-1, keepdim=True)
    load = [0] * E
    out = torch.zeros_like(x_TD)
    for k in range(top_k):  # every first choice before any second choice
        for t in range(T):
            e = int(chosen[t, k])
            if load[e] < C:
                load[e] += 1
                out[t] += gates[t, k] * experts[e](x_TD[t:t + 1])[0]
    fraction = torch.zeros(E, dtype=probs.dtype)
    for e in chosen.flatten().tolist():
        fraction[e] += 1.0 / (T * top_k)
    aux = E * (fraction * probs.mean(0)).sum()
    return out, aux
