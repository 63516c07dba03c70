"""Frozen autoencoder: images in [-1, 1] <-> latents the DiT is trained on.

`Autoencoder` is the one interface the trainer sees: ``encode(images) -> latents`` already
shifted and scaled, ``decode(latents) -> images``, and the attributes ``latent_channels`` and
``downsample`` (spatial factor). `IdentityVAE` trains in pixel space (latents = images);
`DiffusersVAE` wraps a local ``diffusers.AutoencoderKL`` folder with any latent channel count
(4 for SD, 16 for SD3/Flux, 8 as in the paper). `build_vae(path)` picks one.

What it deliberately doesn't do: sample from the posterior (encode returns its mean, so the
latents of an image are deterministic and can be cached), apply per-channel
``latents_mean``/``latents_std`` normalisation (only the scalar ``shift_factor`` and
``scaling_factor`` of the config), clamp decoded images, tile or slice large inputs, train,
or download anything. Weights are read from safetensors only, never unpickled.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path


import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402


class Autoencoder(nn.Module):
    """Interface of a frozen autoencoder. Always in eval mode; never holds gradients.

    Attributes:
        latent_channels: C of the latents.
        downsample: spatial factor; an (H, W) image gives (H // downsample, W // downsample).
    """

    latent_channels: int
    downsample: int

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, C, H/f, W/f) scaled latents."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) scaled latents -> (B, 3, h*f, w*f) images, roughly in [-1, 1]."""
        raise NotImplementedError

    def latent_size(self, image_size: int) -> int:
        """Side of the latent of a square ``image_size`` image; raises if not divisible."""
        if image_size % self.downsample:
            raise ValueError(f"image size {image_size} is not divisible by the autoencoder's "
                             f"downsampling factor {self.downsample}")
        return image_size // self.downsample

    def train(self, mode: bool = True) -> "Autoencoder":
        """Frozen: stays in eval mode whatever ``mode`` is."""
        return super().train(False)

    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % self.downsample or images.shape[-1] % self.downsample:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the "
                             f"autoencoder's downsampling factor {self.downsample}")


class IdentityVAE(Autoencoder):
    """Pixel space: latents are the images themselves (3 channels, downsample 1)."""

    latent_channels = 3
    downsample = 1

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        self._check_images(images)
        return images

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return latents


class DiffusersVAE(Autoencoder):
    """A frozen ``diffusers.AutoencoderKL`` read from a local folder.

    ``path`` is the autoencoder folder (``config.json`` + ``*.safetensors``) or a pipeline
    folder with a ``vae/`` subfolder. Latents are ``(mode(q(z|x)) - shift) * scale`` with
    ``scale = config.scaling_factor`` and ``shift = config.shift_factor`` (None -> 0); decode
    inverts that before running the decoder. Runs in float32.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        super().__init__()
        folder = _resolve_vae_folder(Path(path))
        from diffusers import AutoencoderKL  # deferred: pixel-space runs never import diffusers

        self.path = folder
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True,
                                            use_safetensors=True, torch_dtype=torch.float32)
        self._setup(vae.to(device))

    @classmethod
    def from_model(cls, vae: nn.Module) -> "DiffusersVAE":
        """Wrap an AutoencoderKL already loaded (a diffusers pipeline's component): the same
        scaling and shift as the training job applies."""
        self = cls.__new__(cls)
        Autoencoder.__init__(self)
        self.path = Path(str(getattr(vae.config, "_name_or_path", "")))
        self._setup(vae)
        return self

    def _setup(self, vae: nn.Module) -> None:
        self.vae = vae.requires_grad_(False).eval()
        config = self.vae.config
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.scaling_factor = float(config.scaling_factor)
        shift = getattr(config, "shift_factor", None)
        self.shift_factor = 0.0 if shift is None else float(shift)
        if (getattr(config, "latents_mean", None) is not None
                or getattr(config, "latents_std", None) is not None):
            warnings.warn(f"VAE in {self.path} defines per-channel latents_mean/latents_std; "
                          f"only shift_factor and scaling_factor are applied", stacklevel=2)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        self._check_images(images)
        x = images.to(self.device, torch.float32)  # (B, 3, H, W)
        z = self.vae.encode(x).latent_dist.mode()  # (B, C, H/f, W/f): posterior mean
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample  # (B, 3, h*f, w*f)


def build_vae(path: str | os.PathLike | None, device: str | torch.device = "cpu") -> Autoencoder:
    """`IdentityVAE` when ``path`` is None (pixel space), else a `DiffusersVAE` of ``path``.

    Raises FileNotFoundError, naming the folder, when it or its config/weights are missing.
    """
    if path is None:
        return IdentityVAE().to(device)
    return DiffusersVAE(path, device=device)


def _resolve_vae_folder(folder: Path) -> Path:
    what = "VAE folder (vae.path)"
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} not found: {folder}. Expected a local diffusers "
                                f"AutoencoderKL folder with config.json and *.safetensors "
                                f"weights; nothing is downloaded at run time")
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"  # a pipeline folder: use its autoencoder
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what} {folder} has no config.json")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
        extra = (f" (found pickled {', '.join(pickled)}, which is never loaded: convert it to "
                 f"safetensors)" if pickled else "")
        raise FileNotFoundError(f"{what} {folder} has no *.safetensors weights{extra}")
    return folder
