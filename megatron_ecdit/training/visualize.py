"""Pictures a run leaves behind: the sample grid and the paper's compute-allocation map.

The compute map shows, per image token, how many experts of an MoE layer chose it (0..E), at a
few sampling timesteps, beside the final generated image with its objects outlined: EC-DiT's
heatmaps (more compute on detail, less on background).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_ecdit.evaluation.geneval import color_map  # noqa: E402


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
    """maps[t][layer] = experts_per_token (B, S). One row per (prompt, MoE layer): the generated
    image, then the map at each timestep beside it (not blended over it), with the objects the
    GenEval-style detector finds outlined in cyan and the mean on objects against background
    in each title. The colour scale runs over the values that occur."""
    images = to_uint8(images_BCHW)
    times = sorted(maps, reverse=True)
    layers = sorted(maps[times[0]])
    rows = [(b, layer) for b in range(len(images)) for layer in layers]
    cols = 1 + len(times)
    top = max(1.0, max(float(m[layer].max()) for m in maps.values() for layer in m))
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols + 0.6, 2.3 * len(rows)),
                             squeeze=False)
    size = images.shape[1]
    last = None
    for r, (b, layer) in enumerate(rows):
        objects = color_map(images[b]) > 0  # (H, W) pixels of any palette colour
        axes[r, 0].imshow(images[b], interpolation="nearest")
        axes[r, 0].set_title(f"{captions[b]}\nMoE block {layer}", fontsize=7)
        for c, t in enumerate(times, start=1):
            counts = maps[t][layer][b].float()
            grid = int(round(counts.numel() ** 0.5))
            heat = counts.view(grid, grid).cpu().numpy()
            ax = axes[r, c]
            last = ax.imshow(heat, cmap="viridis", vmin=0, vmax=top,
                             extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                             interpolation="nearest")
            title = f"t = {t:.2f}"
            if objects.any() and not objects.all():
                ax.contour(objects, levels=[0.5], colors="cyan", linewidths=0.8)
                per_pixel = np.kron(heat, np.ones((size // grid, size // grid)))
                title += (f"\nobjects {per_pixel[objects].mean():.2f}, "
                          f"background {per_pixel[~objects].mean():.2f}")
            ax.set_title(title, fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"Experts choosing each token (of {num_experts}), per MoE block and timestep; "
                 "cyan: detected objects", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.92, 0.97))
    if last is not None:
        cax = fig.add_axes((0.93, 0.1, 0.015, 0.8))
        fig.colorbar(last, cax=cax, label="experts per token")
    fig.savefig(path, dpi=110)
    plt.close(fig)
