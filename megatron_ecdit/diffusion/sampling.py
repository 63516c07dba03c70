"""Sampling a rectified flow: integrate dx/dt = v(x, t) from noise (t = 1) to data (t = 0).

`sample` steps over a uniform grid ``t_i = 1 - i / steps`` with Euler (first order, one model
call per step) or Heun (improved Euler / trapezoid, second order, two calls per step, on every
step including the last one, which ends at t = 0). Classifier-free guidance combines the
conditional and unconditional velocities as ``v = v_u + s (v_c - v_u)``; the model is called
once per evaluation on the batch ``[cond; uncond]`` when ``s != 1``, and only on the
conditional batch when ``s == 1``. `noise_from_seed` draws the starting noise on the CPU so a
seed gives the same images on any device, and with one seed per image the same image in any
batch.

What it deliberately doesn't do: stochastic samplers, non-uniform grids other than SD3's shift,
guidance intervals or rescaling, decoding latents, or anything about the model beyond calling
it: the caller passes the model as a function.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import Tensor

# v(x, t): x (B, ...) and t (B,) float32 -> velocity (B, ...).
VelocityFn = Callable[[Tensor, Tensor], Tensor]
# model(x, t, cond): like VelocityFn, with a batched conditioning (tensor / tuple / dict / None).
ModelFn = Callable[[Tensor, Tensor, Any], Tensor]
# callback(step, t, x): called before the step's first model evaluation, which is at (x, t).
Callback = Callable[[int, float, Tensor], None]


def timestep_grid(steps: int, shift: float = 1.0) -> Tensor:
    """The grid ``1 = t_0 > t_1 > ... > t_steps = 0``; float64 (steps + 1,).

    Uniform for shift = 1; otherwise SD3's shift t -> s t / (1 + (s - 1) t), which for s > 1
    spends more steps at high noise, where the global layout of an image is decided.
    """
    if steps < 1:
        raise ValueError(f"sampling needs steps >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    grid = torch.tensor([1.0 - i / steps for i in range(steps)] + [0.0], dtype=torch.float64)
    return shift * grid / (1 + (shift - 1) * grid)


def noise_from_seed(shape: tuple[int, ...] | torch.Size, seed: int | Sequence[int],
                    device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise of ``shape``, drawn on the CPU (device independent).

    With one seed the whole tensor comes from one generator. With a sequence of seeds, one per
    entry of dim 0 (one per image), each image's noise comes from its own generator, as
    diffusers draws from a list of generators: an image then depends on its seed only, never
    on the batch it is drawn in or its place there."""
    if isinstance(seed, int):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device, dtype)
    seeds = list(seed)
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]} images")
    return torch.cat([noise_from_seed((1, *shape[1:]), s) for s in seeds]).to(device, dtype)


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``v_u + scale * (v_c - v_u)`` (scale 1 = conditional)."""
    return v_uncond + scale * (v_cond - v_uncond)


def classifier_free_guidance(model_fn: ModelFn, cond: Any, uncond: Any,
                             scale: float) -> VelocityFn:
    """A guided velocity field v(x, t) from a conditional model.

    ``model_fn(x, t, cond)`` is the model on a batch; ``cond``/``uncond`` are its conditioning
    for the B samples (a tensor, or a tuple/list/dict of tensors or None, batched on dim 0;
    an uncond tensor with batch 1 is expanded to B). With ``scale == 1`` the field is the
    conditional model alone and ``uncond`` is never touched (it may be None). Otherwise each
    evaluation is one model call on ``x2 = [x; x]``, ``t2 = [t; t]`` and ``[cond; uncond]``
    (concatenated once, here), split into ``v_c, v_u`` and combined by `cfg_combine`.
    """
    if scale == 1.0:
        return lambda x, t: model_fn(x, t, cond)
    if uncond is None:
        raise ValueError(f"cfg_scale={scale} needs an unconditional input (uncond)")
    both = _concat(cond, uncond)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), both)  # (2B, ...)
        v_cond, v_uncond = out.chunk(2)  # (B, ...) each
        return cfg_combine(v_cond, v_uncond, scale)

    return guided


@torch.no_grad()
def sample(velocity_fn: VelocityFn | ModelFn, noise: Tensor, *, steps: int,
           method: Literal["euler", "heun"] = "euler", cfg_scale: float = 1.0,
           cond: Any = None, uncond: Any = None,
           callback: Optional[Callback] = None, shift: float = 1.0) -> Tensor:
    """Integrate from ``noise`` at t = 1 to t = 0; returns x_0 with the shape of ``noise``.

    Without ``cond``, ``velocity_fn(x, t)`` is the field itself and ``cfg_scale`` must be 1.
    With ``cond``, ``velocity_fn(x, t, cond)`` is a conditional model, guided with
    ``uncond`` at ``cfg_scale`` (see `classifier_free_guidance`). ``t`` is passed as a
    float32 (B,) tensor on ``noise.device``. Euler makes ``steps`` evaluations, Heun
    ``2 * steps``. ``callback(step, t, x)``, if given, is called before each step with the
    state at which the model is evaluated next (the first evaluation of that step).
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown sampling method {method!r}; use 'euler' or 'heun'")
    if cond is None:
        if cfg_scale != 1.0:
            raise ValueError(f"cfg_scale={cfg_scale} needs cond and uncond")
        field = velocity_fn
    else:
        field = classifier_free_guidance(velocity_fn, cond, uncond, cfg_scale)

    grid = timestep_grid(steps, shift).tolist()
    x = noise  # (B, ...)
    batch = x.shape[0]

    def at(t: float) -> Tensor:
        return torch.full((batch,), t, dtype=torch.float32, device=x.device)  # (B,)

    for i in range(steps):
        t, t_next = grid[i], grid[i + 1]
        dt = t_next - t  # < 0: integrating backwards in time
        if callback is not None:
            callback(i, t, x)
        v = field(x, at(t)).to(x.dtype)
        x_euler = x + dt * v
        if method == "euler":
            x = x_euler
        else:  # Heun: average the slopes at both ends of the step
            v_next = field(x_euler, at(t_next)).to(x.dtype)
            x = x + dt * 0.5 * (v + v_next)
    return x


def _concat(cond: Any, uncond: Any) -> Any:
    """``[cond; uncond]`` on dim 0 for a tensor or a tuple/list/dict of them (None stays None)."""
    if cond is None and uncond is None:
        return None
    if isinstance(cond, Tensor) and isinstance(uncond, Tensor):
        if uncond.shape[0] == 1 and cond.shape[0] != 1:
            uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
        return torch.cat([cond, uncond.to(cond.device)])
    if isinstance(cond, (tuple, list)) and isinstance(uncond, (tuple, list)) \
            and len(cond) == len(uncond):
        return type(cond)(_concat(c, u) for c, u in zip(cond, uncond))
    if isinstance(cond, dict) and isinstance(uncond, dict) and cond.keys() == uncond.keys():
        return {k: _concat(cond[k], uncond[k]) for k in cond}
    raise TypeError(f"cond and uncond must have the same structure of tensors; got "
                    f"{type(cond).__name__} and {type(uncond).__name__}")
