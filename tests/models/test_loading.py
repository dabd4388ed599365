"""Model folders that cannot be loaded safely or at all: one clear ModelLoadError, never an unpickle."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tidy_detect.config import FeatureConfig
from tidy_detect.errors import ModelLoadError
from tidy_detect.models.captioners import build_captioner
from tidy_detect.models.clip import ClipEncoder
from tidy_detect.models.grounders import build_grounder

FEATURES = FeatureConfig(caption_max_tokens=8, box_threshold=0.0, text_threshold=0.0)
CAPTIONERS = ("blip", "blip2", "llava")
GROUNDERS = ("grounding-dino", "owlv2")


class _WritesMarker:
    """Unpickling this creates ``marker``: the visible side effect a hostile checkpoint would have."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _build(name: str, folder: Path):
    if name.startswith("clip"):
        return ClipEncoder(str(folder))
    if name in CAPTIONERS:
        return build_captioner(name, str(folder), features=FEATURES, device="cpu", dtype="float32")
    return build_grounder(name, str(folder), features=FEATURES, device="cpu", dtype="float32")


def _in(folder: Path) -> str:
    """The regex for the start of an error about ``folder``."""
    return f"from folder '{re.escape(str(folder))}': "


def _copy(tiny_bundle: Path, name: str, dest: Path, *, weights: bool = True) -> Path:
    ignore = None if weights else shutil.ignore_patterns("*.safetensors")
    return Path(shutil.copytree(tiny_bundle / name, dest / name, ignore=ignore))


@pytest.fixture
def unpickle_spy(monkeypatch):
    """Record every torch.load, and make it a full unpickle (as on older torch, or with
    weights_only=False), so that a pickle that got that far would run its payload."""
    calls = []
    original = torch.load

    def load(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("f"))
        return original(*args, **{**kwargs, "weights_only": False})

    monkeypatch.setattr(torch, "load", load)
    return calls


def test_the_marker_pickle_has_its_side_effect(tmp_path):
    pickle.loads(pickle.dumps(_WritesMarker(tmp_path / "ran")))
    assert (tmp_path / "ran").exists()  # so its absence below means nothing was unpickled


@pytest.mark.parametrize("name", ["clip", *CAPTIONERS, *GROUNDERS])
def test_a_pickle_only_folder_is_refused_without_unpickling(tiny_bundle, tmp_path, unpickle_spy, name):
    folder = _copy(tiny_bundle, name, tmp_path, weights=False)
    marker = tmp_path / "unpickled"
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"weights": _WritesMarker(marker)}, handle)
    with pytest.raises(ModelLoadError) as info:
        _build(name, folder)
    message = str(info.value)
    assert str(folder) in message and "only pickle weights (pytorch_model.bin)" in message
    assert "loads only safetensors weights" in message and "save_pretrained(DIR" in message
    assert "safe_serialization=True" in message
    assert not marker.exists() and unpickle_spy == []


def test_weights_named_by_config_or_index_must_be_safetensors(tiny_bundle, tmp_path, unpickle_spy):
    marker = tmp_path / "unpickled"
    folder = _copy(tiny_bundle, "clip", tmp_path, weights=False)
    with open(folder / "adapter_model.bin", "wb") as handle:
        pickle.dump(_WritesMarker(marker), handle)
    config = json.loads((folder / "config.json").read_text())
    # transformers loads a config's transformers_weights "adapter_model.bin" even with use_safetensors
    (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(ModelLoadError, match="config.json's transformers_weights names 'adapter_model.bin'; "
                                             "tidy-detect loads only safetensors weights"):
        ClipEncoder(str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "adapter_model.bin"}}))
    with pytest.raises(ModelLoadError, match="model.safetensors.index.json names shard 'adapter_model.bin'"):
        ClipEncoder(str(folder))
    assert not marker.exists() and unpickle_spy == []


@pytest.mark.parametrize("name", ["clip", "blip"])
def test_a_truncated_safetensors_file(tiny_bundle, tmp_path, name):
    folder = _copy(tiny_bundle, name, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=_in(folder) + r"model.safetensors is not a readable "
                                             r"safetensors file \(.*\); it may be truncated"):
        _build(name, folder)


def test_weights_that_do_not_fit_the_config(tiny_bundle, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_bundle, "clip", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    name = "text_model.embeddings.position_embedding.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=_in(folder) + "the shapes of its weights do not match"):
        ClipEncoder(str(folder))


@pytest.mark.parametrize("text, rule", [("{not json", "config.json is not valid JSON"),
                                        ("[1, 2]", "config.json must be a JSON object, got list")])
def test_a_config_that_is_not_a_json_object(tiny_bundle, tmp_path, text, rule):
    folder = _copy(tiny_bundle, "clip", tmp_path)
    (folder / "config.json").write_text(text)
    with pytest.raises(ModelLoadError, match="Cannot load CLIP model " + _in(folder) + rule):
        ClipEncoder(str(folder))


def test_a_captioner_config_that_is_not_json(tiny_bundle, tmp_path):
    folder = _copy(tiny_bundle, "blip", tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        build_captioner(str(folder), None, features=FEATURES, device="cpu", dtype="float32")
    with pytest.raises(ModelLoadError, match=_in(folder) + "config.json is not valid JSON"):
        build_captioner("blip", str(folder), features=FEATURES, device="cpu", dtype="float32")


def test_cli_reports_a_pickle_only_model_in_one_line_with_exit_code_4(tiny_bundle, tmp_path, unpickle_spy):
    import numpy as np
    from PIL import Image

    from tidy_detect.cli import app
    from tidy_detect.head import DiscrepancyHead

    folder = _copy(tiny_bundle, "blip", tmp_path, weights=False)
    marker = tmp_path / "unpickled"
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump(_WritesMarker(marker), handle)
    rng = np.random.default_rng(0)
    extraction = {"clip": {"source": str(tiny_bundle / "clip")},
                  "captioner": {"name": "blip", "source": str(tiny_bundle / "blip")},
                  "grounder": {"name": "none", "source": None}, "phrases": {}}
    head = DiscrepancyHead(hidden=4, epochs=1).fit(rng.normal(size=(20, 4)), rng.integers(0, 2, 20))
    path = head.save(tmp_path / "head", {"representation": {"kind": "both", "w1": 1.0, "w2": 1.0, "normalize": True},
                                         "extraction": extraction})
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["detect", str(tmp_path / "a.png"), "--head", str(path), "--device", "cpu",
                                      "--captioner-model", str(folder)])
    assert result.exit_code == 4, result.output
    # one error line (besides the status line naming the model being loaded)
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("• loading")]
    assert len(lines) == 1 and lines[0].startswith("error: Cannot load captioner model from folder")
    assert "only pickle weights" in lines[0] and "--captioner-model" in lines[0]
    assert "Traceback" not in result.output and not marker.exists() and unpickle_spy == []
