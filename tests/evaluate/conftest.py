"""A small benchmark on the tiny bundle: a training store, test stores per dataset, a head."""

from __future__ import annotations

import pytest

from tidy_detect.config import load_preset
from tidy_detect.features.extractor import Extractor, extract
from tidy_detect.training import train_head

from tests.conftest import make_tree


@pytest.fixture(scope="session")
def tiny_extractor(tiny_bundle):
    return Extractor(load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 8})).load()


@pytest.fixture(scope="session")
def bench(tiny_extractor, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    make_tree(root / "train", {"progan": 8}, seed=10)
    make_tree(root / "cnn", {"progan": 5, "stylegan": 4}, seed=11)
    make_tree(root / "unifd", {"dalle": 4, "ldm_200": 3}, seed=12)
    make_tree(root / "val", {"progan": 4}, seed=13)
    stores = {}
    for name in ("train", "cnn", "unifd", "val"):
        extract([root / name], root / "stores" / name, extractor=tiny_extractor)
        stores[name] = root / "stores" / name
    heads = {}
    for seed in (0, 1):
        heads[seed] = train_head([stores["train"]], root / "heads" / f"h-seed{seed}.safetensors", epochs=5,
                                 hidden=16, batch_size=8, seed=seed).path
    return {"root": root, "stores": stores, "heads": heads, "extractor": tiny_extractor}
