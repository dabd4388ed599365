"""Shared heads: hub references resolved from the local Hugging Face cache offline, and model cards."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tidy_detect.calibrate import calibrate_one_class
from tidy_detect.cli import app
from tidy_detect.errors import CheckpointError, ConfigError, InputError
from tidy_detect.head import DiscrepancyHead, OneClassHead, load_head
from tidy_detect.cards import model_card
from tidy_detect.sharing import HubReference, parse_hub_reference, resolve_head

from tests.heads_data import EXTRACTION, discrepancy_store, tiny_heads  # noqa: F401 - tiny_heads is a fixture

runner = CliRunner()
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache, repo_id, files, *, commit=COMMIT, refs=("main",)):
    """Lay files out as huggingface_hub's cache does: blobs named by their hash, a snapshot folder
    per commit linking to them, and refs naming the commit of a branch or tag."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """A one-class and an MLP head on a synthetic store whose models are hub ids (plus a local folder)."""
    root = tmp_path_factory.mktemp("hub-heads")
    extraction = json.loads(json.dumps(EXTRACTION))
    extraction["clip"]["source"] = "openai/clip-vit-large-patch14"
    extraction["captioner"]["source"] = "Salesforce/blip2-opt-2.7b"
    extraction["grounder"]["source"] = "/home/someone/private/grounder-copy"
    store = discrepancy_store(root / "store", 400, 100, extraction=extraction, groups=("progan", "biggan"))
    one_class = calibrate_one_class([store], root / "one-class.safetensors", real_only=True).path
    from tidy_detect.training import train_head

    mlp = train_head([store], root / "mlp.safetensors", epochs=2, hidden=8).path
    return {"root": root, "store": store, "one_class": one_class, "mlp": mlp}


@pytest.mark.parametrize("text, expected", [
    ("org/repo", HubReference("org/repo")),
    ("hf://org/repo", HubReference("org/repo")),
    ("org/repo/heads/tidy.safetensors", HubReference("org/repo", "heads/tidy.safetensors")),
    ("org/repo@v1.0", HubReference("org/repo", revision="v1.0")),
    (f"org/repo@{COMMIT}/other.safetensors", HubReference("org/repo", "other.safetensors", COMMIT)),
    ("./org/repo", None), ("/abs/head.safetensors", None), ("~/heads/x", None), ("heads", None),
    ("heads/tidy.safetensors", None),  # a local file, mistyped or missing
    ("org/repo/notes.txt", None), ("heads/my head", None), ("org/repo/../x.safetensors", None),
])
def test_parse_hub_reference(text, expected):
    assert parse_hub_reference(text) == expected


@pytest.mark.parametrize("text, message", [
    ("hf://org", "a hub head reference must be ORG/REPO\\[@REVISION\\]\\[/FILE.safetensors\\], got 'hf://org'"),
    ("hf://org/repo/notes.txt", "must be ORG/REPO"),
    ("hf://org/repo/../../outside.safetensors", "must be ORG/REPO"),  # never a path out of the cache
    ("org/repo@bad:rev", "the revision of hub head reference 'org/repo@bad:rev' must be a branch, tag or commit"),
    ("hf://org/re po", "'org/re po' is not a valid repository id"),
])
def test_malformed_explicit_references(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_hub_reference(text)


def test_a_hub_reference_resolves_from_the_cache_offline(heads, offline_cache):
    from huggingface_hub import scan_cache_dir

    data = heads["one_class"].read_bytes()
    other = heads["mlp"].read_bytes()
    put_in_cache(offline_cache, "lab/tidy-heads", {"head.safetensors": data, "seeds/mlp.safetensors": other},
                 refs=("main", "v1"))
    # the layout is the one huggingface_hub itself reads
    [repo] = scan_cache_dir(offline_cache).repos
    assert repo.repo_id == "lab/tidy-heads" and {r.commit_hash for r in repo.revisions} == {COMMIT}
    for reference in ("lab/tidy-heads", "hf://lab/tidy-heads", "lab/tidy-heads@v1", f"lab/tidy-heads@{COMMIT}",
                      "lab/tidy-heads/head.safetensors"):
        path = resolve_head(reference)
        assert path.read_bytes() == data and str(path).startswith(str(offline_cache)), reference
    head, meta = load_head("lab/tidy-heads")
    assert isinstance(head, OneClassHead) and meta["head"]["fpr"] == 0.05
    mlp, _ = load_head("lab/tidy-heads/seeds/mlp.safetensors")
    assert isinstance(mlp, DiscrepancyHead)


def test_an_uncached_reference_offline_says_what_to_do(offline_cache):
    with pytest.raises(CheckpointError) as info:
        resolve_head("lab/missing")
    message = str(info.value)
    assert "head 'lab/missing' (no such local file): hub repository lab/missing, file head.safetensors" in message
    assert f"not in the local hub cache ({offline_cache}) and offline mode is on (HF_HUB_OFFLINE)" in message
    assert "Run `hf download lab/missing head.safetensors` where there is network" in message
    with pytest.raises(CheckpointError, match="revision v2.*`hf download lab/missing head.safetensors --revision v2`"):
        resolve_head("lab/missing@v2")
    # a cached repository without the revision asked for is not cached either
    put_in_cache(offline_cache, "lab/cached", {"head.safetensors": b"x"})
    with pytest.raises(CheckpointError, match="not in the local hub cache"):
        resolve_head("lab/cached@v9")


def test_a_local_path_wins_over_the_hub(heads, offline_cache, tmp_path, monkeypatch):
    put_in_cache(offline_cache, "lab/tidy-heads", {"head.safetensors": heads["mlp"].read_bytes()})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "tidy-heads.safetensors").write_bytes(heads["one_class"].read_bytes())
    assert resolve_head("lab/tidy-heads").resolve() == tmp_path / "lab" / "tidy-heads.safetensors"
    assert isinstance(load_head("lab/tidy-heads")[0], OneClassHead)
    assert isinstance(load_head("hf://lab/tidy-heads")[0], DiscrepancyHead)  # hf:// always means the hub


def test_a_damaged_hub_head_is_checked_like_a_local_one(offline_cache):
    put_in_cache(offline_cache, "lab/broken", {"head.safetensors": b"not a safetensors file"})
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_head("lab/broken")


def test_detect_eval_and_robustness_take_a_hub_head_and_check_its_models(tiny_heads, offline_cache, tmp_path):
    put_in_cache(offline_cache, "lab/tiny", {"head.safetensors": tiny_heads["one_class"].read_bytes(),
                                              "mlp.safetensors": tiny_heads["mlp"].read_bytes()})
    images = sorted((tiny_heads["tree"] / "gen" / "1_fake").iterdir())[:2]
    result = runner.invoke(app, ["detect", *map(str, images), "--head", "lab/tiny", "--format", "json"])
    assert result.exit_code == 0, result.output
    local = runner.invoke(app, ["detect", *map(str, images), "--head", str(tiny_heads["one_class"]), "--format", "json"])
    assert json.loads(result.stdout) == json.loads(local.stdout)
    out = tmp_path / "eval"
    evaluated = runner.invoke(app, ["eval", str(tiny_heads["store"]), "--head", "lab/tiny/mlp.safetensors",
                                    "--head", "lab/tiny", "--no-plots", "--out", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    info = json.loads((out / "metrics.json").read_text())["info"]
    assert info["head_references"] == ["lab/tiny/mlp.safetensors", "lab/tiny"]
    assert all(h.startswith(str(offline_cache)) for h in info["heads"])
    assert info["head_kinds"] == {"mlp": "mlp", "tiny": "one-class"}
    # a hub head made with other models is refused like a local one
    from safetensors import safe_open
    from safetensors.numpy import save

    with safe_open(str(tiny_heads["one_class"]), framework="numpy") as handle:
        meta = json.loads(handle.metadata()["tidy_detect"])
    meta["extraction"]["clip"]["weights"] = "0000000000000000"
    put_in_cache(offline_cache, "lab/other-models", {"head.safetensors": save({}, metadata={"tidy_detect": json.dumps(meta)})})
    refused = runner.invoke(app, ["detect", str(images[0]), "--head", "lab/other-models"])
    assert refused.exit_code == 7 and "clip.weights" in " ".join(refused.output.split())
    missing = runner.invoke(app, ["robustness", str(tiny_heads["tree"]), "--head", "lab/nothing-here",
                                  "--out", str(tmp_path / "rob")])
    assert missing.exit_code == 7 and "offline mode is on" in " ".join(missing.output.split())


def test_serve_resolves_a_hub_head_before_listening(offline_cache):
    pytest.importorskip("uvicorn")
    result = runner.invoke(app, ["serve", "--head", "lab/absent", "--port", "0"])
    assert result.exit_code == 7 and "not in the local hub cache" in " ".join(result.output.split())


# -- model cards ---------------------------------------------------------------------------------

def _front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_of_a_one_class_head(heads, tmp_path):
    from huggingface_hub import ModelCard

    path = model_card(heads["one_class"], tmp_path / "README.md", license="mit", repo_id="lab/tidy-one-class")
    text = path.read_text()
    front = _front_matter(text)
    assert front["library_name"] == "tidy-detect" and front["license"] == "mit"
    assert front["base_model"] == ["openai/clip-vit-large-patch14", "Salesforce/blip2-opt-2.7b"]
    assert {"tidy-detect", "one-class", "training-free"} <= set(front["tags"])
    assert front["pipeline_tag"] == "image-classification"
    card = ModelCard.load(path)  # the hub's own parser reads it
    assert card.data.library_name == "tidy-detect" and card.data.license == "mit"
    for section in ("## How to use", "## Training data", "## Extraction config", "## Metrics",
                    "## Intended use and limitations"):
        assert section in text
    assert "training-free, one-class" in text and "tidy-detect detect photos/ --head lab/tidy-one-class" in text
    assert 'Detector.load("lab/tidy-one-class")' in text
    assert "| progan | 200 | 50 |" in text and "| biggan | 200 | 50 |" in text and "100 fake rows ignored" in text
    assert "| held-out | 100 |" in text  # the false-positive rate reached, from the head's metrics
    assert "a local folder named 'grounder-copy'" in text and "/home/someone" not in text
    assert hashlib.sha256(heads["one_class"].read_bytes()).hexdigest() in text
    assert "random-weight" not in text


def test_model_card_of_a_trained_head_with_eval_metrics(tiny_heads, tmp_path):
    out = tmp_path / "eval"
    evaluated = runner.invoke(app, ["eval", str(tiny_heads["store"]), "--head", str(tiny_heads["mlp"]),
                                    "--head", str(tiny_heads["one_class"]), "--no-plots", "--out", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    card = tmp_path / "card" / "README.md"
    result = runner.invoke(app, ["head", "card", str(tiny_heads["mlp"]), "--metrics", str(out / "metrics.json"),
                                 "--repo", "lab/tiny-mlp", "--out", str(card)])
    assert result.exit_code == 0, result.output
    assert "hf upload lab/tiny-mlp" in result.output and "README.md" in result.output
    text = card.read_text()
    front = _front_matter(text)
    assert front["license"] == "unknown" and "base_model" not in front  # the tiny models are local folders
    assert "one-class" not in front["tags"]
    assert "Warning: made with random-weight models" in text  # the tiny bundle
    assert "A two-layer MLP head" in text and "| **mlp** (this head) |" in text and "| one-class |" in text
    assert "Recorded at training (%)" in text and "AP (%)" in text
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "robustness"}))
    with pytest.raises(InputError, match="not the metrics.json of `tidy-detect eval`"):
        model_card(tiny_heads["mlp"], tmp_path / "x.md", metrics=bad)
    with pytest.raises(ConfigError, match="--repo must be a hub repository id ORG/NAME"):
        model_card(tiny_heads["mlp"], tmp_path / "x.md", repo_id="not a repo")
    missing = runner.invoke(app, ["head", "card", str(tmp_path / "nope.safetensors")])
    assert missing.exit_code == 7 and "no such head checkpoint" in missing.output
    assert np.isfinite(json.loads((out / "metrics.json").read_text())["mean"]["mlp"]["ap"])
