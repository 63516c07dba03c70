"""The backend of a job that only samples or converts weights (the tools): no optimizer.

It holds no gradient buffers, main weights or optimizer state, so such a job's memory is its
share of the weights (and the frozen encoders). Every parameter is whole on its ranks. Under
pipelining each chunk is wrapped so that megatron-core's schedules find the `config` they read
(DDP's wrapper carries it in training).
"""

from __future__ import annotations

from typing import Optional

from megatron.core.transformer import TransformerConfig
from torch import nn

from megatron_ecdit.parallel.backends import WholeParameters


class Scheduled(nn.Module):
    """A model chunk with the megatron-core config a pipeline schedule reads."""

    def __init__(self, chunk: nn.Module, config: TransformerConfig):
        super().__init__()
        self.module = chunk
        self.config = config

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class NoOptimizer(WholeParameters):
    checkpoint_format = "none"

    def __init__(self, chunks: list[nn.Module], config: Optional[TransformerConfig] = None):
        """`config`: megatron-core's, for pipeline schedules; None without pipelining."""
        self.modules = [Scheduled(c, config) for c in chunks] if config else list(chunks)
        self.module = self.modules[0]

    def _refuse(self, *args, **kwargs):
        raise RuntimeError("this job was built without an optimizer (Job(cfg, train=False)): "
                           "it samples and converts, it does not train")

    zero_grad = backward = step = sharded_state_dict = load_state_dict = _refuse

    def reload_model_params(self) -> None:
        """Nothing keeps a copy of the weights."""
