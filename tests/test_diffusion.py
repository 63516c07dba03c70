"""Rectified flow: noising, logit-normal timesteps, loss, ODE samplers and CFG.

The samplers are checked on velocity fields with closed-form solutions, so exactness (Euler on
constant fields and straight paths, Heun on fields linear in t) and convergence orders are
tested directly.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ecdit.diffusion import (
    add_noise,
    cfg_combine,
    classifier_free_guidance,
    flow_matching_loss,
    noise_from_seed,
    sample,
    sample_timesteps,
    timestep_grid,
)

# --------------------------------------------------------------------------------------------
# Training objective
# --------------------------------------------------------------------------------------------


def test_add_noise_exact_values():
    x0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    noise = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    x_t, target = add_noise(x0, noise, torch.tensor([0.25, 0.5]))
    assert torch.equal(x_t, torch.tensor([[3.25, 6.5], [16.5, 22.0]]))
    assert torch.equal(target, torch.tensor([[9.0, 18.0], [27.0, 36.0]]))


def test_add_noise_broadcasts_and_endpoints():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, generator=gen)
    noise = torch.randn(3, 4, 5, 5, generator=gen)
    x_t, target = add_noise(x0, noise, torch.tensor([0.0, 1.0, 0.3]))
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], noise[1])
    torch.testing.assert_close(x_t[2], 0.7 * x0[2] + 0.3 * noise[2])
    assert torch.equal(target, noise - x0)
    x_half, _ = add_noise(x0, noise, 0.5)  # scalar t
    torch.testing.assert_close(x_half, (x0 + noise) / 2)
    with pytest.raises(ValueError):
        add_noise(x0, noise, torch.tensor([0.1, 0.2]))


def test_flow_matching_loss_is_mse():
    target = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert flow_matching_loss(torch.zeros(2, 2), target).item() == 7.5
    assert flow_matching_loss(target, target).item() == 0.0


def test_logit_normal_moments():
    n = 200_000
    t = sample_timesteps(n, mean=0.5, std=1.3, generator=torch.Generator().manual_seed(0))
    assert t.shape == (n,) and t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()
    logit = torch.logit(t.double())
    assert abs(logit.mean().item() - 0.5) < 0.015
    assert abs(logit.std().item() - 1.3) < 0.015

    centred = sample_timesteps(n, 0.0, 1.0, generator=torch.Generator().manual_seed(1))
    assert abs(centred.mean().item() - 0.5) < 0.005
    again = sample_timesteps(n, 0.0, 1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(centred, again)


# --------------------------------------------------------------------------------------------
# Samplers on closed-form fields
# --------------------------------------------------------------------------------------------


def _x1(shape=(2, 3, 4, 4), seed=0):
    return noise_from_seed(shape, seed).double()


def test_shifted_timestep_grid():
    grid = timestep_grid(4, shift=3.0)
    expected = [1.0, 3 * 0.75 / (1 + 2 * 0.75), 3 * 0.5 / 2.0, 3 * 0.25 / 1.5, 0.0]
    assert grid.tolist() == pytest.approx(expected)
    assert timestep_grid(4, shift=1.0).tolist() == timestep_grid(4).tolist()
    with pytest.raises(ValueError, match="shift"):
        timestep_grid(4, shift=0.0)


def test_timestep_grid():
    grid = timestep_grid(4)
    assert grid.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        timestep_grid(0)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_constant_field_is_exact(method, steps):
    x1 = _x1()
    c = torch.linspace(-2, 2, x1[0].numel(), dtype=torch.float64).view(x1[0].shape)
    x0 = sample(lambda x, t: c.expand_as(x), x1, steps=steps, method=method)
    torch.testing.assert_close(x0, x1 - c, rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_field_linear_in_t(steps):
    """v = 2 t c: x_0 = x_1 - c. Heun (trapezoid) is exact; Euler overshoots by c / steps."""
    x1 = _x1()
    c = torch.full_like(x1[0], 0.7)

    def field(x, t):
        return 2 * t.view(-1, 1, 1, 1).to(x.dtype) * c

    # Tolerance: the model receives t in float32 (0.8 etc. are not exact in binary).
    heun = sample(field, x1, steps=steps, method="heun")
    torch.testing.assert_close(heun, x1 - c, rtol=0, atol=1e-6)
    euler = sample(field, x1, steps=steps, method="euler")
    torch.testing.assert_close(euler, x1 - (1 + 1 / steps) * c, rtol=0, atol=1e-6)


def test_convergence_orders_on_linear_ode():
    """v = a x: x_0 = x_1 exp(-a). Euler error halves per doubling, Heun error quarters."""
    a = 0.8
    x1 = _x1()
    exact = x1 * math.exp(-a)

    def err(method, steps):
        return (sample(lambda x, t: a * x, x1, steps=steps, method=method) - exact).abs().max()

    e_euler = [err("euler", n).item() for n in (8, 16, 32)]
    e_heun = [err("heun", n).item() for n in (8, 16, 32)]
    for coarse, fine in zip(e_euler, e_euler[1:]):
        assert coarse / fine == pytest.approx(2.0, abs=0.2)
    for coarse, fine in zip(e_heun, e_heun[1:]):
        assert 3.6 < coarse / fine < 4.4
    assert all(h < e / 10 for h, e in zip(e_heun, e_euler))


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_euler_is_exact_on_straight_paths(steps):
    """Point-mass data d: the ideal field (x - d) / t makes straight paths; Euler follows them."""
    x1 = _x1()
    d = torch.full_like(x1[0], -0.3)
    x0 = sample(lambda x, t: (x - d) / t.view(-1, 1, 1, 1).to(x.dtype), x1, steps=steps)
    torch.testing.assert_close(x0, d.expand_as(x1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,calls_per_step", [("euler", 1), ("heun", 2)])
def test_callback_and_number_of_evaluations(method, calls_per_step):
    x1 = noise_from_seed((2, 3), seed=5)
    seen, evaluations = [], []

    def field(x, t):
        assert t.shape == (2,) and t.dtype == torch.float32
        evaluations.append((t[0].item(), x.clone()))
        return -x

    sample(field, x1, steps=4, method=method,
           callback=lambda step, t, x: seen.append((step, t, x.clone())))
    assert [s for s, _, _ in seen] == [0, 1, 2, 3]
    assert [t for _, t, _ in seen] == [1.0, 0.75, 0.5, 0.25]
    assert len(evaluations) == 4 * calls_per_step
    # The first evaluation after callback(step, t, x) is at (x, t).
    for k, (_, t, x) in enumerate(seen):
        t_eval, x_eval = evaluations[k * calls_per_step]
        assert t_eval == t and torch.equal(x_eval, x)
    assert torch.equal(seen[0][2], x1)


def test_noise_from_seed_is_reproducible():
    a = noise_from_seed((2, 3, 4, 4), seed=7)
    assert torch.equal(a, noise_from_seed((2, 3, 4, 4), seed=7))
    assert not torch.equal(a, noise_from_seed((2, 3, 4, 4), seed=8))
    assert noise_from_seed((1, 2), 0, dtype=torch.float64).dtype == torch.float64


def test_noise_with_a_seed_per_image_does_not_depend_on_the_batch():
    batch = noise_from_seed((3, 3, 4, 4), seed=[4, 9, 2])
    for i, s in enumerate([4, 9, 2]):
        assert torch.equal(batch[i], noise_from_seed((1, 3, 4, 4), seed=s)[0])
        # as diffusers draws an image from each generator of a list
        assert torch.equal(batch[i:i + 1], torch.randn((1, 3, 4, 4),
                                                       generator=torch.Generator().manual_seed(s)))
    assert torch.equal(noise_from_seed((2, 3, 4, 4), seed=[2, 4])[0], batch[2])
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        noise_from_seed((3, 2), seed=[1, 2])


# --------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------


class ToyModel:
    """model(x, t, cond) = cond * x + t, with cond a (B, 1) tensor; records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append((x.shape[0], cond))
        return cond * x + t.view(-1, 1)


def test_cfg_scale_one_is_conditional_only():
    x1 = noise_from_seed((3, 5), seed=0)
    cond = torch.tensor([[1.0], [2.0], [-1.0]])
    model = ToyModel()
    guided = sample(model, x1, steps=5, method="heun", cfg_scale=1.0, cond=cond,
                    uncond=torch.full((3, 1), 123.0))
    assert all(batch == 3 and c is cond for batch, c in model.calls)  # uncond never evaluated
    plain = sample(lambda x, t: cond * x + t.view(-1, 1), x1, steps=5, method="heun")
    assert torch.equal(guided, plain)
    # uncond may be omitted at scale 1.
    assert torch.equal(sample(ToyModel(), x1, steps=5, method="heun", cond=cond), plain)


def test_cfg_formula_and_single_batched_call():
    x = noise_from_seed((3, 5), seed=1)
    t = torch.full((3,), 0.4)
    cond = torch.tensor([[1.0], [2.0], [-1.0]])
    uncond = torch.zeros(1, 1)  # batch 1: expanded to the batch
    model = ToyModel()
    v = classifier_free_guidance(model, cond, uncond, scale=3.0)(x, t)
    assert len(model.calls) == 1 and model.calls[0][0] == 6  # one call on [cond; uncond]
    v_c, v_u = cond * x + 0.4, torch.zeros_like(x) + 0.4
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u))
    torch.testing.assert_close(cfg_combine(v_c, v_u, 3.0), v)
    torch.testing.assert_close(cfg_combine(v_c, v_u, 0.0), v_u)

    # Through the sampler: one Euler step from t = 1 is x1 - v(x1, 1).
    x0 = sample(ToyModel(), x, steps=1, cfg_scale=3.0, cond=cond, uncond=uncond)
    torch.testing.assert_close(x0, x - (1.0 + 3.0 * cond * x))


def test_cfg_structured_conditioning():
    """(embeddings, mask) tuples and dicts are concatenated leaf by leaf."""
    emb_c, emb_u = torch.ones(2, 4, 3), torch.zeros(2, 4, 3)
    mask_c, mask_u = torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)
    seen = {}

    def model(x, t, cond):
        seen["cond"] = cond
        emb, mask = cond["emb"], cond["mask"]
        return x + (emb.sum((1, 2)) + mask.sum(1)).view(-1, 1)

    x = torch.zeros(2, 1)
    v = classifier_free_guidance(model, {"emb": emb_c, "mask": mask_c},
                                 {"emb": emb_u, "mask": mask_u}, scale=2.0)(x, torch.ones(2))
    assert seen["cond"]["emb"].shape == (4, 4, 3) and seen["cond"]["mask"].shape == (4, 4)
    torch.testing.assert_close(v, torch.full((2, 1), 2.0 * 16.0))  # v_u = 0, v_c = 12 + 4


def test_sampler_argument_errors():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="cfg_scale"):
        sample(lambda x, t: x, x, steps=2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="uncond"):
        sample(ToyModel(), x, steps=2, cfg_scale=2.0, cond=torch.ones(1, 1))
    with pytest.raises(ValueError, match="method"):
        sample(lambda x, t: x, x, steps=2, method="rk4")
