"""CLIP image and text encoders: projected embeddings in CLIP's joint space.

Any Hugging Face CLIP checkpoint works (``openai/clip-vit-large-patch14`` is the paper's). Images
arrive as PIL images; the global view is prepared by :mod:`tidy_detect.views` (the
benchmark's native-resolution centre crop), object crops by CLIP's own processor (resize + crop).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from tidy_detect.views import center_crop, to_normalized_array
from tidy_detect.models.device import GraphedCall, is_cuda, prefer_sdpa, run_guarded
from tidy_detect.models.memory import StageMemory, clip_image, clip_text
from tidy_detect.models.optimize import (fold_quick_gelu, fuse_linear_activations, maybe_compile, reuse_freed_memory,
                                         runs_on, speedups_enabled)
from tidy_detect.models.loading import load_pretrained, revision_of, torch_dtype, weights_fingerprint
from tidy_detect.models.tiny import has_random_weights

MapFn = Callable[..., Any]  # map(fn, items) run in worker threads (ThreadPoolExecutor.map)


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
            (same function, faster on CPUs; see models.optimize, which decides per device);
            ``TIDY_DETECT_SPEEDUPS=off`` overrides it.
        compile: torch.compile the vision tower (pays off on long runs; the first batch compiles).
        cuda_graphs: replay the image tower from CUDA graphs, one per padded batch size (CUDA only;
            see :class:`~tidy_detect.models.device.GraphedCall`).
        components: (model, processor) already built, instead of loading ``source``.

    On a CUDA device the global view travels as 8-bit pixels and is scaled and normalised on the
    device (the same float32 operations as :func:`~tidy_detect.views.to_normalized_array`, so
    the same values), attention runs through SDPA, and each pass is one host-to-device copy.

    Raises:
        ModelLoadError: the checkpoint cannot be loaded.
        ConfigError: ``cuda_graphs`` on a device that is not CUDA.
    """

    def __init__(self, source: str, *, device: str = "cpu", dtype: str = "float32",
                 global_view: str = "center-crop", view_size: int | None = None,
                 max_batch: int = 64, cache_size: int = 65536, optimize: bool = True, compile: bool = False,
                 cuda_graphs: bool = False, components: tuple[Any, Any] | None = None) -> None:
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
        if optimize and runs_on("quick-gelu-folding", device):
            fold_quick_gelu(model)  # before the dtype cast, so the scaled weights round once
        model.requires_grad_(False)  # inference only: no parameter ever needs a gradient
        self.model = model.to(device=device, dtype=torch_dtype(dtype)).eval()
        self.attention = prefer_sdpa(self.model) if is_cuda(device) else getattr(
            self.model.config, "_attn_implementation", None)
        if optimize and not compile:  # inductor does its own fusing
            fuse_linear_activations(self.model)  # CPU modules only (models.optimize)
        if optimize and runs_on("malloc", device):
            reuse_freed_memory()
        self.model.vision_model = maybe_compile(self.model.vision_model, compile)
        self.compiled = compile
        self._graphed = GraphedCall(self._image_features, device) if cuda_graphs else None
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
        self._normalizer: tuple[Any, Any, Any] | None = None
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

    def memory(self) -> dict[str, StageMemory]:
        """Device memory per item of this encoder's passes (see :mod:`tidy_detect.models.memory`)."""
        sdpa = self.attention == "sdpa"
        return {"clip image": clip_image(self.model.config, self.dtype, sdpa, self.view_size),
                "clip text": clip_text(self.model.config, self.dtype, sdpa)}

    # -- preprocess ----------------------------------------------------------------------------

    def global_pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, 3, S, S) model input for the global view of each image."""
        if self.global_view == "center-crop":
            return to_normalized_array([center_crop(im, self.view_size) for im in images], self.mean, self.std)
        return self.crop_pixels(images)

    def global_view_uint8(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, S, S, 3) 8-bit pixels of the centre-crop global views (what
        :meth:`global_pixels` scales and normalises), a quarter of the bytes to send to a device."""
        size = self.view_size
        if not images:
            return np.zeros((0, size, size, 3), dtype=np.uint8)
        return np.stack([np.asarray(center_crop(im, size), dtype=np.uint8) for im in images])

    def prepare_global(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        """Host tensors of the global views for :meth:`encode_global`'s ``prepared`` (made ahead
        of time, in a worker thread): 8-bit pixels for the centre-crop view, else CLIP's own
        preprocessing in float32."""
        import torch

        if self.global_view == "center-crop":
            return {"clip_global": torch.from_numpy(self.global_view_uint8(images))}
        return {"clip_global": torch.from_numpy(self.crop_pixels(images))}

    def crop_pixels(self, images: Sequence[Image.Image], map_fn: MapFn | None = None) -> np.ndarray:
        """(N, 3, S, S) model input for object crops: CLIP's own resize and centre crop.

        With ``map_fn`` (a thread pool's ``map``) the crops are preprocessed in chunks in
        parallel, each by the same processor call, so the values are the same."""
        if not images:
            return np.zeros((0, 3, self.image_size, self.image_size), dtype=np.float32)
        images = list(images)
        if map_fn is None or len(images) < 16:
            return self._processed(images)
        step = max(8, -(-len(images) // 16))
        return np.concatenate(list(map_fn(self._processed, [images[i:i + step] for i in range(0, len(images), step)])))

    def _processed(self, images: list[Image.Image]) -> np.ndarray:
        return np.asarray(self.processor.image_processor(images=images, return_tensors="np")["pixel_values"],
                          dtype=np.float32)

    def _device_pixels(self, pixels: Any) -> Any:
        """A chunk of model input on the device in the model's dtype: 8-bit global views (N, S, S,
        3) are scaled and normalised there in float32, in the order of ``to_normalized_array``;
        float32 input is cast."""
        import torch

        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        if pixels.device.type == "cpu" and is_cuda(self.device):
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        else:
            pixels = pixels.to(self.device)
        if pixels.dtype == torch.uint8:
            if self._normalizer is None:
                # Tensors, not Python scalars: a scalar divisor may become a multiplication by its
                # reciprocal in some kernels, which can round differently from numpy's division.
                self._normalizer = (torch.tensor([255.0], device=self.device),
                                    torch.tensor(self.mean, dtype=torch.float32, device=self.device),
                                    torch.tensor(self.std, dtype=torch.float32, device=self.device))
            scale, mean, std = self._normalizer
            pixels = ((pixels.float() / scale - mean) / std).permute(0, 3, 1, 2)
        return pixels.to(torch_dtype(self.dtype)).contiguous()

    # -- forward ----------------------------------------------------------------------------------

    def _image_features(self, pixel_values: Any) -> Any:
        interpolate = pixel_values.shape[-1] != self.image_size
        kwargs = {"interpolate_pos_encoding": True} if interpolate else {}
        return self.model.get_image_features(pixel_values=pixel_values, **kwargs).pooler_output

    def encode_pixels(self, pixels: Any) -> np.ndarray:
        """Projected image embeddings (N, dim), float32, not normalised.

        ``pixels``: (N, 3, S, S) float32 model input (numpy or torch), or (N, S, S, 3) 8-bit
        centre-crop views (see :meth:`global_view_uint8`), on the CPU or already on the device.

        Raises:
            DeviceMemoryError: a pass ran out of device memory (lower ``max_batch``).
        """
        import torch

        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        with torch.inference_mode():
            for start in range(0, len(pixels), self.max_batch):
                chunk = pixels[start:start + self.max_batch]
                features = run_guarded(self._forward_images, chunk, stage="clip image", device=self.device,
                                       batch=len(chunk), what=f"CLIP, {self.dtype}",
                                       lower="--batch-size (CLIP passes take the global views and crops of a "
                                             f"batch, at most {self.max_batch} at a time)")
                out.append(features)
        return np.concatenate(out)

    def _forward_images(self, chunk: Any) -> np.ndarray:
        pixel_values = self._device_pixels(chunk)
        if self._graphed is not None:
            features = self._graphed(pixel_values)
        else:
            features = self._image_features(pixel_values)
        return features.float().cpu().numpy()

    def encode_global(self, images: Sequence[Image.Image], prepared: Any = None) -> np.ndarray:
        """I0 for each image (global view); ``prepared``: the ``clip_global`` tensor of
        :meth:`prepare_global` for these images, possibly already on the device."""
        if prepared is not None:
            return self.encode_pixels(prepared)
        if is_cuda(self.device) and self.global_view == "center-crop":
            return self.encode_pixels(self.global_view_uint8(images))
        return self.encode_pixels(self.global_pixels(images))

    def encode_crops(self, images: Sequence[Image.Image], map_fn: MapFn | None = None) -> np.ndarray:
        """I_i for each crop (``map_fn``: see :meth:`crop_pixels`)."""
        return self.encode_pixels(self.crop_pixels(images, map_fn))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Projected text embeddings (N, dim), float32; repeated texts come from a cache.

        Raises:
            DeviceMemoryError: a pass ran out of device memory.
        """
        import torch

        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        self.cache_hits += len(texts) - len(missing)
        self.cache_misses += len(missing)
        fresh: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            for start in range(0, len(missing), self.max_batch):
                chunk = missing[start:start + self.max_batch]
                features = run_guarded(self._forward_texts, chunk, stage="clip text", device=self.device,
                                       batch=len(chunk), what=f"CLIP, {self.dtype}", lower="--batch-size")
                fresh.update(zip(chunk, features))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        result = np.stack([fresh[t] if t in fresh else self._cache[t] for t in texts])
        for text, vector in fresh.items():
            self._remember(text, vector)
        return result

    def _forward_texts(self, chunk: list[str]) -> np.ndarray:
        tokens = self.processor.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_text_length,
                                          return_tensors="pt")
        if is_cuda(self.device):
            tokens = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in tokens.items()}
        else:
            tokens = {k: v.to(self.device) for k, v in tokens.items()}
        return self.model.get_text_features(**tokens).pooler_output.float().cpu().numpy()

    def _remember(self, text: str, vector: np.ndarray) -> None:
        if self._cache_size <= 0:
            return
        self._cache[text] = vector
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

