"""Shared fixtures: the tiny model bundle (built once per test session) and image trees."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Tests never reach a model hub: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the tiny random-weight bundle; its preset is ``tiny_bundle / "tiny.toml"``."""
    from tidy_detect.models.tiny import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"), seed=0).parent


@pytest.fixture(scope="session")
def tiny_preset(tiny_bundle: Path) -> Path:
    return tiny_bundle / "tiny.toml"


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def make_tree(root: Path, groups: dict[str, int], seed: int = 0, suffix: str = ".png") -> list[Path]:
    """``root/<group>/{0_real,1_fake}/img<i><suffix>`` with ``n`` random images per class."""
    rng = np.random.default_rng(seed)
    paths = []
    for group, n in groups.items():
        for label in ("0_real", "1_fake"):
            folder = root / group / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = (int(v) for v in rng.integers(24, 120, 2))
                path = folder / f"img{i}{suffix}"
                random_image(rng, w, h).save(path)
                paths.append(path)
    return paths


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    make_tree(root, {"progan": 3, "dalle": 2})
    return root
