"""The command line: extraction end to end, model listing, errors as one line with an exit code."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from tidy_detect.cli import app
from tidy_detect.features.store import FeatureStore

runner = CliRunner()


def test_extract_and_store_info(tiny_preset, image_tree, tmp_path):
    store = tmp_path / "store"
    result = runner.invoke(app, ["extract", str(image_tree), "--out", str(store), "--preset", str(tiny_preset),
                                 "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "extracted now" in result.output and "images/s" in result.output
    assert len(FeatureStore(store)) == 10
    again = runner.invoke(app, ["extract", str(image_tree), "--out", str(store), "--preset", str(tiny_preset)])
    assert again.exit_code == 0
    info = runner.invoke(app, ["store", "info", str(store), "--json"])
    assert info.exit_code == 0
    data = json.loads(info.output)
    assert data["summary"]["rows"] == 10 and data["summary"]["groups"] == {"dalle": 4, "progan": 6}
    assert [r["processed"] for r in data["config"]["runs"]] == [10, 0]


def test_model_options_override_the_preset(tiny_bundle, tiny_preset, image_tree, tmp_path):
    result = runner.invoke(app, ["extract", str(image_tree), "--out", str(tmp_path / "s"), "--preset", str(tiny_preset),
                                 "--captioner", "llava", "--captioner-model", str(tiny_bundle / "llava"),
                                 "--grounder", str(tiny_bundle / "owlv2"), "--clip", str(tiny_bundle / "clip-b"),
                                 "--limit", "2"])
    assert result.exit_code == 0, result.output
    extraction = FeatureStore(tmp_path / "s").extraction
    assert extraction["captioner"]["name"] == "llava"
    assert extraction["captioner"]["prompt"] == "Please generate a one-sentence caption for the input image."
    assert extraction["grounder"]["name"] == "owlv2"
    assert extraction["clip"]["source"] == str(tiny_bundle / "clip-b")


def test_unknown_name_is_one_line_with_exit_code(tiny_preset, image_tree, tmp_path):
    result = runner.invoke(app, ["extract", str(image_tree), "--out", str(tmp_path / "s"), "--preset",
                                 str(tiny_preset), "--captioner", "blip3"])
    assert result.exit_code == 2
    assert "Unknown captioner 'blip3'. Known: blip, blip2, llava, provided." in result.output
    assert "Traceback" not in result.output


def test_missing_weights_error_is_clear(image_tree, tmp_path):
    result = runner.invoke(app, ["extract", str(image_tree), "--out", str(tmp_path / "s"), "--grounder", "none",
                                 "--captioner", "blip"])
    assert result.exit_code == 4
    text = " ".join(result.output.split())
    assert "2 of the models needed cannot be loaded" in text  # the captioner and CLIP, in one message
    assert "captioner model 'Salesforce/blip-image-captioning-large' is not downloaded" in text
    assert "--captioner-model models/blip-image-captioning-large" in text and "Traceback" not in text


def test_missing_input_and_bad_option(tmp_path):
    result = runner.invoke(app, ["extract", str(tmp_path / "nope"), "--out", str(tmp_path / "s")])
    assert result.exit_code == 3 and "no such file or folder" in result.output
    result = runner.invoke(app, ["extract", str(tmp_path), "--out", str(tmp_path / "s"), "--dtype", "fp8"])
    assert result.exit_code == 2 and "runtime.dtype must be one of" in result.output


def test_models_list():
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0
    for name in ("blip2", "llava", "provided", "grounding-dino", "owlv2", "none", "vit-b-16", "paper", "fast"):
        assert name in result.output


def test_make_tiny_refuses_an_existing_bundle(tiny_bundle):
    result = runner.invoke(app, ["models", "make-tiny", str(tiny_bundle)])
    assert result.exit_code != 0 and "error:" in result.output


def test_help_does_not_import_torch():
    code = "import sys; from tidy_detect.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    result = subprocess.run([sys.executable, "-m", "tidy_detect.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "extract" in result.stdout


def test_extract_exit_codes_and_kept_errors(tiny_preset, image_tree, tmp_path):
    manifest = tmp_path / "missing.csv"
    manifest.write_text("path\n" + "".join(f"/nope/{i}.png\n" for i in range(5)))
    store = str(tmp_path / "store")
    first = runner.invoke(app, ["extract", str(manifest), "--out", store, "--preset", str(tiny_preset)])
    assert first.exit_code == 8 and "none of the 5 images could be processed" in first.output
    again = runner.invoke(app, ["extract", str(manifest), "--out", store, "--preset", str(tiny_preset)])
    assert again.exit_code == 8 and "5 of them recorded as errors by earlier runs" in again.output
    assert "errors kept from earlier runs" in again.output
    empty = tmp_path / "empty"
    empty.mkdir()
    none = runner.invoke(app, ["extract", str(empty), "--out", str(tmp_path / "s2"), "--preset", str(tiny_preset)])
    assert none.exit_code == 8 and "no images found" in none.output
    (image_tree / "progan" / "1_fake" / "bad.png").write_text("not an image")
    mixed = ["extract", str(image_tree), "--out", str(tmp_path / "s3"), "--preset", str(tiny_preset)]
    assert runner.invoke(app, mixed).exit_code == 0
    strict = runner.invoke(app, mixed + ["--fail-on-error"])
    assert strict.exit_code == 9 and "0 now, 1 kept from earlier runs" in strict.output


def test_help_lists_the_exit_codes():
    result = runner.invoke(app, ["--help"])
    from tidy_detect.errors import EXIT_CODES

    assert result.exit_code == 0
    for code, _ in EXIT_CODES:
        assert f"{code} " in result.output


def test_readme_lists_every_exit_code():
    from pathlib import Path

    from tidy_detect.errors import EXIT_CODES

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    for code, meaning in EXIT_CODES:
        assert f"| {code} | {meaning} |" in readme


def _commands(group=None, prefix=()):
    import typer

    group = group or typer.main.get_command(app)
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer bundles its own click)
            yield from _commands(command, prefix + (name,))
        else:
            yield prefix + (name,)


def test_every_command_has_an_example_and_takes_h():
    commands = list(_commands())
    assert len(commands) >= 17
    for path in commands:
        for flag in ("--help", "-h"):
            result = runner.invoke(app, [*path, flag], terminal_width=200)
            assert result.exit_code == 0, (path, flag, result.output)
            assert "Example: tidy-detect " + " ".join(path) in " ".join(result.output.split()), path
            assert "<bool>" not in result.output and "<int>  More log" not in result.output, path
    top = runner.invoke(app, ["-h"])
    assert top.exit_code == 0 and "-vv" in top.output and "<bool>" not in top.output


def test_every_missing_model_is_named_in_one_error(image_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = runner.invoke(app, ["extract", str(image_tree), "--out", str(tmp_path / "s"), "--preset", "paper"])
    assert result.exit_code == 4
    text = " ".join(result.output.split())
    assert "3 of the models needed cannot be loaded" in text
    for model, option in (("Salesforce/blip2-opt-2.7b", "--captioner-model"),
                          ("IDEA-Research/grounding-dino-base", "--grounder-model"),
                          ("openai/clip-vit-large-patch14", "--clip")):
        assert f"hf download {model} --local-dir" in text and option in text
    assert "loading the captioner" not in text  # nothing was loaded first


def test_models_list_never_cuts_ids():
    result = runner.invoke(app, ["models", "list"], terminal_width=60)
    assert result.exit_code == 0
    assert "…" not in result.output  # folded onto more lines, never cut with an ellipsis
    assert "-2.7b" in result.output  # the end of a folded id is there
    listing = json.loads(runner.invoke(app, ["models", "list", "--format", "json"]).output)
    assert {c["default_checkpoint"] for c in listing["captioners"]} >= {"Salesforce/blip2-opt-2.7b"}
