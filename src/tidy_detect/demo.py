"""The offline demo: tiny models, a synthetic real/fake image set, the whole pipeline end to end.

Nothing here needs a network. The "fake" images carry traces that image generators leave
(nearest-neighbour up-sampling checkerboards, over-smooth textures); the "real" ones have
photo-like multi-scale texture and sensor noise. With tiny random-weight models the scores say
nothing about real images: the demo shows the commands, the files and the outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageFilter

DEMO_GROUPS = {"train": ("gan-a",), "test": ("gan-a", "diffusion-b")}


def _smooth_noise(rng: np.random.Generator, height: int, width: int, scale: int) -> np.ndarray:
    """Noise at 1/scale resolution, bicubically enlarged: one octave of a natural-looking texture."""
    small = rng.random((max(height // scale, 2), max(width // scale, 2), 3)).astype(np.float32)
    image = Image.fromarray((small * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 255.0


def real_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Multi-scale texture with a light gradient and per-pixel sensor noise."""
    image = sum(_smooth_noise(rng, height, width, s) * w for s, w in ((32, 0.5), (8, 0.3), (2, 0.2)))
    gradient = np.linspace(0, 0.2, width, dtype=np.float32)[None, :, None]
    image = image + gradient + rng.normal(0, 0.03, image.shape).astype(np.float32)
    return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8), "RGB")


def fake_like(rng: np.random.Generator, width: int, height: int, kind: str) -> Image.Image:
    """``gan``: rendered at half size, nearest-neighbour up-sampled (checkerboard periodicity);
    ``diffusion``: over-smoothed texture with no sensor noise."""
    if kind == "gan":
        half = real_like(rng, max(width // 2, 4), max(height // 2, 4))
        return half.resize((width, height), Image.NEAREST)
    base = sum(_smooth_noise(rng, height, width, s) * w for s, w in ((32, 0.6), (8, 0.4)))
    image = Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8), "RGB")
    return image.filter(ImageFilter.GaussianBlur(1.5))


def write_demo_images(root: Path, per_class: int = 16, seed: int = 0) -> dict[str, Path]:
    """Write ``root/{train,test}/<generator>/{0_real,1_fake}/*.png``; returns the split folders."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, generators in DEMO_GROUPS.items():
        for generator in generators:
            kind = generator.split("-")[0]
            for label, make in (("0_real", lambda w, h: real_like(rng, w, h)),
                                ("1_fake", lambda w, h: fake_like(rng, w, h, kind))):
                folder = root / split / generator / label
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    width, height = (int(v) for v in rng.integers(64, 160, 2))
                    make(width, height).save(folder / f"{generator}_{i:03d}.png")
        splits[split] = root / split
    return splits


@dataclass
class DemoResult:
    out: Path
    bundle: Path
    preset: Path
    images: dict[str, Path]
    stores: dict[str, Path] = field(default_factory=dict)
    summaries: dict[str, Any] = field(default_factory=dict)
    train: Any = None
    records: list[dict[str, Any]] = field(default_factory=list)
    detections: Path | None = None


def run_demo(out: Path, *, per_class: int = 24, epochs: int = 50, seed: int = 0, detect_count: int = 6,
             progress: Callable[[str], None] | None = None) -> DemoResult:
    """Build the tiny bundle and the image set under ``out``, extract both splits, train a head on
    the training split and detect a few test images with it. Reruns reuse what is there."""
    from tidy_detect.config import load_preset
    from tidy_detect.data.inputs import collect_inputs
    from tidy_detect.detect import Detector
    from tidy_detect.features.extractor import Extractor, extract
    from tidy_detect.models.tiny import make_tiny_bundle
    from tidy_detect.training import train_head

    say = progress or (lambda message: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = out / "models"
    preset = bundle / "tiny.toml"
    if preset.is_file():
        say(f"tiny models: reusing {bundle}")
    else:
        say(f"tiny models: building in {bundle}")
        preset = make_tiny_bundle(bundle, seed=seed)
    say(f"images: {per_class} real + {per_class} fake per generator under {out / 'images'}")
    images = write_demo_images(out / "images", per_class=per_class, seed=seed)
    result = DemoResult(out, bundle, preset, images)
    extractor = Extractor(load_preset(preset)).load()
    for split, folder in images.items():
        store = out / "stores" / split
        say(f"extract: {folder} -> {store}")
        result.summaries[split] = extract([folder], store, extractor=extractor)
        result.stores[split] = store
    say(f"train: head on {result.stores['train']} ({epochs} epochs)")
    result.train = train_head([result.stores["train"]], out / "heads" / "demo.safetensors", epochs=epochs,
                              seed=seed, batch_size=32)
    detector = Detector(result.train.head, result.train.metadata, extractor)
    test_items = collect_inputs([images["test"]])
    picked = test_items[:: max(len(test_items) // detect_count, 1)][:detect_count]
    say(f"detect: {len(picked)} test images")
    result.records = [r for batch in detector.detect_items(picked) for r in batch]
    result.detections = out / "detections.json"
    result.detections.write_text(json.dumps(result.records, indent=2) + "\n", encoding="utf-8")
    return result
