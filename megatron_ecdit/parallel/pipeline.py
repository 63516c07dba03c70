"""Running model chunks through megatron-core's pipeline schedules (1F1B, or interleaved).

`PipelineRunner.train_step` runs one optimizer step's forward and backward over micro-batches
and returns the mean loss on every rank of the pipeline; `PipelineRunner.predict` runs a
forward-only pass (sampling) and broadcasts the last stage's prediction to every stage, so all
stages step the sampler identically. Each stage receives the same inputs (timestep, text,
targets: every rank of a data-parallel replica draws the same batch); only hidden states cross
stages. Routing statistics are those of the blocks on this rank's stages.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import nn

Inputs = tuple  # (x_t, t, text, mask, keep_idx or None)


class PipelineRunner:
    def __init__(self, modules: list[nn.Module], seq_length: int):
        self.modules = modules
        self.seq_length = seq_length
        self.schedule = get_forward_backward_func()
        self.group = parallel_state.get_pipeline_model_parallel_group()
        self.last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
        # The interleaved schedule needs at least pp micro-batches, also to predict.
        self.min_microbatches = self.group.size() if len(modules) > 1 else 1
        self.routing: dict[int, Any] = {}

    def _run(self, micro: list[tuple[Inputs, Optional[torch.Tensor]]],
             loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
             forward_only: bool) -> list:
        self.routing = {}

        def forward_step(data_iterator, model):
            inputs, target = next(data_iterator)
            out = model(*inputs)
            self.routing.update(out.routing)
            if loss_fn is None:
                return out.prediction, None

            def loss_func(prediction):
                loss = loss_fn(prediction, target)
                return loss, {"loss": loss.detach().clone()}  # megatron divides loss in place
            return out.prediction, loss_func

        tokens = micro[0][0][4].shape[1] if micro[0][0][4] is not None else self.seq_length
        return self.schedule(
            forward_step_func=forward_step,
            data_iterator=[iter(micro) for _ in self.modules],
            model=self.modules if len(self.modules) > 1 else self.modules[0],
            num_microbatches=len(micro), seq_length=tokens,
            micro_batch_size=micro[0][0][0].shape[0], forward_only=forward_only)

    def train_step(self, micro: list[tuple[Inputs, torch.Tensor]],
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Forward and backward over the micro-batches; the mean loss, on every stage (each
        micro-batch's in `micro_losses` on the last stage, None on the others)."""
        out = self._run(micro, loss_fn, forward_only=False)
        self.micro_losses = torch.tensor([d["loss"].item() for d in out]) if out else None
        loss = torch.tensor(sum(d["loss"].item() for d in out) / len(micro) if out else 0.0)
        dist.broadcast(loss, self.last_rank, group=self.group)
        return loss

    @torch.no_grad()
    def predict(self, inputs: Inputs, shape: torch.Size) -> torch.Tensor:
        """A forward-only pass; the last stage's prediction, on every stage."""
        n = self.min_microbatches
        if shape[0] % n:
            raise ValueError(f"a batch of {shape[0]} does not split into the {n} micro-batches "
                             "the interleaved pipeline schedule needs")
        micro = [(tuple(None if x is None else x.chunk(n)[i] for x in inputs), None)
                 for i in range(n)]
        out = self._run(micro, None, forward_only=True)
        prediction = torch.cat(out) if out else torch.empty(shape, device=inputs[0].device)
        dist.broadcast(prediction, self.last_rank, group=self.group)
        return prediction
