"""The expert-choice layer against Algorithm 1, hand-computed cases, and its invariants."""

import math

import pytest
import torch

from megatron_ecdit.config import ConfigError, MoEConfig, load_config
from megatron_ecdit.moe.experts import GroupedExperts
from megatron_ecdit.moe.layer import MoELayer, set_aux_grad_scale
from megatron_ecdit.moe.reference import algorithm1, expert_functions, token_choice_loop
from megatron_ecdit.moe.router import ExpertChoiceRouter, TokenChoiceRouter, expert_capacity


def ec_layer(D, E, fc, H=16, **router_kwargs):
    layer = MoELayer(ExpertChoiceRouter(D, E, fc, **router_kwargs), GroupedExperts(E, D, H))
    return layer.double()


@pytest.mark.parametrize("B,S,E,fc", [(2, 16, 4, 2.0), (3, 10, 4, 1.5), (1, 7, 3, 2.0),
                                      (4, 9, 8, 2.0), (2, 12, 5, 0.5)])
def test_fast_path_equals_algorithm1_outputs_and_grads(B, S, E, fc):
    torch.manual_seed(B * 100 + S)
    D = 8
    layer = ec_layer(D, E, fc)
    C = layer.router.capacity(S)
    assert C == max(1, min(S, math.ceil(S * fc / E)))
    x = torch.randn(S, B, D, dtype=torch.double, requires_grad=True)
    out = layer(x).output.transpose(0, 1)  # (B, S, D)

    x_ref = x.detach().transpose(0, 1).clone().requires_grad_()
    w1 = layer.experts.w1.detach().clone().requires_grad_()
    w2 = layer.experts.w2.detach().clone().requires_grad_()
    w_r = layer.router.weight.detach().clone().requires_grad_()
    ref = algorithm1(x_ref, w_r, expert_functions(w1, w2), C)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)

    grad = torch.randn_like(ref)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(x.grad.transpose(0, 1), x_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.experts.w1.grad, w1.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.experts.w2.grad, w2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.router.weight.grad, w_r.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pool,group", [("sample", 0), ("group", 6), ("micro_batch", 0)])
def test_every_expert_processes_exactly_c_tokens_per_pool(pool, group):
    S, B, E, D = 12, 3, 4, 8
    router = ExpertChoiceRouter(D, E, 2.0, pool=pool, group_size=group or 1024).double()
    routing = router(torch.randn(S, B, D, dtype=torch.double))
    P, T = {"sample": (B, S), "group": (6, 6), "micro_batch": (1, S * B)}[pool]
    C = router.capacity(T)
    assert routing.token_index_EN.shape == (E, P * C)
    for e in range(E):
        per_pool = routing.token_index_EN[e].view(P, C)
        for p in range(P):
            tokens = per_pool[p].tolist()
            assert len(set(tokens)) == C  # C distinct tokens
            s, b = [t // B for t in tokens], [t % B for t in tokens]
            q = [bb * S + ss for ss, bb in zip(s, b)]  # sample-major position
            assert all(p * T <= qq < (p + 1) * T for qq in q)  # all from pool p


def test_hand_computed_routing_case():
    # One image of 4 tokens, 2 experts, W_r = I: the logits are the tokens themselves.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]).view(4, 1, 2)
    router = ExpertChoiceRouter(2, 2, capacity_factor=0.5)  # C = ceil(4 * 0.5 / 2) = 1
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))
    routing = router(x)
    # Affinities: token 2 -> expert 0 with e^2/(e^2+1); token 1 -> expert 1 with e/(e+1).
    assert routing.token_index_EN.tolist() == [[2], [1]]
    torch.testing.assert_close(routing.gate_EN, torch.tensor(
        [[math.exp(2) / (math.exp(2) + 1)], [math.e / (math.e + 1)]]))
    # Tokens 0 and 3 are chosen by nobody: their FFN output is exactly zero (residual only).
    layer = MoELayer(router, GroupedExperts(2, 2, 4))
    out = layer(x)
    assert out.stats.experts_per_token.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    assert out.stats.unrouted_fraction.item() == 0.5
    assert torch.all(out.output[[0, 3]] == 0)
    assert torch.all(out.output[[1, 2]] != 0)
    # With f_c = 1 (C = 2): expert 0 takes tokens 2 (0.881) and 0 (0.731); expert 1 takes
    # tokens 1 (0.731) and 3 (0.5).
    router.capacity_factor = 1.0
    assert router(x).token_index_EN.tolist() == [[2, 0], [1, 3]]


def test_renormalized_gates_sum_to_scale_per_chosen_token():
    S, B, E, D = 10, 2, 4, 8
    router = ExpertChoiceRouter(D, E, 2.0, gate="renormalized", gate_scale=2.5).double()
    routing = router(torch.randn(S, B, D, dtype=torch.double))
    total = torch.zeros(S * B, dtype=torch.double).index_add(
        0, routing.token_index_EN.reshape(-1), routing.gate_EN.reshape(-1))
    chosen = total > 0
    torch.testing.assert_close(total[chosen], torch.full_like(total[chosen], 2.5))


def test_per_sample_routing_is_batch_independent_and_micro_batch_is_not():
    torch.manual_seed(0)
    S, B, E, D = 16, 4, 4, 8
    x = torch.randn(S, B, D, dtype=torch.double)
    y = x.clone()
    y[:, 1:] = torch.randn(S, B - 1, D, dtype=torch.double) * 3  # other samples change
    per_sample = ec_layer(D, E, 2.0)
    torch.testing.assert_close(per_sample(x).output[:, 0], per_sample(y).output[:, 0],
                               rtol=0, atol=0)
    pooled = ec_layer(D, E, 2.0, pool="micro_batch")
    pooled.load_state_dict(per_sample.state_dict())
    assert not torch.allclose(pooled(x).output[:, 0], pooled(y).output[:, 0])


def test_group_pool_of_one_image_equals_per_sample():
    S, B, E, D = 8, 3, 4, 8
    x = torch.randn(S, B, D, dtype=torch.double)
    a = ec_layer(D, E, 2.0)
    b = ec_layer(D, E, 2.0, pool="group", group_size=S)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x).output, b(x).output, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="group_size"):
        ec_layer(D, E, 2.0, pool="group", group_size=5)(x)


def test_capacity_rounding_and_bounds():
    assert expert_capacity(256, 8, 2.0) == 64
    assert expert_capacity(10, 4, 1.5) == 4  # ceil(3.75)
    assert expert_capacity(10, 64, 0.01) == 1  # at least one token
    assert expert_capacity(10, 2, 8.0) == 10  # never more than the pool
    with pytest.raises(ConfigError, match="capacity_factor"):
        expert_capacity(10, 2, 0.0)


def test_token_choice_matches_loop_reference():
    torch.manual_seed(1)
    S, B, E, D, H, K = 12, 2, 4, 8, 16, 2
    layer = MoELayer(TokenChoiceRouter(D, E, K, 1.0), GroupedExperts(E, D, H)).double()
    x = torch.randn(S, B, D, dtype=torch.double)
    out = layer(x)
    C = layer.router.capacity(S)
    aux = 0.0
    for b in range(B):
        ref, ref_aux = token_choice_loop(x[:, b], layer.router.weight,
                                         expert_functions(layer.experts.w1, layer.experts.w2),
                                         K, C)
        torch.testing.assert_close(out.output[:, b], ref, rtol=0, atol=1e-12)
        aux += ref_aux / B
    torch.testing.assert_close(out.aux_loss, aux)


def test_token_choice_aux_loss_hand_computed():
    # Tokens with W_r = I; top-1 experts: 0, 1, 0, 0 -> f = (3/4, 1/4).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.5, 0.0]]).view(4, 1, 2)
    router = TokenChoiceRouter(2, 2, top_k=1, capacity_factor=1.0)  # C = 2: token 3 dropped
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731  softmax of (z, 0) = sigmoid(z)
    p0 = [sig(1), sig(-1), sig(2), sig(0.5)]
    mean_p0 = sum(p0) / 4
    expected = 2 * (0.75 * mean_p0 + 0.25 * (1 - mean_p0))
    routing = router(x)
    assert routing.aux_loss.item() == pytest.approx(expected, abs=1e-6)
    layer = MoELayer(router, GroupedExperts(2, 2, 4))
    assert layer(x).stats.experts_per_token.tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_invalid_moe_configs_name_the_field():
    with pytest.raises(ConfigError, match="moe.capacity_factor"):
        load_config(overrides=["moe.capacity_factor=0"])
    with pytest.raises(ConfigError, match="moe.pool"):
        load_config(overrides=["moe.pool=everything"])
    with pytest.raises(ConfigError, match="model.num_kv_heads"):
        load_config(overrides=["model.num_heads=4", "model.num_kv_heads=3"])
    with pytest.raises(ConfigError, match="moe.layer_capacity_factors"):
        MoEConfig(layer_capacity_factors=[2.0]).validate(num_layers=6)


def test_swiglu_experts_and_shared_expert(ctx):
    from megatron_ecdit.moe.layer import DenseFFN, build_ffn
    moe = MoEConfig(num_experts=4, activation="swiglu", shared_expert_size=16)
    layer = build_ffn(ctx, 8, 32, moe, capacity_factor=2.0)
    assert layer.experts.w1.shape == layer.experts.w3.shape == (4, 8, 32)
    assert isinstance(layer.shared_expert, DenseFFN)
    x = torch.randn(6, 2, 8)
    out = layer(x)
    # Shared expert adds on every token: output minus shared part is the routed part.
    routed = out.output - layer.shared_expert(x).output
    unrouted = out.stats.experts_per_token.t().reshape(-1) == 0
    assert torch.all(routed.reshape(-1, 8)[unrouted] == 0)
    out.output.sum().backward()
    assert layer.experts.w1.grad is not None and layer.shared_expert.fc1.linear.weight.grad is not None


def test_token_choice_aux_loss_reaches_the_router_from_inside_the_layer():
    """The gradient of `loss(output)` with the aux loss on the gradient path equals the
    gradient of `loss(output) + coeff * scale * aux_loss` taken the plain way."""
    torch.manual_seed(2)
    S, B, E, D, H = 8, 2, 4, 8, 16
    layer = MoELayer(TokenChoiceRouter(D, E, 2, 1.0), GroupedExperts(E, D, H),
                     aux_loss_coeff=0.3).double()
    set_aux_grad_scale(layer, 0.5)
    x = torch.randn(S, B, D, dtype=torch.double)
    out = layer(x)
    out.output.square().mean().backward()
    on_path = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    with torch.no_grad():
        assert out.stats.aux_loss == out.aux_loss
    layer.aux_loss_coeff = 0.0  # the plain way: the aux loss added to the loss by hand
    out = layer(x)
    (out.output.square().mean() + 0.3 * 0.5 * out.aux_loss).backward()
    assert layer.router.weight.grad.abs().max() > 0
    for name, p in layer.named_parameters():
        torch.testing.assert_close(on_path[name], p.grad, rtol=1e-12, atol=1e-14)
    # the aux term matters: without it the router's gradient differs
    layer.zero_grad()
    layer(x).output.square().mean().backward()
    assert not torch.allclose(layer.router.weight.grad, on_path["router.weight"])
