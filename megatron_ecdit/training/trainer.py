"""The training job: data -> frozen encoders -> rectified-flow loss -> EC-DiT -> optimizer.

`train(cfg)` runs the whole job and writes to `cfg.train.output_dir`:
  metrics.jsonl    one JSON object per step (step, loss, lr, grad_norm, samples_per_s;
                   `skipped` on a non-finite step, training/nonfinite.py; and on log steps
                   per-MoE-block routing statistics and, under torchrun, the slowest and
                   fastest ranks' own time, training/stragglers.py)
  tb/              TensorBoard events of the same
  checkpoints/     sharded checkpoints, resumable at any layout (see checkpoint/distributed.py)
  samples.png      generated images for cfg.train.sample_prompts (EMA weights)
  compute_map.png  experts per token, per MoE block and timestep, over generated images

The loop knows nothing about the model's internals beyond its output dataclass; the frozen
encoders are used behind their interfaces; the optimizer is an `OptimizerBackend`
(parallel/backends/: one process, megatron-core DDP + distributed optimizer, or DeepSpeed ZeRO)
chosen by `build_backend` from the layout.
Under torchrun every rank trains its data-parallel share; rank 0 writes the outputs, with the
loss averaged over data-parallel ranks.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn
from tqdm.auto import tqdm

from megatron_ecdit.checkpoint import distributed as checkpoints
from megatron_ecdit.checkpoint.consolidated import DTYPES, load_into
from megatron_ecdit.checkpoint.exported import WeightsFolder
from megatron_ecdit.config import Config
from megatron_ecdit.data.bad_input import describe_counts
from megatron_ecdit.data.shards import BatchStream
from megatron_ecdit.data.synthetic import write_missing_synthetic_shards
from megatron_ecdit.diffusion.rectified_flow import add_noise, flow_matching_loss, sample_timesteps
from megatron_ecdit.diffusion.sampling import noise_from_seed, sample, timestep_grid
from megatron_ecdit.encoders.text import TextEncoder
from megatron_ecdit.encoders.vae import Autoencoder, build_vae
from megatron_ecdit.models.ecdit import ECDiT, stage_chunks
from megatron_ecdit.models.embedders import patchify
from megatron_ecdit.moe.layer import set_aux_grad_scale
from megatron_ecdit.parallel.backends import OptimizerBackend, build_backend
from megatron_ecdit.parallel.compile import apply_compile, eager_blocks
from megatron_ecdit.parallel.layout import ParallelLayout
from megatron_ecdit.parallel.setup import (data_parallel_rank_and_size, initialize_parallel,
                                           local_device, resolve_precision, world_size)
from megatron_ecdit.parallel.pipeline import PipelineRunner
from megatron_ecdit.parallel.sharding import check_replicas, initialize
from megatron_ecdit.training.nonfinite import (SkippedSteps, SkippedStepsError, guard,
                                               injected)
from megatron_ecdit.training.optim import EMA, learning_rate
from megatron_ecdit.training.preemption import StopRequest
from megatron_ecdit.training.stragglers import StepTimes, describe, placement
from megatron_ecdit.training.watchdog import Watchdog
from megatron_ecdit.training.visualize import save_compute_map, save_sample_grid


class Job:
    """Everything a run holds: frozen encoders, model, optimizer, data stream, RNG.

    `train=False` makes a job that only samples or converts weights (the tools): no optimizer
    and no EMA copy (its weights are what it samples), and no initial weights are drawn (the
    caller loads them), so it holds its share of the weights and the frozen encoders."""

    def __init__(self, cfg: Config, train: bool = True):
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        # refuses what cannot run
        self.layout = ParallelLayout.build(cfg, world_size(cfg.parallel.collective_timeout_s))
        self.ctx = ctx = initialize_parallel(self.layout)
        self.is_writer = dist.get_rank() == 0
        self.device = local_device()
        if cfg.train.precision == "auto":  # recorded resolved, in config.json and checkpoints
            cfg.train.precision = resolve_precision("auto", self.device)
            if self.is_writer:
                why = ("bf16 products are native here" if cfg.train.precision == "bf16" else
                       "this GPU has no bf16" if self.device.type == "cuda" else
                       "this CPU has no AVX-512 BF16 or AMX: it would emulate bf16 products, "
                       "far slower than fp32")
                print(f"train.precision=auto: {cfg.train.precision} ({why})")
        # Noise, timesteps and caption dropout differ per data-parallel rank, as the data does.
        dp_rank, _ = data_parallel_rank_and_size()
        self.generator = torch.Generator().manual_seed(cfg.train.seed + 1000003 * dp_rank)
        # Frozen encoders first: a missing folder fails here, before any training work.
        self.text_encoder = TextEncoder(cfg.text_encoder.path, cfg.text_encoder.tokenizer_path,
                                        cfg.text_encoder.max_length, cfg.text_encoder.cache_size,
                                        device=self.device)
        self.vae: Autoencoder = build_vae(cfg.vae.path, device=self.device)
        self._derive_model_inputs()
        self.data_state: Optional[dict[str, Any]] = None  # a resumed data position
        self.data: Optional[BatchStream] = None
        c = cfg.checkpoint
        self.checkpointer = checkpoints.Checkpointer(
            self.out / "checkpoints", keep_last=c.keep_last, async_save=c.async_save,
            optimizer_sharding=c.optimizer_sharding)
        self.pipeline: Optional[PipelineRunner] = None
        # Weights are drawn on the CPU, by parameter name from the seed (the same on any device
        # and layout), then moved. megatron-core's layers draw nothing of their own.
        model_ctx = dataclasses.replace(ctx, mp_config=dataclasses.replace(
            ctx.mp_config, perform_initialization=False)) if not train else ctx
        if self.layout.pp > 1:
            self.model = nn.ModuleList(self._pipeline_chunks(model_ctx))
        else:
            self.model = ECDiT(cfg.model, cfg.moe, model_ctx)
        if train:
            for chunk in self.chunks:
                initialize(chunk, cfg.train.seed, ctx)
                set_aux_grad_scale(chunk, 1.0 / cfg.train.num_microbatches)  # as the main loss
            check_replicas(self.chunks, ctx)
        # train.precision=bf16: bf16 parameters and activations (drawn in fp32, then rounded);
        # the backend keeps fp32 main weights, gradients and optimizer state.
        self.model.to(self.device, DTYPES[cfg.train.precision])
        if cfg.train.compile and train:
            for chunk in self.chunks:
                apply_compile(chunk)
        self.backend: OptimizerBackend = build_backend(self.layout, self.chunks, cfg, ctx,
                                                       train=train)
        if self.layout.pp > 1:
            self.pipeline = PipelineRunner(self.backend.modules, cfg.model.num_patches)
        self.ema: Optional[EMA] = (EMA(self.model, cfg.optim.ema_decay, self.backend.local)
                                   if train else None)
        self.uncond = self.text_encoder.encode([""])  # for caption dropout and guidance
        self.skips = SkippedSteps(cfg.train.max_skipped_steps)  # non-finite steps

    def _pipeline_chunks(self, ctx) -> list[ECDiT]:
        """This rank's model chunks (stages of blocks); the conditioning embedders replicated
        on every stage are drawn by name, so they start, and stay, identical."""
        return stage_chunks(self.cfg.model, self.cfg.moe, ctx, self.layout.pp, self.layout.vpp,
                            parallel_state.get_pipeline_model_parallel_rank())

    def _derive_model_inputs(self) -> None:
        """The model's input channels, size and text width follow the frozen encoders."""
        m, d = self.cfg.model, self.cfg.data
        derived = {"in_channels": self.vae.latent_channels,
                   "input_size": self.vae.latent_size(d.image_size),
                   "text_dim": self.text_encoder.dim}
        for key, value in derived.items():
            setattr(m, key, value)
        m.validate()

    # ---------------------------------------------------------------- checkpoints

    @property
    def chunks(self) -> list[nn.Module]:
        return list(self.model) if isinstance(self.model, nn.ModuleList) else [self.model]

    def checkpoint_parts(self) -> checkpoints.Parts:
        """What a checkpoint holds. The EMA goes in whole: under ZeRO-3 gathered from its
        partitions (collective), otherwise the average itself; a job without one (train=False)
        saves its weights as the EMA, in the EMA's fp32."""
        names = {}
        for v, chunk in enumerate(self.chunks):
            for name, _ in chunk.named_parameters():
                names[f"{v}.{name}" if self.pipeline is not None else name] = (v, name)
        params = dict(self.model.named_parameters())
        if self.ema is None:
            ema = {name: p.detach().float() for name, p in params.items()}
        else:
            ema = {name: self.backend.to_full(params[name], average)
                   for name, average in self.ema.shadow.items()}
        return checkpoints.Parts(self.chunks, ema, names, self.backend, self.rank_state)

    def rank_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "data": self.data_position()}

    def save(self, step: int, weights_only: bool = False) -> Path:
        # Only one copy of a replicated shard is written: every copy must still be the same.
        parts = self.checkpoint_parts()
        common = {"config": self.cfg.to_dict(), "layout": self.layout.describe(),
                  "skipped_steps": self.skips.total}
        with self.backend.gathered():
            check_replicas(self.chunks, self.ctx)
            return self.checkpointer.save(step, parts, common, weights_only=weights_only)

    def load_exported(self, weights: WeightsFolder) -> None:
        """This rank's slices of an export's weights, each read alone (consolidated.load_into);
        the EMA, if the job keeps one, starts equal to them."""
        with self.backend.gathered(modify=True):
            load_into(self.chunks, weights, self.ctx)
        self.backend.reload_model_params()
        if self.ema is not None:
            self.ema = EMA(self.model, self.cfg.optim.ema_decay, self.backend.local)

    def resume(self) -> int:
        """Load the checkpoint train.resume names (if any); returns the step to continue from."""
        choice = self.cfg.train.resume
        if choice == "never":
            return 0
        path = choice
        if choice == "auto":  # rank 0's view of `latest` decides for every rank
            found = checkpoints.latest_checkpoint(self.out / "checkpoints")
            box = [None if found is None else str(found)]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                return 0
            path = box[0]
        parts = self.checkpoint_parts()
        common, rank, notes = self.checkpointer.load(path, parts)
        params = dict(self.model.named_parameters())
        with torch.no_grad():  # back into the EMA's own storage (a no-op unless partitioned)
            for name, average in self.ema.shadow.items():
                average.copy_(self.backend.to_local(params[name], parts.ema[name]))
        if self.is_writer:
            what = "weights of" if common["weights_only"] else "resumed from"
            print(f"{what} {path} (step {common['step']}, saved at {common['layout']})")
            for note in notes:
                print(f"note: {note}")
        if common["weights_only"]:
            return 0
        self.skips.total = common.get("skipped_steps", 0)
        if rank is not None:
            self.generator.set_state(rank["generator"])
            self.data_state = rank["data"]
        return common["step"]

    # ---------------------------------------------------------------- data

    def data_position(self) -> dict[str, Any]:
        return self.data.state_dict() if self.data is not None else {}

    def batches(self) -> BatchStream:
        """This data-parallel rank's stream (raw or preprocessed shards), at the resumed
        position if there is one."""
        d = self.cfg.data
        if d.generate == "if_absent":
            if self.is_writer:
                written = write_missing_synthetic_shards(d.urls, d.samples_per_shard,
                                                         d.image_size, d.seed)
                if written:
                    print(f"wrote {len(written)} synthetic shards for {d.urls}")
            dist.barrier()
        rank, size = data_parallel_rank_and_size()
        side = self.vae.latent_size(d.image_size)
        self.data = BatchStream(d, self.cfg.train.micro_batch_size, dp_rank=rank, dp_size=size,
                                latent_shape=(self.vae.latent_channels, side, side),
                                text_shape=(self.text_encoder.max_length, self.text_encoder.dim))
        if self.data_state:
            try:
                self.data.load_state_dict(self.data_state)
            except ValueError as err:  # e.g. other shards or workers than the saved run's
                if self.is_writer:
                    print(f"note: the data stream restarts from its seed: {err}")
        return self.data

    def bad_input_summary(self) -> str:
        """Bad samples skipped so far, summed over data-parallel ranks (collective)."""
        counts = self.data.bad_counts()
        keys = sorted(counts)
        total = torch.tensor([counts[k] for k in keys], dtype=torch.int64)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return describe_counts(dict(zip(keys, total.tolist())))

    def prepare(self, batch: dict[str, Any]) -> tuple[tuple, torch.Tensor]:
        """Model inputs (x_t, t, text, mask, keep) and the velocity target for a batch."""
        cfg = self.cfg.diffusion
        g, dev = self.generator, self.device  # random draws come from the CPU generator
        with torch.no_grad():
            if "latent" in batch:  # preprocessed shards: the frozen encoders already ran
                x0 = batch["latent"].to(dev)
                drop = (torch.rand(x0.shape[0], generator=g) < cfg.caption_dropout).to(dev)
                empty_text, empty_mask = self.uncond
                text = torch.where(drop[:, None, None], empty_text, batch["text"].to(dev))
                mask = torch.where(drop[:, None], empty_mask, batch["text_mask"].to(dev))
            else:
                x0 = self.vae.encode(batch["image"].to(dev))
                drop = torch.rand(x0.shape[0], generator=g) < cfg.caption_dropout
                captions = ["" if dropped else c for c, dropped in zip(batch["caption"], drop)]
                text, mask = self.text_encoder.encode(captions)
            B = x0.shape[0]
            t = sample_timesteps(B, cfg.logit_mean, cfg.logit_std, generator=g).to(dev)
            noise = torch.randn(x0.shape, generator=g).to(dev)
            x_t, target = add_noise(x0, noise, t)
            keep = None
            if cfg.mask_ratio > 0:  # MaskDiT: the model sees, and is scored on, kept tokens only
                S = self.cfg.model.num_patches
                keep_n = max(1, round(S * (1 - cfg.mask_ratio)))
                keep = torch.rand(B, S, generator=g).argsort(dim=1)[:, :keep_n].sort(1).values
                keep = keep.to(dev)
                rows = patchify(target, self.cfg.model.patch_size)
                target = torch.gather(rows, 1, keep[..., None].expand(-1, -1, rows.shape[-1]))
        return (x_t, t, text, mask, keep), target

    def forward_backward(self, batches: list[dict[str, Any]], step: int
                         ) -> tuple[torch.Tensor, Optional[torch.Tensor], dict[int, Any]]:
        """Loss and gradients of one step's micro-batches (their mean); returns the detached
        loss, each micro-batch's (None on pipeline stages before the last) and the routing
        statistics of the last micro-batch. A non-finite loss makes the gradients non-finite
        (nonfinite.guard), and so the step skipped."""
        micro = [self.prepare(batch) for batch in batches]
        if data_parallel_rank_and_size()[0] == 0:
            for index in injected(self.cfg.train.inject_nonfinite, step):
                inputs, target = micro[index]
                micro[index] = inputs, target * math.nan
        if self.pipeline is not None:
            loss = self.pipeline.train_step(
                micro, lambda pred, tgt: guard(flow_matching_loss(pred, tgt)))
            return loss, self.pipeline.micro_losses, self.pipeline.routing
        total = torch.zeros((), device=self.device)
        losses = []
        for inputs, target in micro:
            out = self.backend.module(*inputs)
            loss = guard(flow_matching_loss(out.prediction, target))
            self.backend.backward(loss / len(micro))
            total += loss.detach() / len(micro)
            losses.append(loss.detach())
        return total, torch.stack(losses), out.routing

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: Sequence[int],
                 record_at: Optional[list[float]] = None):
        """Sample with EMA weights and CFG, image i from noise drawn from seeds[i] alone (so an
        image is a function of its prompt, seed and the settings, not of its batch); optionally
        record routing maps at timesteps. Under ZeRO-3 each block gathers its parameters as it
        runs, as in training."""
        self.model.eval()
        averaged = self.ema.applied(self.model) if self.ema is not None else nullcontext()
        try:
            with averaged, eager_blocks():  # no graphs for the sampler
                return self._sample(prompts, seeds, record_at)
        finally:
            self.model.train()

    def _sample(self, prompts: list[str], seeds: Sequence[int],
                record_at: Optional[list[float]]):
        cfg, m = self.cfg.diffusion, self.cfg.model
        text, mask = self.text_encoder.encode(prompts)
        uncond = tuple(u.expand(len(prompts), *u.shape[1:]) for u in self.uncond)
        evaluated = timestep_grid(cfg.sample_steps, cfg.sample_shift)[:-1]
        record_steps = {}  # sampling step -> its timestep, nearest to each requested one
        for t in record_at or []:
            step = int((evaluated - t).abs().argmin())
            record_steps[step] = float(evaluated[step])
        maps: dict[float, dict[int, torch.Tensor]] = {}
        state = {"t": None}

        def model_fn(x, t, cond):
            if self.pipeline is not None:
                prediction = self.pipeline.predict((x, t, *cond, None), x.shape)
                routing = self.pipeline.routing
            else:
                out = self.model(x, t, *cond)
                prediction, routing = out.prediction, out.routing
            if state["t"] is not None:
                maps[state["t"]] = {k: v.experts_per_token[:len(prompts)].clone()
                                    for k, v in routing.items()}
                state["t"] = None
            return prediction

        def callback(step, t, x):
            state["t"] = record_steps.get(step)

        noise = noise_from_seed((len(prompts), m.in_channels, m.input_size, m.input_size),
                                seeds, device=self.device)
        latents = sample(model_fn, noise, steps=cfg.sample_steps, method=cfg.sampler,
                         cfg_scale=cfg.cfg_scale, cond=(text, mask), uncond=uncond,
                         callback=callback, shift=cfg.sample_shift)
        return self.vae.decode(latents).cpu(), {
            t: {k: v.cpu() for k, v in layer_maps.items()} for t, layer_maps in maps.items()}


def fused_kernels_notice() -> str:
    """One line on which of megatron-core's optional fused paths this run has."""
    have = [name for name, module in (("apex", "apex"), ("Transformer Engine",
                                                          "transformer_engine"))
            if importlib.util.find_spec(module) is not None]
    if not have:
        return ("apex and Transformer Engine are not installed: megatron-core uses its local "
                "implementations (torch Adam, unfused gradient-norm and scaling kernels)")
    return (f"{' and '.join(have)} found: megatron-core uses their fused optimizer and "
            "multi-tensor kernels")


def routing_metrics(routing: dict[int, Any]) -> dict[str, float]:
    metrics = {}
    for block, stats in routing.items():
        metrics[f"routing/block{block}/mean_experts_per_token"] = \
            stats.mean_experts_per_token.item()
        metrics[f"routing/block{block}/unrouted_fraction"] = stats.unrouted_fraction.item()
        metrics[f"routing/block{block}/entropy"] = stats.router_entropy.item()
        if stats.aux_loss is not None:
            metrics[f"routing/block{block}/aux_loss"] = stats.aux_loss.item()
    return metrics


def write_pictures(job: Job, suffix: str = "") -> None:
    """Every rank samples (the model's collectives need them all); rank 0 draws. Prompt i is
    drawn with seed i, as `ecdit-sample` draws them at its default seed 0."""
    cfg = job.cfg.train
    images, maps = job.generate(cfg.sample_prompts, range(len(cfg.sample_prompts)),
                                cfg.compute_map_timesteps if cfg.compute_map_prompts else None)
    if not job.is_writer:
        return
    save_sample_grid(images, cfg.sample_prompts, job.out / f"samples{suffix}.png")
    if cfg.compute_map_prompts == 0:
        return
    if not (maps and next(iter(maps.values()))):
        print("compute map skipped: no MoE block among the blocks this rank holds")
    else:
        n = cfg.compute_map_prompts
        save_compute_map(images[:n], cfg.sample_prompts[:n],
                         {t: {k: v[:n] for k, v in layer_maps.items()}
                          for t, layer_maps in maps.items()},
                         job.cfg.moe.num_experts, job.out / f"compute_map{suffix}.png")


def _open_metrics(path: Path, start_step: int):
    """metrics.jsonl, continued after a resume: records past the resumed step are dropped."""
    kept = []
    if start_step and path.is_file():
        kept = [line for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= start_step]
    file = path.open("w")
    file.writelines(line + "\n" for line in kept)
    return file


FINISHED = "finished"  # marker in the output folder: the run reached train.steps


def finished_step(output_dir: str | Path) -> Optional[int]:
    """The step recorded by the `finished` marker of a run, or None."""
    marker = Path(output_dir) / FINISHED
    if not marker.is_file():
        return None
    try:
        return int(json.loads(marker.read_text())["step"])
    except (ValueError, KeyError, TypeError):
        return None


def train(cfg: Config) -> dict[str, float]:
    """Run the job described by cfg; returns a summary (first/last-100-step mean losses of the
    steps this run took, and `stopped` if it stopped early on a signal or time limit).

    A run that reaches train.steps writes OUTPUT_DIR/finished; a run started again on a folder
    whose marker already records train.steps (e.g. a requeued job) returns at once."""
    done = finished_step(cfg.train.output_dir)
    if done is not None and done >= cfg.train.steps:
        print(f"{cfg.train.output_dir} already finished at step {done}: nothing to do")
        return {"first_loss_mean": math.nan, "last_loss_mean": math.nan, "ratio": math.nan,
                "seconds": 0.0, "stopped": None, "already_finished": True}
    job = Job(cfg)
    out, tc = job.out, cfg.train
    start_step = job.resume()
    writer, metrics_file = None, None
    if job.is_writer:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        metrics_file = _open_metrics(out / "metrics.jsonl", start_step)
        if tc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / "tb"), purge_step=start_step + 1)
        params = sum(p.numel() for p in job.model.parameters())
        print(fused_kernels_notice())
        print(f"EC-DiT: {params / 1e6:.2f}M parameters (this rank), {cfg.model.num_layers} "
              f"blocks, {cfg.moe.num_experts} experts on blocks "
              f"{cfg.moe.moe_layer_indices(cfg.model.num_layers)}, {cfg.model.num_patches} "
              f"tokens per image; {tc.steps} steps of {tc.micro_batch_size} x "
              f"{tc.num_microbatches} micro-batches x DP{job.layout.dp}; "
              f"{job.layout.describe()}")
    losses: list[float] = []
    bar = tqdm(total=tc.steps, initial=start_step, mininterval=2.0, desc="train",
               disable=not (tc.progress and job.is_writer))
    start = time.perf_counter()
    batches = job.batches()
    if cfg.checkpoint.save_initial and start_step == 0:
        path = job.save(0)
        if job.is_writer:
            print(f"saved the initial weights: {path}")
    stop = StopRequest(tc.exit_duration_minutes)
    times = StepTimes(job.device)  # which rank is slow, on log steps
    if job.is_writer and len(set(times.hosts)) > 1:
        print(f"{len(times.hosts)} ranks on {len(set(times.hosts))} hosts: "
              f"{placement(times.hosts)}")
    stopped = None
    save_every = cfg.checkpoint.save_interval
    watchdog = Watchdog(tc.hang_timeout_s, dist.get_rank())  # a hung rank exits 75
    try:
        for step in range(start_step + 1, tc.steps + 1):
            watchdog.beat()  # a step started: progress
            step_start = time.perf_counter()
            step_batches = [next(batches) for _ in range(tc.num_microbatches)]
            job.backend.zero_grad()
            times.start()
            loss, micro_losses, routing = job.forward_backward(step_batches, step)
            times.stop()  # this rank's own work: the optimizer step's reductions wait for all
            lr = learning_rate(cfg.optim, tc.steps, step - 1)
            grad_norm = job.backend.step(lr)  # not finite: the backend skipped the update
            skipped = not math.isfinite(grad_norm)
            if skipped:
                try:
                    line = job.skips.skipped(step, micro_losses, tc.num_microbatches, job.device)
                except SkippedStepsError as err:
                    job.checkpointer.close()  # what was saved before is written and published
                    latest = checkpoints.latest_checkpoint(job.out / "checkpoints")
                    raise SkippedStepsError(f"{err}; the latest checkpoint is "
                                            f"{latest or 'none'}") from None
                if job.is_writer:
                    bar.write(line)
            else:
                job.skips.applied()
                job.ema.update(job.model)
            value = loss.clone()
            dist.all_reduce(value)  # every rank of a DP replica holds the same loss: average all
            # The loop's reads from the device, once the step is queued: this loss and the backend's
            # gradient norm every step, routing statistics and the ranks' times on log steps, the
            # micro-batches' losses on a skipped step. Nothing earlier reads
            # (tests/test_speed_levers.py).
            value = value.item() / dist.get_world_size()
            if not skipped:
                losses.append(value)
            log_step = step % tc.log_interval == 0 or step == tc.steps
            stragglers = times.report() if log_step and dist.get_world_size() > 1 else {}
            if job.is_writer:
                record = {"step": step, "loss": None if skipped else value, "lr": lr,
                          "grad_norm": None if skipped else grad_norm,
                          "samples_per_s": job.layout.dp * tc.num_microbatches
                          * tc.micro_batch_size / (time.perf_counter() - step_start)}
                if skipped:
                    record["skipped"] = True
                if log_step:
                    record.update(routing_metrics(routing))
                    record.update({f"straggler/{key}": val for key, val in stragglers.items()})
                    if writer is not None:
                        for key, val in record.items():
                            if (key != "step" and isinstance(val, (int, float))
                                    and not isinstance(val, bool)):
                                writer.add_scalar(key, val, step)
                    bar.write(f"step {step:>6}  loss {value:.4f}  lr {lr:.2e}  grad {grad_norm:.3f}"
                              f"  {record['samples_per_s']:.0f} samples/s"
                              + (f"; {describe(stragglers)}" if stragglers else ""))
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{value:.3f}")
                bar.update(1)
            job.checkpointer.finalize()  # publish the asynchronous saves done (collective)
            stopped = stop.should_stop()
            if stopped or step == tc.steps or (save_every and step % save_every == 0):
                path = job.save(step)
                watchdog.beat()
                if job.is_writer:
                    bar.write(f"{'saving' if job.checkpointer.queue else 'saved'} {path}")
            if stopped:
                break
            if tc.sample_interval and step % tc.sample_interval == 0 and step != tc.steps:
                write_pictures(job, suffix=f"_step{step}")
                watchdog.beat()
    finally:
        watchdog.close()
    bar.close()
    stop.close()
    job.checkpointer.close()  # the asynchronous saves written and published
    bad_input = job.bad_input_summary()
    if job.is_writer:
        print(f"data: {bad_input}")
    if stopped:
        if job.is_writer:
            print(f"stopped at step {step} ({stopped}); resume with train.resume=auto")
    else:
        write_pictures(job)
    n = min(100, len(losses))
    first, last = (sum(losses[:n]) / n, sum(losses[-n:]) / n) if n else (math.nan, math.nan)
    summary = {"first_loss_mean": first, "last_loss_mean": last, "ratio": last / first if n
               else math.nan, "seconds": time.perf_counter() - start, "stopped": stopped}
    if job.is_writer:
        metrics_file.close()
        if writer is not None:
            writer.close()
        if not stopped:
            (out / FINISHED).write_text(json.dumps({"step": tc.steps}) + "\n")
            print(f"done in {summary['seconds']:.0f}s: mean loss of the first {n} steps "
                  f"{summary['first_loss_mean']:.4f}, of the last {n} "
                  f"{summary['last_loss_mean']:.4f} (ratio {summary['ratio']:.2f}); "
                  f"outputs in {out}/")
    dist.barrier()  # leave together: a launcher may kill the others when one rank exits
    return summary
