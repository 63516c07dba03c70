"""Rectified flow (SD3 convention: t = 0 data, t = 1 noise): training targets and sampling.

`rectified_flow` holds what training needs (logit-normal timesteps, noising, the velocity
target and loss); `sampling` integrates a learned velocity field from noise back to data with
Euler or Heun steps and classifier-free guidance. Neither knows about the model: both take
tensors and callables, so they are tested on closed-form fields.
"""

from .rectified_flow import add_noise, flow_matching_loss, sample_timesteps
from .sampling import (
    cfg_combine,
    classifier_free_guidance,
    noise_from_seed,
    sample,
    timestep_grid,
)

__all__ = [
    "add_noise",
    "cfg_combine",
    "classifier_free_guidance",
    "flow_matching_loss",
    "noise_from_seed",
    "sample",
    "sample_timesteps",
    "timestep_grid",
]
