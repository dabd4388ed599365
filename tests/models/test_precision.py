"""The precision policy: a dtype per model, loaded through from_pretrained with the float32 modules
kept, recorded in stores and heads, and part of their compatibility checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tidy_detect.config import ExtractionConfig, RuntimeConfig, load_preset
from tidy_detect.errors import CheckpointError, ConfigError, StoreError
from tidy_detect.features.extractor import Extractor, extract
from tidy_detect.features.store import FeatureStore

from tests.conftest import make_tree, random_image


def _dtypes(module):
    return {p.dtype for p in module.parameters()}


def test_blip2_in_bfloat16_keeps_its_qformer_and_query_tokens_in_float32(tiny_bundle):
    from tidy_detect.models.captioners import build_captioner

    config = load_preset(tiny_bundle / "tiny.toml")
    captioner = build_captioner("blip2", str(tiny_bundle / "blip2"), features=config.features, device="cpu",
                                dtype="bfloat16")
    model = captioner.model
    assert _dtypes(model.qformer) == {torch.float32} and model.query_tokens.dtype == torch.float32
    assert _dtypes(model.vision_model) == {torch.bfloat16} and _dtypes(model.language_model) == {torch.bfloat16}
    images = [random_image(np.random.default_rng(i), 64, 48) for i in range(2)]
    captions = captioner.caption(images)  # the speed-ups run on the mixed model without failing
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_each_model_gets_its_own_dtype_and_the_store_records_it(tiny_bundle, tmp_path):
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"dtype": "bfloat16", "batch_size": 4})
    assert config.runtime.clip_dtype == "float32"  # CLIP's default: the peers' float32 features
    extractor = Extractor(config).load()
    assert extractor.dtypes == {"clip": "float32", "captioner": "bfloat16", "grounder": "bfloat16"}
    assert _dtypes(extractor.clip.model) == {torch.float32}
    make_tree(tmp_path / "tree", {"gen": 1})
    extract([tmp_path / "tree"], tmp_path / "store", extractor=extractor)
    recorded = FeatureStore(tmp_path / "store").extraction
    assert [recorded[k]["dtype"] for k in ("clip", "captioner", "grounder")] == ["float32", "bfloat16", "bfloat16"]
    assert FeatureStore(tmp_path / "store").config["runs"][-1]["dtypes"]["captioner"] == "bfloat16"


def test_a_store_of_another_clip_dtype_is_refused_by_name_unless_accepted(tiny_bundle, tmp_path):
    base = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 4})
    make_tree(tmp_path / "tree", {"gen": 1})
    extract([tmp_path / "tree"], tmp_path / "store", base)
    half = base.updated(runtime={"clip_dtype": "bfloat16"})
    with pytest.raises(StoreError, match=r"clip\.dtype: store has \"float32\", now \"bfloat16\".*--allow-dtype-mismatch"):
        extract([tmp_path / "tree"], tmp_path / "store", half)
    summary = extract([tmp_path / "tree"], tmp_path / "store", half, accept_dtype=True)
    assert summary.status == "completed"
    assert FeatureStore(tmp_path / "store").extraction["clip"]["dtype"] == "float32"  # the store keeps its record


def test_a_store_from_before_dtypes_were_recorded_is_still_accepted(tiny_bundle, tmp_path):
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 4})
    make_tree(tmp_path / "tree", {"gen": 1})
    extract([tmp_path / "tree"], tmp_path / "store", config)
    config_file = tmp_path / "store" / "config.json"
    data = json.loads(config_file.read_text())
    for kind in ("clip", "captioner", "grounder"):
        data["extraction"][kind].pop("dtype")
    from tidy_detect.features.store import config_fingerprint

    data["fingerprint"] = config_fingerprint(data["extraction"])
    config_file.write_text(json.dumps(data))
    assert extract([tmp_path / "tree"], tmp_path / "store", config).status == "completed"


def test_a_head_runs_its_models_in_the_dtypes_its_features_were_made_in(tiny_bundle, tmp_path):
    from tidy_detect.detect import Detector
    from tidy_detect.training import train_head

    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 4, "captioner_dtype": "bfloat16"})
    make_tree(tmp_path / "tree", {"gen": 2})
    extract([tmp_path / "tree"], tmp_path / "store", config)
    result = train_head([tmp_path / "store"], tmp_path / "head.safetensors", epochs=2, hidden=8)
    assert result.metadata["head"]["precision_used"] == "float32"  # float32 CLIP features -> float32 head
    detector = Detector.load(result.path, device="cpu")
    assert detector.extractor.dtypes["clip"] == "float32" and detector.extractor.dtypes["captioner"] == "bfloat16"
    with pytest.raises(CheckpointError, match=r"clip\.dtype: head has \"float32\", now \"bfloat16\""):
        Detector.load(result.path, device="cpu", dtype="bfloat16")
    accepted = Detector.load(result.path, device="cpu", dtype="bfloat16", accept_dtype=True)
    assert accepted.extractor.dtypes["clip"] == "bfloat16"


def test_paper_preset_and_dtype_options():
    paper = load_preset("paper")
    assert paper.runtime.clip_dtype == "float32" and paper.runtime.model_dtype("captioner") == "auto"
    assert RuntimeConfig(dtype="bfloat16").model_dtype("grounder") == "bfloat16"
    with pytest.raises(ConfigError, match="runtime.clip_dtype must be one of"):
        RuntimeConfig(clip_dtype="int8")
    from tidy_detect.cli import build_extraction_config

    unset = dict.fromkeys(["clip", "captioner", "captioner_model", "grounder", "grounder_model", "device",
                           "batch_size", "workers"])
    config = build_extraction_config("paper", dtype="bfloat16", **unset)
    assert config.runtime.model_dtype("clip") == "bfloat16"  # --dtype sets every model, CLIP included
    config = build_extraction_config("paper", dtype=None, model_dtypes={"grounder": "float32"}, **unset)
    assert config.runtime.model_dtype("grounder") == "float32" and config.runtime.model_dtype("clip") == "float32"
    assert isinstance(ExtractionConfig().runtime.clip_dtype, str)
