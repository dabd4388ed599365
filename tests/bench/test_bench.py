"""The benchmark harness: architectures match the published sizes; each section runs (small)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from typer.testing import CliRunner

from tidy_detect.bench import archs
from tidy_detect.bench.run import bench_eval, bench_head, bench_stage, format_report, synthetic_images
from tidy_detect.cli import app

# Parameter counts of the published checkpoints (millions), to one decimal of a percent.
PUBLISHED = {"clip-vit-l-14": 427.6, "clip-vit-b-16": 149.6, "blip2-opt-2.7b": 3744.7, "grounding-dino-base": 232.3,
             "grounding-dino-tiny": 172.3, "owlv2-base": 155.0, "blip-large": 446.3}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_architectures_have_the_published_size(name):
    spec = archs.arch_spec(name)
    cls = getattr(transformers, spec["class"])
    with torch.device("meta"):
        model = cls(cls.config_class(**spec["config"]))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(PUBLISHED[name], rel=1e-3)


def test_stage_runs_and_counts_flops():
    result = bench_stage("clip-vit-b-16", synthetic_images(2, size=64), batch_size=2, dtype="float32")
    # ViT-B/16 at 224: about 2 x 86M parameters x 197 tokens plus attention, ~35 GFLOP per image
    assert 25 < result["gflop_per_image"] < 45
    assert result["images_per_second"] > 0 and result["texts_per_second"] > 0
    assert result["gflops_plain"] > 0  # the optimised and plain towers were both timed


def test_head_and_eval_sections_small(tmp_path):
    head = bench_head(rows=512, dim=32, epochs=2)
    assert head["seconds"] > 0 and head["precision"] in ("float32", "bfloat16")
    result = bench_eval(rows=3000, workdir=tmp_path)
    assert result["rows_scored"] == 3000 and result["groups"] == 16 and result["peak_rss_mb"] > 0


def test_report_formatting():
    report = {"machine": {"cpus": 2, "torch": "2", "torch_threads": 2, "dtype": "bfloat16"},
              "peak": {"bfloat16": 1000.0, "float32": 300.0},
              "stages": {"clip-vit-l-14": {"batch_size": 8, "images_per_second": 5.0, "gflop_per_image": 160.0,
                                           "gflops": 800.0, "fraction_of_peak": 0.8, "texts_per_second": 50.0,
                                           "nearby_peak": 1600.0, "fraction_of_nearby_peak": 0.5}},
              "pipeline": {"images": 8, "objects_per_image": 4, "caption_tokens": 20, "optimized_images_per_second": 1.0,
                           "naive_images_per_second": 0.1, "speedup": 10.0, "optimized_stage_seconds": {},
                           "optimized_peak_rss_mb": 5000.0, "naive_peak_rss_mb": 6000.0},
              "fast": {"global_only_seconds": 1.1, "clip_image_seconds": 0.5, "caption_seconds": 0.5, "ratio": 1.1},
              "head": {"rows": 80000, "dim": 768, "epochs": 50, "precision": "bfloat16", "seconds": 30.0},
              "eval": {"rows": 1000000, "store_gb": 6.2, "seconds": 60.0, "peak_rss_mb": 900.0},
              "peak_rss_mb": 1234.0}
    text = format_report(report)
    assert "| clip-vit-l-14 | 8 | 5.00 (texts: 50.0/s) | 160 | 800 | 80% | 50% (1600) |" in text
    assert "Peak memory: optimised 5000 MB, naive 6000 MB" in text
    assert "**10.0x**" in text and "**1.10x**" in text and "**30.0 s**" in text and "**900 MB**" in text


def test_bench_cli_validates_and_writes_json(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["bench", "--sections", "gpu"])
    assert bad.exit_code == 2 and "unknown section 'gpu'" in bad.output
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench", "--sections", "peak", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["peak"]["bfloat16"] > 0 and "Matmul peak measured in this run" in result.output


def test_nearby_peak_is_a_rate():
    from tidy_detect.bench.run import nearby_peak

    assert nearby_peak("float32", repeats=1) > 1.0  # GFLOP/s: any machine that runs the tests beats 1


def test_pipeline_run_refuses_an_unknown_mode():
    from tidy_detect.bench.run import pipeline_run

    with pytest.raises(ValueError, match="mode must be 'optimized' or 'naive', got 'fast'"):
        pipeline_run("fast", 1, 1, "float32")
