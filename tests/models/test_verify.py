"""`models verify`: the pure checks on hand-computed values, the runner on stand-in adapters with
fixed outputs (passing and failing cases of every check), and the command on the tiny bundle."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tidy_detect.cli import app
from tidy_detect.errors import EXIT_CODES, VerificationFailedError
from tidy_detect.models.grounders import Detection
from tidy_detect.models.verify import (DATA_DIR, FAIL, MIN_COSINE, NOT_APPLICABLE, PASS, RANDOM, CheckResult,
                                       VerifyReport, box_iou, caption_rank, check_caption, check_clip_rank,
                                       check_grounding, check_precision, embedding_agreement, load_photos,
                                       named_object, random_roles, random_weights_reason, verify_models)

runner = CliRunner()


# -- the shipped photos ---------------------------------------------------------------------------

def test_shipped_photos_match_their_annotations():
    photo_set = load_photos()
    assert len(photo_set.photos) >= 4 and photo_set.unrelated_captions
    licences = (DATA_DIR / "LICENSES.md").read_text(encoding="utf-8")
    for photo in photo_set.photos:
        with Image.open(photo.path) as image:
            assert image.size == (photo.width, photo.height) and max(image.size) <= 512
        assert "public domain" in photo.licence or "CC0" in photo.licence
        assert photo.path.name in licences
        assert named_object(photo.caption, photo.expected_words), photo.name  # the true caption passes
        x0, y0, x1, y1 = photo.box
        assert (x1 - x0) * (y1 - y0) > 0.02 * photo.width * photo.height  # a main object, not a speck
    assert len({p.caption for p in photo_set.photos}) == len(photo_set.photos)


def test_broken_annotations_are_input_errors(tmp_path):
    from tidy_detect.errors import InputError

    entry = {"name": "x", "file": "x.jpg", "width": 10, "height": 10, "licence": "CC0", "source": "s",
             "caption": "a cat", "expected_words": ["cat"], "main_object": {"phrase": "cat", "box": [0, 0, 11, 5]}}
    (tmp_path / "annotations.json").write_text(json.dumps({"photos": [entry, entry]}))
    with pytest.raises(InputError, match="box must be"):
        load_photos(tmp_path)
    del entry["main_object"]
    (tmp_path / "annotations.json").write_text(json.dumps({"photos": [entry, entry]}))
    with pytest.raises(InputError, match="incomplete annotation"):
        load_photos(tmp_path)


# -- pure checks -----------------------------------------------------------------------------------

def test_named_object_matches_whole_words_plurals_and_phrases():
    assert named_object("a kitten sleeping on a sofa", ["cat", "kitten"]) == "kitten"
    assert named_object("two Cats on a mat", ["cat"]) == "cat"
    assert named_object("the cat's eyes", ["cat"]) == "cat"
    assert named_object("a woman in a space suit", ["astronaut", "space suit"]) == "space suit"
    assert named_object("a category of things", ["cat"]) is None
    assert named_object("a suit and a space heater", ["space suit"]) is None


def test_check_caption_pass_fail_and_random():
    ok = check_caption("chelsea", "a close up of a cat", ["cat", "kitten"])
    assert ok.status == PASS and ok.values["matched"] == "cat"
    bad = check_caption("chelsea", "a bowl of soup", ["cat", "kitten"])
    assert bad.status == FAIL and bad.failed and "names none" in bad.measured
    excused = check_caption("chelsea", "a bowl of soup", ["cat"], random_reason="tiny")
    assert excused.status == RANDOM and not excused.failed


def test_caption_rank_and_margin_by_hand():
    assert caption_rank([0.3, 0.5, 0.1], 1) == (1, pytest.approx(0.2))
    assert caption_rank([0.3, 0.5, 0.1], 0) == (2, pytest.approx(-0.2))
    assert caption_rank([0.3, 0.1, 0.5], 2)[0] == 1
    assert caption_rank([0.4, 0.4], 0)[0] == 2  # a tie is not a win


def test_check_clip_rank_pass_fail_and_random():
    texts = ["true", "other", "unrelated"]
    ok = check_clip_rank("cat", [0.31, 0.20, 0.05], 0, texts)
    assert ok.status == PASS and ok.values["rank"] == 1 and ok.values["margin"] == pytest.approx(0.11)
    bad = check_clip_rank("cat", [0.10, 0.20, 0.05], 0, texts)
    assert bad.status == FAIL and bad.values["rank"] == 2 and "'other'" in bad.measured
    assert check_clip_rank("cat", [0.10, 0.20, 0.05], 0, texts, random_reason="tiny").status == RANDOM


def test_box_iou_by_hand():
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert box_iou([0, 0, 2, 2], [0, 0, 2, 2]) == 1.0
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    assert box_iou([0, 0, 4, 2], [0, 0, 2, 2]) == pytest.approx(0.5)


def test_check_grounding_pass_fail_missing_and_random():
    ok = check_grounding("cat", "cat", [0, 0, 4, 2], [0, 0, 2, 2], threshold=0.5, score=0.7)
    assert ok.status == PASS and ok.values["iou"] == pytest.approx(0.5) and ok.values["score"] == 0.7
    bad = check_grounding("cat", "cat", [0, 0, 5, 2], [0, 0, 2, 2], threshold=0.5)
    assert bad.status == FAIL and "IoU 0.40" in bad.measured
    missing = check_grounding("cat", "cat", None, [0, 0, 2, 2])
    assert missing.status == FAIL and "no box" in missing.measured
    assert check_grounding("cat", "cat", None, [0, 0, 2, 2], random_reason="tiny").status == RANDOM


def test_embedding_agreement_by_hand():
    a = np.array([[3.0, 4.0], [1.0, 0.0]])
    assert embedding_agreement(a, 2 * a) == (pytest.approx(1.0), pytest.approx(0.0))  # scale does not matter
    b = np.array([[3.0, 4.0], [1.0, 1.0]])
    cos, diff = embedding_agreement(a, b)
    assert cos == pytest.approx(1 / np.sqrt(2)) and diff == pytest.approx(1 / np.sqrt(2))
    cos, diff = embedding_agreement(a, np.array([[np.nan, 1.0], [1.0, 0.0]]))
    assert np.isnan(cos) and diff == np.inf
    with pytest.raises(ValueError, match="same shape"):
        embedding_agreement(a, a[:1])


def test_check_precision_pass_fail_and_nan():
    rng = np.random.default_rng(0)
    full = {"image": rng.normal(size=(5, 16)), "text": rng.normal(size=(9, 16))}
    close = {k: v + 1e-3 * rng.normal(size=v.shape) for k, v in full.items()}
    ok = check_precision(full, close, "bfloat16")
    assert ok.status == PASS and ok.values["min_cosine"] > 0.999 and ok.values["half_dtype"] == "bfloat16"
    far = dict(close, text=full["text"] + 0.5 * rng.normal(size=full["text"].shape))
    bad = check_precision(full, far, "float16")
    assert bad.status == FAIL and bad.values["by_kind"]["image"]["min_cosine"] > MIN_COSINE
    assert bad.values["by_kind"]["text"]["min_cosine"] < MIN_COSINE
    broken = dict(close, image=np.full_like(full["image"], np.nan))
    nan = check_precision(full, broken, "float16")
    assert nan.status == FAIL and nan.values["min_cosine"] is None
    json.dumps(nan.to_dict(), allow_nan=False)  # JSON-safe: no NaN or inf in the values


def test_status_is_checked():
    with pytest.raises(ValueError, match="status must be one of"):
        CheckResult("caption", "x", "maybe", "", "")


# -- random weights --------------------------------------------------------------------------------

def test_random_weights_reason_from_config_and_bundle_marker(tmp_path):
    from tidy_detect.models.tiny import TOML_TEXT

    tiny = {"text_config": {"hidden_size": 32}, "vision_config": {"hidden_size": 48}}
    assert random_weights_reason(None, tiny).startswith("a tiny test architecture (widest layer 48")
    real = {"text_config": {"hidden_size": 768}, "vision_config": {"hidden_size": 1024}, "projection_dim": 768}
    assert random_weights_reason(None, real) is None
    assert random_weights_reason(None, SimpleNamespace(to_dict=lambda: {"d_model": 256})) is None
    folder = tmp_path / "bundle" / "clip"
    folder.mkdir(parents=True)
    assert random_weights_reason(str(folder), None) is None
    (tmp_path / "bundle" / "tiny.toml").write_text("# my own preset\n")
    assert random_weights_reason(str(folder), None) is None
    (tmp_path / "bundle" / "tiny.toml").write_text(TOML_TEXT)
    assert "make-tiny" in random_weights_reason(str(folder), None)
    assert "make-tiny" in random_weights_reason(str(folder), tiny) and "widest layer 48" in random_weights_reason(
        str(folder), tiny)
    # real weights copied into a bundle's folder are judged like any real weights
    assert random_weights_reason(str(folder), real) is None


# -- the runner on stand-in adapters ---------------------------------------------------------------

PHOTOS = load_photos()
N = len(PHOTOS.photos)
TEXTS = [p.caption for p in PHOTOS.photos] + list(PHOTOS.unrelated_captions)
DIM = len(TEXTS) + 2


class StandInClip:
    """Photo i embeds as e_i, text j as e_j: photo i's true caption is the only match. ``shift``
    rolls the text embeddings (every photo then prefers another's caption); ``noise`` and ``nan``
    stand for another precision."""

    def __init__(self, dtype="float32", shift=0, noise=0.0, nan=False, raises=False, width=768):
        self.dtype, self.shift, self.noise, self.nan, self.raises = dtype, shift, noise, nan, raises
        self.source, self.dim, self.global_view, self.view_size = "stand-in/clip", DIM, "center-crop", 224
        self.model = SimpleNamespace(config={"hidden_size": width})
        self.rng = np.random.default_rng(1)

    def describe(self):
        return {"source": self.source, "model_type": "clip"}

    def _out(self, rows):
        out = np.eye(DIM)[rows] + 0.01
        out = out + self.noise * self.rng.normal(size=out.shape)
        return np.full_like(out, np.nan) if self.nan else out

    def encode_crops(self, images):
        if self.raises:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return self._out(list(range(len(images))))

    encode_global = encode_crops

    def encode_texts(self, texts):
        index = {t: (k + self.shift) % len(TEXTS) for k, t in enumerate(TEXTS)}
        return self._out([index.get(t, len(TEXTS) + 1) for t in texts])


class StandInCaptioner:
    def __init__(self, captions, width=768):
        self.captions, self.name, self.source = captions, "blip2", "stand-in/blip2"
        self.model = SimpleNamespace(config={"hidden_size": width})

    def describe(self):
        return {"name": self.name, "source": self.source}

    def caption(self, images, given=None):
        if isinstance(self.captions, Exception):
            raise self.captions
        return list(self.captions)


class StandInGrounder:
    def __init__(self, offset=0.0, found=True, width=256):
        self.offset, self.found, self.name, self.source = offset, found, "grounding-dino", "stand-in/gd"
        self.model = SimpleNamespace(config={"d_model": width})

    def describe(self):
        return {"name": self.name, "source": self.source}

    def ground(self, images, phrases):
        boxes = {p.phrase: p.box for p in PHOTOS.photos}
        out = []
        for image, wanted in zip(images, phrases):
            dets = []
            for phrase in wanted:
                x0, y0, x1, y1 = boxes[phrase]
                w = (x1 - x0) * self.offset
                if self.found:
                    dets.append(Detection(phrase, (min(x0 + w, image.width), y0, min(x1 + w, image.width), y1), 0.8))
            out.append(dets)
        return out


class NoModel:
    def __init__(self, name):
        self.name = name

    def describe(self):
        return {"name": self.name, "source": None}


def models(clip=None, captioner=None, grounder=None):
    good_captions = [p.caption for p in PHOTOS.photos]
    return SimpleNamespace(clip=clip or StandInClip(), captioner=captioner or StandInCaptioner(good_captions),
                           grounder=grounder or StandInGrounder(), device="cpu", dtype="float32")


def statuses(report: VerifyReport, check: str) -> set[str]:
    return {c.status for c in report.checks if c.check == check}


def other_clip(**kwargs):
    return lambda dtype: StandInClip(dtype=dtype, **kwargs)


def test_every_check_passes_on_good_outputs():
    report = verify_models(models(), PHOTOS, other_clip=other_clip(noise=1e-4), random_weights=None)
    assert report.passed, report.summary()
    assert report.random_weights == {} and report.semantic_verified
    for check in ("load", "run", "caption", "clip-rank", "grounding", "precision"):
        assert statuses(report, check) == {PASS}, check
    assert len([c for c in report.checks if c.check == "caption"]) == N
    precision = next(c for c in report.checks if c.check == "precision")
    assert precision.values["half_dtype"] == "bfloat16"  # float32 runs, so the CPU's half is compared
    assert set(precision.values["by_kind"]) == {"image", "crop", "text"}
    assert "passed" in report.summary()
    json.dumps(report.to_dict(), allow_nan=False)


def test_each_semantic_check_fails_on_wrong_outputs():
    wrong = StandInCaptioner(["a plate of food"] * N)
    report = verify_models(models(clip=StandInClip(shift=1), captioner=wrong, grounder=StandInGrounder(offset=0.6)),
                           PHOTOS, other_clip=other_clip(shift=1), random_weights={})
    assert statuses(report, "caption") == {FAIL}
    assert statuses(report, "clip-rank") == {FAIL}
    assert statuses(report, "grounding") == {FAIL}
    assert statuses(report, "run") == {PASS} and statuses(report, "precision") == {PASS}
    assert not report.passed and "caption (astronaut)" in report.summary()
    missing = verify_models(models(grounder=StandInGrounder(found=False)), PHOTOS, other_clip=other_clip(),
                            random_weights={})
    assert statuses(missing, "grounding") == {FAIL}


def test_precision_fails_when_half_precision_disagrees():
    for bad in (other_clip(noise=0.5), other_clip(nan=True)):
        report = verify_models(models(), PHOTOS, other_clip=bad, random_weights={})
        assert statuses(report, "precision") == {FAIL} and not report.passed
    half = verify_models(models(clip=StandInClip(dtype="float16")), PHOTOS, other_clip=other_clip(),
                         random_weights={})
    precision = next(c for c in half.checks if c.check == "precision")
    assert precision.values["half_dtype"] == "float16"  # the precision extraction runs in is the one compared


def test_random_weights_excuse_only_the_semantic_checks():
    wrong = StandInCaptioner(["a plate of food"] * N, width=32)
    tiny = models(clip=StandInClip(shift=1, width=32), captioner=wrong, grounder=StandInGrounder(offset=0.6, width=32))
    assert set(random_roles(tiny)) == {"clip", "captioner", "grounder"}
    report = verify_models(tiny, PHOTOS, other_clip=other_clip(width=32, shift=1))
    for check in ("caption", "clip-rank", "grounding"):
        assert statuses(report, check) == {RANDOM}, check
    assert report.passed and not report.semantic_verified
    assert "nothing checked what the weights learned" in report.summary()
    # the non-semantic checks still decide
    broken = verify_models(tiny, PHOTOS, other_clip=other_clip(width=32, shift=1, nan=True))
    assert not broken.passed and [c.check for c in broken.failures] == ["precision"]
    # one random model excuses only its own check
    mixed = verify_models(models(captioner=wrong, clip=StandInClip(shift=1)), PHOTOS, other_clip=other_clip(shift=1),
                          random_weights={"captioner": "tiny"})
    assert statuses(mixed, "caption") == {RANDOM} and statuses(mixed, "clip-rank") == {FAIL}


def test_a_model_that_raises_fails_its_checks_and_the_others_still_run():
    report = verify_models(models(captioner=StandInCaptioner(RuntimeError("out of memory")),
                                  clip=StandInClip(raises=True)), PHOTOS, other_clip=other_clip(),
                           random_weights={})
    runs = {c.subject: c for c in report.checks if c.check == "run"}
    assert runs["captioner"].failed and "RuntimeError: out of memory" in runs["captioner"].measured
    assert runs["clip"].failed and statuses(report, "clip-rank") == {FAIL}
    assert statuses(report, "caption") == {FAIL} and statuses(report, "grounding") == {PASS}
    assert statuses(report, "precision") == {FAIL}


def test_adapters_without_a_model_are_not_applicable():
    report = verify_models(models(captioner=NoModel("provided"), grounder=NoModel("none")), PHOTOS,
                           other_clip=None, random_weights=None)
    assert statuses(report, "caption") == {NOT_APPLICABLE} and statuses(report, "grounding") == {NOT_APPLICABLE}
    assert statuses(report, "precision") == {NOT_APPLICABLE} and statuses(report, "clip-rank") == {PASS}
    assert report.passed


# -- the command -----------------------------------------------------------------------------------

def test_exit_code_is_documented():
    assert VerificationFailedError.exit_code == 10
    assert 10 in dict(EXIT_CODES)


def test_verify_on_the_tiny_bundle_says_the_semantic_checks_cannot_pass(tiny_preset):
    result = runner.invoke(app, ["models", "verify", "--preset", str(tiny_preset), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["random_weights"]) == {"clip", "captioner", "grounder"}
    assert all("make-tiny" in reason for reason in data["random_weights"].values())
    checks = data["checks"]
    for c in checks:
        if c["check"] in ("caption", "clip-rank", "grounding"):
            assert c["status"] == RANDOM, c
        else:
            assert c["status"] == PASS, c
    assert {c["check"] for c in checks} == {"load", "run", "caption", "clip-rank", "grounding", "precision"}
    assert data["passed"] is True and data["semantic_checks_verified"] is False
    precision = next(c for c in checks if c["check"] == "precision")
    assert precision["values"]["min_cosine"] >= MIN_COSINE
    table = runner.invoke(app, ["models", "verify", "--preset", str(tiny_preset), "--grounder", "none"])
    assert table.exit_code == 0, table.output
    assert "cannot pass" in table.stdout and "random weights" in table.stdout
    assert "not applicable" in table.stdout  # --grounder none: no grounding to check
    assert "nothing checked what the weights learned" in table.stdout


def test_verify_exits_10_when_a_check_fails(monkeypatch):
    import tidy_detect.models.verify as verify

    row = CheckResult("precision", "clip", FAIL, "float16 vs float32: min cos 0.5", "cos >= 0.99")
    failing = VerifyReport(checks=[row], device="cpu", dtype="float32")
    monkeypatch.setattr(verify, "run_verification", lambda config, **kwargs: failing)
    result = runner.invoke(app, ["models", "verify", "--grounder", "none"])
    assert result.exit_code == 10
    assert "model verification failed: precision (clip)" in result.output and "Traceback" not in result.output
    bad = runner.invoke(app, ["models", "verify", "--format", "csv"])
    assert bad.exit_code == 2 and "--format must be table or json" in bad.output


def test_readme_mentions_the_command():
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    assert "tidy-detect models verify" in readme
