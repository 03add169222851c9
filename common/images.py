"""Writing images in [-1, 1] as PNG files and grids (Pillow; no torchvision)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    array = ((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    return array.transpose(0, 2, 3, 1)


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images into one (rows*(H+pad)+pad, ..., C) uint8 array."""
    tiles = to_uint8(images)
    n, h, w, c = tiles.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + k * (w + pad) : pad + k * (w + pad) + w,
        ] = tiles[i]
    return grid


def save_grid(images: Tensor, path: Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a grid PNG; `scale` enlarges small images with nearest-neighbour."""
    img = _pil(make_grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_pngs(images: Tensor, out_dir: Path, prefix: str = "sample") -> list[Path]:
    """Write one PNG per image; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, tile in enumerate(to_uint8(images)):
        path = out_dir / f"{prefix}-{i:05d}.png"
        _pil(tile).save(path)
        paths.append(path)
    return paths
