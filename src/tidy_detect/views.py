"""What CLIP sees of an image: the global view and the object crops. Pure image operations.

The global view follows the UniFD/CNNDetection benchmark protocol: a centre crop of ``size`` pixels
at the image's native resolution (no resize, so generator up-sampling traces survive), padded with
black when the image is smaller, as torchvision's ``CenterCrop`` does.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Centre crop ``size`` x ``size`` without resizing; pad with zeros where the image is smaller.

    Offsets match torchvision's ``CenterCrop`` so features compare with the benchmark code:
    padding ``(size - w) // 2`` on the left/top (the odd pixel goes right/bottom), and a crop
    origin of ``round((w - size) / 2)``.
    """
    width, height = image.size
    if width < size or height < size:
        pad_w, pad_h = max(size - width, 0), max(size - height, 0)
        canvas = Image.new("RGB", (width + pad_w, height + pad_h), (0, 0, 0))
        canvas.paste(image, (pad_w // 2, pad_h // 2))
        image, (width, height) = canvas, canvas.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_normalized_array(images: Sequence[Image.Image], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Stack same-size RGB images into (N, 3, H, W) float32, scaled to [0, 1] then standardised."""
    batch = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    batch = (batch - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def clamp_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Round a float box [x0, y0, x1, y1] outwards to pixels inside the image, at least 1x1."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    left = min(max(int(math.floor(x0)), 0), width - 1)
    top = min(max(int(math.floor(y0)), 0), height - 1)
    right = max(min(int(math.ceil(x1)), width), left + 1)
    bottom = max(min(int(math.ceil(y1)), height), top + 1)
    return left, top, right, bottom


def crop_box(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """The region of ``box`` (original pixel coordinates), clamped to the image."""
    return image.crop(clamp_box(box, image.width, image.height))
