"""Pictures a run leaves behind: the sample grid and the paper's compute-allocation map.

The compute map shows, per image token, how many experts of an MoE layer chose it (0..E), at a
few sampling timesteps, over the final generated image: EC-DiT's heatmaps (more compute on
detail, less on background).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def to_uint8(images_BCHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] images -> (B, H, W, 3) uint8."""
    x = ((images_BCHW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_sample_grid(images_BCHW: torch.Tensor, captions: list[str], path: Path,
                     columns: int = 4) -> None:
    images = to_uint8(images_BCHW)
    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_compute_map(images_BCHW: torch.Tensor, captions: list[str],
                     maps: dict[float, dict[int, torch.Tensor]], num_experts: int,
                     path: Path) -> None:
    """maps[t][layer] = experts_per_token (B, S). One row per (prompt, MoE layer), one column
    per timestep, the generated image first."""
    images = to_uint8(images_BCHW)
    times = sorted(maps, reverse=True)
    layers = sorted(maps[times[0]])
    rows = [(b, layer) for b in range(len(images)) for layer in layers]
    cols = 1 + len(times)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols + 0.6, 2.1 * len(rows)),
                             squeeze=False)
    size = images.shape[1]
    last = None
    for r, (b, layer) in enumerate(rows):
        axes[r, 0].imshow(images[b], interpolation="nearest")
        axes[r, 0].set_title(f"{captions[b]}\nMoE block {layer}", fontsize=7)
        for c, t in enumerate(times, start=1):
            counts = maps[t][layer][b].float()
            grid = int(round(counts.numel() ** 0.5))
            heat = counts.view(grid, grid).cpu().numpy()
            ax = axes[r, c]
            ax.imshow(images[b].mean(-1), cmap="gray", interpolation="nearest", alpha=1.0)
            last = ax.imshow(heat, cmap="inferno", alpha=0.6, vmin=0, vmax=num_experts,
                             extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                             interpolation="nearest")
            ax.set_title(f"t = {t:.2f}  (mean {counts.mean():.2f})", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Experts choosing each token (compute allocated), per MoE block and timestep",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.93, 0.97))
    if last is not None:
        cax = fig.add_axes((0.94, 0.1, 0.015, 0.8))
        fig.colorbar(last, cax=cax, label="experts per token")
    fig.savefig(path, dpi=110)
    plt.close(fig)
