"""CLIP image and text encoders: projected embeddings in CLIP's joint space.

Any Hugging Face CLIP checkpoint works (``openai/clip-vit-large-patch14`` is the paper's). Images
arrive as PIL images; the global view is prepared by :mod:`tidy_detect.views` (the
benchmark's native-resolution centre crop), object crops by CLIP's own processor (resize + crop).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
from PIL import Image

from tidy_detect.views import center_crop, to_normalized_array
from tidy_detect.models.optimize import (fold_quick_gelu, fuse_linear_activations, maybe_compile, reuse_freed_memory,
                                         speedups_enabled)
from tidy_detect.models.loading import load_pretrained, revision_of, torch_dtype, weights_fingerprint
from tidy_detect.models.tiny import has_random_weights


class ClipEncoder:
    """Encode images and texts with one CLIP model; one capability per method.

    Args:
        source: hub id or local folder of a CLIP checkpoint.
        device, dtype: where and in which precision the model runs ("cpu", "bfloat16", ...).
        global_view: "center-crop" (native-resolution centre crop, the benchmark protocol) or
            "clip" (CLIP's own resize + crop) for :meth:`encode_global`.
        view_size: side of the global centre crop; ``None`` means CLIP's input size.
        max_batch: largest number of images or texts sent through the model at once.
        cache_size: text embeddings kept (captions and phrases repeat across images); 0 disables the cache.
        optimize: fold QuickGELU into the weights and fuse each MLP's first matmul with its activation
            (same function, faster; see models.optimize); ``TIDY_DETECT_SPEEDUPS=off`` overrides it.
        compile: torch.compile the vision tower (pays off on long runs; the first batch compiles).
        components: (model, processor) already built, instead of loading ``source``.
    """

    def __init__(self, source: str, *, device: str = "cpu", dtype: str = "float32",
                 global_view: str = "center-crop", view_size: int | None = None,
                 max_batch: int = 64, cache_size: int = 65536, optimize: bool = True, compile: bool = False,
                 components: tuple[Any, Any] | None = None) -> None:
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.source = source
        self.device = device
        self.dtype = dtype
        if components is None:
            self.processor = load_pretrained(CLIPProcessor, source, what="CLIP model", option="--clip")
            # Loaded in float32 whatever dtype runs: QuickGELU folding then rounds the scaled
            # weights once, in the cast below (CLIP is small enough for the float32 copy).
            model = load_pretrained(CLIPModel, source, what="CLIP model", option="--clip", dtype=torch.float32)
        else:  # an in-memory model (benchmarks build real-size architectures with random weights)
            model, self.processor = components
        self.fingerprint = weights_fingerprint(model)
        optimize = speedups_enabled(optimize)  # TIDY_DETECT_SPEEDUPS=off turns them off whatever was asked
        self.optimize = optimize
        if optimize:
            fold_quick_gelu(model)  # before the dtype cast, so the scaled weights round once
        model.requires_grad_(False)  # inference only: no parameter ever needs a gradient
        self.model = model.to(device=device, dtype=torch_dtype(dtype)).eval()
        if optimize and not compile:  # inductor does its own fusing
            fuse_linear_activations(self.model)
        if optimize:
            reuse_freed_memory()
        self.model.vision_model = maybe_compile(self.model.vision_model, compile)
        config = self.model.config
        self.dim = int(config.projection_dim)
        self.image_size = int(config.vision_config.image_size)
        self.global_view = global_view
        self.view_size = int(view_size or self.image_size)
        self.max_text_length = int(config.text_config.max_position_embeddings)
        image_processor = self.processor.image_processor
        self.mean = list(image_processor.image_mean)
        self.std = list(image_processor.image_std)
        self.max_batch = max_batch
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self.cache_hits = 0
        self.cache_misses = 0

    def describe(self) -> dict[str, Any]:
        """What a store records about this model and view (``random_weights``: a make-tiny or
        benchmark model, whose scores mean nothing; recorded, not fingerprinted)."""
        return {
            "source": self.source,
            "model_type": "clip",
            "revision": revision_of(self.model),
            "weights": self.fingerprint,
            "random_weights": has_random_weights(self.model, self.source),
            "dim": self.dim,
            "image_size": self.image_size,
            "dtype": self.dtype,
            "global_view": self.global_view,
            "view_size": self.view_size,
            "mean": self.mean,
            "std": self.std,
        }

    # -- preprocess ----------------------------------------------------------------------------

    def global_pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, 3, S, S) model input for the global view of each image."""
        if self.global_view == "center-crop":
            return to_normalized_array([center_crop(im, self.view_size) for im in images], self.mean, self.std)
        return self.crop_pixels(images)

    def crop_pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, 3, S, S) model input for object crops: CLIP's own resize and centre crop."""
        if not images:
            return np.zeros((0, 3, self.image_size, self.image_size), dtype=np.float32)
        return np.asarray(self.processor.image_processor(images=list(images), return_tensors="np")["pixel_values"],
                          dtype=np.float32)

    # -- forward ----------------------------------------------------------------------------------

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Projected image embeddings (N, dim), float32, not normalised."""
        import torch

        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        interpolate = pixels.shape[-1] != self.image_size
        out = []
        with torch.inference_mode():
            for start in range(0, len(pixels), self.max_batch):
                chunk = torch.from_numpy(pixels[start:start + self.max_batch]).to(
                    self.device, dtype=torch_dtype(self.dtype))
                kwargs = {"interpolate_pos_encoding": True} if interpolate else {}
                features = self.model.get_image_features(pixel_values=chunk, **kwargs).pooler_output
                out.append(features.float().cpu().numpy())
        return np.concatenate(out)

    def encode_global(self, images: Sequence[Image.Image]) -> np.ndarray:
        """I0 for each image (global view)."""
        return self.encode_pixels(self.global_pixels(images))

    def encode_crops(self, images: Sequence[Image.Image]) -> np.ndarray:
        """I_i for each crop."""
        return self.encode_pixels(self.crop_pixels(images))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Projected text embeddings (N, dim), float32; repeated texts come from a cache."""
        import torch

        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        self.cache_hits += len(texts) - len(missing)
        self.cache_misses += len(missing)
        fresh: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            for start in range(0, len(missing), self.max_batch):
                chunk = missing[start:start + self.max_batch]
                tokens = self.processor.tokenizer(chunk, padding=True, truncation=True,
                                                  max_length=self.max_text_length, return_tensors="pt")
                tokens = {k: v.to(self.device) for k, v in tokens.items()}
                features = self.model.get_text_features(**tokens).pooler_output.float().cpu().numpy()
                fresh.update(zip(chunk, features))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        result = np.stack([fresh[t] if t in fresh else self._cache[t] for t in texts])
        for text, vector in fresh.items():
            self._remember(text, vector)
        return result

    def _remember(self, text: str, vector: np.ndarray) -> None:
        if self._cache_size <= 0:
            return
        self._cache[text] = vector
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

