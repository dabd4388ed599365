"""Provenance in every detection record: ``detect`` (json, jsonl, csv, table), the Python API, archives
and stores; it never changes a score, and evaluation never reads it."""

from __future__ import annotations

import csv
import io
import json
import zipfile

import pytest
from PIL import Image
from typer.testing import CliRunner

from tidy_detect.cli import app
from tidy_detect.detect import Detector
from tidy_detect.head import DiscrepancyHead
from tidy_detect.provenance import ProvenanceOptions, read_provenance


runner = CliRunner()
# Pillow refuses a PNG whose compressed text inflates past its own 1 MB limit (images.py): that image
# is an error row, which still gets its provenance.
UNDECODABLE = {"bomb.png"}


def detect_json(declared, *args) -> dict[str, dict]:
    result = runner.invoke(app, ["detect", str(declared["folder"]), "--head", str(declared["head"]), "--format", "json",
                                 "--c2pa-trust", str(declared["root_pem"]), *args])
    assert result.exit_code == 0, result.output
    return {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(result.stdout)}


@pytest.fixture(scope="module")
def declared(declared_files, tiny_head):
    return {**declared_files, "head": tiny_head["head"], "extractor": tiny_head["extractor"]}


def test_detect_json_reports_each_files_provenance_and_still_scores_it(declared):
    records = detect_json(declared)
    assert set(records) == set(declared["expected"])
    for name, check in declared["expected"].items():
        record = records[name]
        provenance = record["provenance"]
        assert provenance["checked"] is True, name
        assert check(provenance), (name, provenance)
        assert len(provenance["summary"]) <= 300
        if name in UNDECODABLE:
            assert record["p_fake"] is None and "header cannot be read" in record["error"]
        else:
            assert record["error"] is None and 0.0 <= record["p_fake"] <= 1.0, (name, record["error"])
    assert records["plain.png"]["provenance"]["summary"] == (
        "No provenance metadata found — this says nothing about whether the image is real")


def test_provenance_never_changes_a_score(declared):
    full = detect_json(declared)
    off = detect_json(declared, "--provenance", "off")
    metadata = detect_json(declared, "--provenance", "metadata")
    assert {k: r["p_fake"] for k, r in full.items()} == {k: r["p_fake"] for k, r in off.items()}
    assert {k: r["label"] for k, r in full.items()} == {k: r["label"] for k, r in metadata.items()}
    assert all(r["provenance"]["checked"] is False for r in off.values())
    assert all(r["provenance"]["watermark"] is None for r in metadata.values())
    if "marked.png" in full:
        assert metadata["marked.png"]["provenance"]["findings"] == []


def test_without_the_trusted_root_the_signature_is_not_verified(declared, monkeypatch):
    monkeypatch.delenv("TIDY_DETECT_C2PA_TRUST_ANCHORS", raising=False)
    result = runner.invoke(app, ["detect", str(declared["folder"] / "signed.jpg"), "--head", str(declared["head"]),
                                 "-f", "json"])
    [record] = json.loads(result.stdout)
    assert record["provenance"]["c2pa"]["status"] == "untrusted" and record["provenance"]["verified"] is False
    monkeypatch.setenv("TIDY_DETECT_C2PA_TRUST_ANCHORS", str(declared["root_pem"]))
    result = runner.invoke(app, ["detect", str(declared["folder"] / "signed.jpg"), "--head", str(declared["head"]),
                                 "-f", "json"])
    assert json.loads(result.stdout)[0]["provenance"]["verified"] is True


def test_bad_provenance_options_are_one_line_errors(declared, tmp_path):
    bad = runner.invoke(app, ["detect", str(declared["folder"]), "--head", str(declared["head"]), "--provenance", "x"])
    assert bad.exit_code == 2 and "must be one of full, metadata, off, got 'x'" in bad.output
    (tmp_path / "roots.pem").write_text("nothing here")
    bad = runner.invoke(app, ["detect", str(declared["folder"]), "--head", str(declared["head"]),
                              "--c2pa-trust", str(tmp_path / "roots.pem")])
    assert bad.exit_code == 2 and "no '-----BEGIN CERTIFICATE-----' block found" in " ".join(bad.output.split())


def test_csv_jsonl_and_table_carry_provenance(declared, tmp_path):
    out = tmp_path / "r.csv"
    args = ["detect", str(declared["folder"]), "--head", str(declared["head"]), "--c2pa-trust",
            str(declared["root_pem"]), "--provenance", "metadata"]
    assert runner.invoke(app, [*args, "--out", str(out)]).exit_code == 0
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(io.StringIO(out.read_text()))}
    assert rows["signed.jpg"]["provenance_declares_ai"] == "true" and rows["signed.jpg"]["provenance_verified"] == "true"
    assert rows["plain.png"]["provenance_declares_ai"] == "" and rows["plain.png"]["provenance_verified"] == "false"
    assert json.loads(rows["a1111.png"]["provenance"])["findings"][0]["source"] == "png-text"
    assert rows["laughs.jpg"]["provenance_summary"].startswith("No provenance metadata could be read")
    lines = runner.invoke(app, [*args, "-f", "jsonl"]).stdout.strip().splitlines()
    assert all("provenance" in json.loads(line) for line in lines)
    table = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert table.exit_code == 0
    text = " ".join(table.output.split())
    assert "provenance" in text and "AI (verified)" in text and "AI (claim)" in text and "none found" in text
    assert "files declare generative AI in their own metadata" in text


def test_the_python_api(declared):
    head, meta = DiscrepancyHead.load(declared["head"])
    options = ProvenanceOptions(mode="metadata", trust_anchors=declared["root_pem"].read_text())
    detector = Detector(head, meta, declared["extractor"], provenance=options)
    path = declared["folder"] / "signed.jpg"
    records = detector.predict([path, path.read_bytes(), Image.open(path)])
    assert records[0]["provenance"] == records[1]["provenance"] == read_provenance(path, options)
    assert records[0]["provenance"]["verified"] is True
    assert records[2]["provenance"]["checked"] is False and "PIL image" in records[2]["provenance"]["summary"]
    assert records[0]["p_fake"] == pytest.approx(records[2]["p_fake"])
    # decoded images: provenance comes with them, or the record says it was not read
    from tidy_detect.images import load_image

    loaded = load_image(path.read_bytes(), name="x.jpg")
    given = detector.predict_loaded([("x.jpg", loaded)], provenance=[detector.read_provenance(path.read_bytes())])
    assert given[0]["provenance"] == records[0]["provenance"]
    assert detector.predict_loaded([("x.jpg", loaded)])[0]["provenance"]["checked"] is False
    info = detector.info()["provenance"]
    assert info["mode"] == "metadata" and info["c2pa"] == "available" and info["watermark"] == "off"


def test_archive_members_and_saved_stores(declared, tmp_path):
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a1111.png", (declared["folder"] / "a1111.png").read_bytes())
        z.writestr("plain.png", (declared["folder"] / "plain.png").read_bytes())
    result = runner.invoke(app, ["detect", str(archive), "--head", str(declared["head"]), "-f", "json",
                                 "--save-store", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    records = {r["path"].rsplit("!/", 1)[-1]: r for r in json.loads(result.stdout)}
    assert records["a1111.png"]["provenance"]["declares_ai"] is True
    assert records["plain.png"]["provenance"]["findings"] == []


def test_evaluation_never_reads_provenance():
    """Nothing that computes benchmark numbers imports the provenance package."""
    from tests.test_architecture import PACKAGE, _graph

    graph = _graph()
    numbers = [m for m in graph if m.startswith((f"{PACKAGE}.evaluate", f"{PACKAGE}.features", f"{PACKAGE}.data"))
               or m in (f"{PACKAGE}.training", f"{PACKAGE}.head")]
    assert numbers
    offenders = {m: sorted(d for d in graph[m] if d.startswith(f"{PACKAGE}.provenance")) for m in numbers}
    assert {m: d for m, d in offenders.items() if d} == {}
    # evaluation reaches the detector only for its compatibility check, the random-weight mark and
    # (robustness) its extractor; scores come from the stores' features and the head.
    import inspect

    from tidy_detect.evaluate import evaluation

    assert "provenance" not in inspect.getsource(evaluation)
