"""The TIDY discrepancy formulas, as pure functions on NumPy arrays.

Notation follows the paper (section 3): ``I0``/``T0`` are the CLIP image and caption embeddings,
``I_i``/``T_i`` those of object crop ``i`` and its phrase.

    D_g = |I0 - T0|                     (eq. 3)
    D_l = mean_i |I_i - T_i|            (eqs. 4-5; D_l = D_g when no object is grounded)
    D   = w1 * D_g + w2 * D_l           (eq. 6)

Embeddings are L2-normalised first when ``normalize`` is true, because CLIP is trained on cosine
similarity and raw projection norms vary from image to image.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tidy_detect.config import RepresentationConfig


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scale each vector on the last axis to unit length (zero vectors stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, eps)


def _prepare(x: np.ndarray, normalize: bool) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return l2_normalize(x) if normalize else x


def global_distance(i0: np.ndarray, t0: np.ndarray, *, normalize: bool = True) -> np.ndarray:
    """D_g = |I0 - T0| for one pair (d,) or a batch (N, d)."""
    return np.abs(_prepare(i0, normalize) - _prepare(t0, normalize))


def local_distance(local_images: np.ndarray, local_texts: np.ndarray, fallback: np.ndarray, *,
                   normalize: bool = True) -> tuple[np.ndarray, bool]:
    """D_l = mean_i |I_i - T_i| over one image's objects.

    Args:
        local_images, local_texts: (n, d) embeddings of the n grounded crops and their phrases.
        fallback: D_g of the same image, returned when n == 0.

    Returns:
        (D_l, used_fallback).
    """
    local_images = np.asarray(local_images, dtype=np.float32).reshape(-1, np.shape(fallback)[-1])
    local_texts = np.asarray(local_texts, dtype=np.float32).reshape(local_images.shape)
    if local_images.shape[0] == 0:
        return np.asarray(fallback, dtype=np.float32), True
    diffs = np.abs(_prepare(local_images, normalize) - _prepare(local_texts, normalize))
    return diffs.mean(axis=0), False


def combine(d_global: np.ndarray, d_local: np.ndarray, w1: float = 1.0, w2: float = 1.0) -> np.ndarray:
    """D = w1 * D_g + w2 * D_l."""
    return w1 * np.asarray(d_global, dtype=np.float32) + w2 * np.asarray(d_local, dtype=np.float32)


def cosine_discrepancy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cos(a, b) on the last axis: 0 when aligned, up to 2 when opposite."""
    return 1.0 - np.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def batch_local_distance(local_images: Sequence[np.ndarray], local_texts: Sequence[np.ndarray],
                         d_global: np.ndarray, *, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """D_l for N images at once; image k has ``len(local_images[k])`` objects (possibly 0).

    Returns:
        (D_l of shape (N, d), used_fallback of shape (N,) bool).
    """
    d_global = np.asarray(d_global, dtype=np.float32)
    n, dim = d_global.shape
    counts = np.array([len(x) for x in local_images], dtype=np.int64)
    if len(counts) != n or len(local_texts) != n:
        raise ValueError(f"expected {n} images' objects, got {len(counts)} images and {len(local_texts)} texts")
    result = d_global.copy()
    has = counts > 0
    if has.any():
        flat_i = np.concatenate([np.asarray(x, dtype=np.float32).reshape(-1, dim) for x in local_images])
        flat_t = np.concatenate([np.asarray(x, dtype=np.float32).reshape(-1, dim) for x in local_texts])
        if flat_i.shape != flat_t.shape:
            raise ValueError(f"local images {flat_i.shape} and texts {flat_t.shape} differ in shape")
        diffs = np.abs(_prepare(flat_i, normalize) - _prepare(flat_t, normalize))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[has]
        sums = np.add.reduceat(diffs, starts, axis=0)
        result[has] = sums / counts[has, None]
    return result, ~has


def representation(config: RepresentationConfig, global_image: np.ndarray, global_text: np.ndarray,
                   local_images: Sequence[np.ndarray], local_texts: Sequence[np.ndarray]) -> np.ndarray:
    """The head's input for a batch of N images, shape (N, d).

    ``image`` gives I0 and ``text`` gives T0 (normalised when ``config.normalize``); ``global``,
    ``local`` and ``both`` give D_g, D_l and w1·D_g + w2·D_l.
    """
    global_image = np.asarray(global_image, dtype=np.float32)
    global_text = np.asarray(global_text, dtype=np.float32)
    if global_image.ndim != 2 or global_image.shape != global_text.shape:
        raise ValueError(f"global embeddings must both be (N, d), got {global_image.shape} and {global_text.shape}")
    if config.kind == "image":
        return _prepare(global_image, config.normalize)
    if config.kind == "text":
        return _prepare(global_text, config.normalize)
    d_global = global_distance(global_image, global_text, normalize=config.normalize)
    if config.kind == "global":
        return d_global
    d_local, _ = batch_local_distance(local_images, local_texts, d_global, normalize=config.normalize)
    if config.kind == "local":
        return d_local
    return combine(d_global, d_local, config.w1, config.w2)
