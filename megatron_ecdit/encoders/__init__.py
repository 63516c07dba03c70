"""Frozen encoders that turn captions and images into what the DiT consumes.

`TextEncoder` maps captions to per-token hidden states plus a padding mask; `build_vae` gives
an autoencoder that maps images in [-1, 1] to scaled latents and back (or the identity, for
pixel-space training). Both are frozen: they are never trained, never hold gradients, and
never download anything. Weights are read from local folders in safetensors format only;
pickled checkpoints (``*.bin``, ``*.pt``) are refused rather than unpickled.

The offline switches are set by the package (``megatron_ecdit/__init__.py``), before
``transformers``/``diffusers`` are first imported, so the Hugging Face libraries never reach
for the network. Every ``from_pretrained`` call
additionally passes ``local_files_only=True``, which holds even if another module imported
those libraries first.
"""

from .text import TextEncoder, default_text_encoder_path
from .vae import Autoencoder, DiffusersVAE, IdentityVAE, build_vae

__all__ = [
    "Autoencoder",
    "DiffusersVAE",
    "IdentityVAE",
    "TextEncoder",
    "build_vae",
    "default_text_encoder_path",
]
