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


# -- the GPU bench's code, run on the CPU with tiny architectures under the real names ----------

@pytest.fixture
def tiny_archs(tmp_path, monkeypatch):
    from tests.bench.tiny_archs import write_tiny_archs

    folder = write_tiny_archs(tmp_path / "archs")
    monkeypatch.setenv(archs.ARCH_DIR_ENV, str(folder))  # child processes inherit it
    return folder


def test_tiny_archs_replace_the_bundled_ones_by_name(tiny_archs):
    assert archs.arch_dir() == tiny_archs and "clip-vit-l-14" in archs.arch_names()
    model, processor = archs.build("clip-vit-l-14", dtype="bfloat16", device="cpu")
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and processor is not None


@pytest.mark.slow
def test_the_gpu_bench_runs_its_sections_on_the_cpu(tiny_archs):
    from tidy_detect.bench.gpu import format_gpu_report, run_gpu_bench

    said = []
    report = run_gpu_bench(["peak", "fast", "stages", "head", "switches"], device="cpu", images=2,
                           stages=["clip-vit-l-14"], head=(256, 16, 2), peak_size=128,
                           switches=["clip_cuda_graphs", "caption_static_cache"], say=said.append)
    assert set(report["peak"]) == {"bfloat16", "float32"} and all(v > 0 for v in report["peak"].values())
    stages = report["stages"]
    assert set(stages) == {"clip-vit-l-14@float32", "clip-vit-l-14@bfloat16"}
    for result in stages.values():
        assert result["images_per_second"] > 0 and result["gflop_per_image"] > 0
        assert result["fraction_of_peak"] == pytest.approx(result["gflops"] / report["peak"][result["dtype"]])
        assert result["memory_per_image_mib_measured"] is None  # device statistics exist on GPUs only
        assert result["memory_per_image_mib_computed"] > 0
    fast = report["fast"]["clip_bfloat16"]
    assert fast["global_only_images_per_second"] > 0 and fast["clip_image_images_per_second"] > 0
    assert report["head"]["device"] == "cpu" and report["head"]["rows"] == 256
    # CUDA graphs cannot run on the CPU: a switch that fails is recorded, and the bench goes on.
    assert "CUDA graphs need a CUDA device" in report["switches"]["clip_cuda_graphs"]["error"]
    assert report["switches"]["caption_static_cache"]["speedup"] > 0
    targets = report["targets"]
    assert targets["paper_images_per_second"]["met"] is None  # the pipeline was not run: not measured
    assert targets["head_seconds"]["measured"] == report["head"]["seconds"]
    text = format_gpu_report(report)
    assert "| clip-vit-l-14 | bfloat16 |" in text and "Switch clip_cuda_graphs: failed" in text
    assert set(report["section_seconds"]) == {"peak", "fast", "stages", "head", "switches"}


@pytest.mark.slow
def test_the_gpu_pipeline_compares_optimised_and_naive_runs_in_their_own_processes(tiny_archs):
    from tidy_detect.bench.gpu import Budget, _pipeline
    from tidy_detect.bench.run import preset_archs, synthetic_images

    found = _pipeline(synthetic_images(2), None, "bfloat16", "cpu", preset_archs("paper"), 1, Budget(None),
                      lambda message: None)
    assert found["archs"] == {"clip": "clip-vit-l-14", "captioner": "blip2-opt-2.7b",
                              "grounder": "grounding-dino-base"}
    assert found["optimized"]["dtypes"]["clip"] == "float32"  # the preset's precision policy
    assert found["optimized_clip_bfloat16"]["dtypes"]["clip"] == "bfloat16"
    assert found["naive"]["dtypes"] == {"clip": "float32", "captioner": "float32", "grounder": "float32"}
    assert found["naive"]["images"] == 1 and found["naive"]["batch_size"] == 1
    for name in ("optimized", "optimized_clip_bfloat16"):
        assert found[name]["speedup_over_naive"] == pytest.approx(
            found[name]["images_per_second"] / found["naive"]["images_per_second"])


def test_a_time_budget_skips_what_would_start_after_it():
    from tidy_detect.bench.gpu import Budget

    budget = Budget(0.0)
    assert not budget.allows("pipeline.naive", 60)
    assert budget.skipped[0]["what"] == "pipeline.naive" and "time budget" in budget.skipped[0]["why"]
    assert Budget(None).allows("anything", 1e9)


def test_targets_are_judged_on_this_runs_figures_only():
    from tidy_detect.bench.gpu import format_gpu_report, targets

    report = {"machine": {"device": "cuda:0", "gpu": "GPU", "gpu_memory_gib": 139.8, "multiprocessors": 132,
                          "torch": "2", "cuda": "13", "transformers": "5", "cpus": 16, "tf32_matmul": False},
              "preset": "paper", "objects_per_image": 4, "caption_tokens": 20,
              "peak": {"bfloat16": 780_000.0, "float16": 790_000.0, "float32": 50_000.0},
              "stages": {"clip-vit-l-14@bfloat16": {"arch": "clip-vit-l-14", "dtype": "bfloat16", "batch_size": 256,
                                                    "images_per_second": 2000.0, "gflop_per_image": 162.0,
                                                    "gflops": 324_000.0, "fraction_of_peak": 324_000 / 780_000,
                                                    "memory_per_image_mib_measured": 9.0,
                                                    "memory_per_image_mib_computed": 10.5}},
              "pipeline": {"optimized": {"images_per_second": 80.0, "speedup_over_naive": 25.0, "batch_size": 128,
                                         "dtypes": {"clip": "float32"}},
                           "optimized_clip_bfloat16": {"images_per_second": 120.0, "speedup_over_naive": 37.5,
                                                       "batch_size": 128, "dtypes": {"clip": "bfloat16"}},
                           "naive": {"images_per_second": 3.2, "batch_size": 1, "dtypes": {"clip": "float32"}}},
              "head": {"rows": 80000, "dim": 768, "epochs": 50, "precision": "bfloat16", "device": "cuda:0",
                       "seconds": 6.0}}
    found = targets(report)
    assert found["clip_fraction_of_bf16_peak"]["met"] is False
    assert found["paper_images_per_second"] == {"target": 100.0, "measured": 120.0, "met": True,
                                                "clip_dtype": "bfloat16"}
    assert found["paper_speedup_over_naive"]["met"] is True and found["head_seconds"]["met"] is False
    assert found["global_only_images_per_second"]["met"] is None  # not measured: neither met nor failed
    report["targets"] = found
    text = format_gpu_report(report)
    assert "GPU: GPU (140 GiB, 132 SMs)" in text and "| clip-vit-l-14 | bfloat16 | 256 | 2000.0 | – |" in text
    assert "| paper_images_per_second | 100 | 120 | yes |" in text
    assert "| global_only_images_per_second | 300 | not measured | – |" in text


def test_presets_map_to_bench_architectures():
    from tidy_detect.bench.run import preset_archs
    from tidy_detect.errors import ConfigError

    assert preset_archs("paper") == {"clip": "clip-vit-l-14", "captioner": "blip2-opt-2.7b",
                                     "grounder": "grounding-dino-base", "clip_dtype": "float32"}
    assert preset_archs("fast")["grounder"] is None
    with pytest.raises(ConfigError, match="--preset llava: its captioner 'llava-hf/llava-1.5-7b-hf' has no real-size"):
        preset_archs("llava")


def test_bench_cli_refuses_gpu_sections_on_the_cpu_and_a_missing_gpu():
    runner = CliRunner()
    bad = runner.invoke(app, ["bench", "--device", "cpu", "--sections", "switches"])
    assert bad.exit_code == 2 and "unknown section 'switches'" in bad.output
    if not torch.cuda.is_available():
        missing = runner.invoke(app, ["bench", "--device", "cuda"])
        assert missing.exit_code == 2 and "no CUDA GPU is visible" in missing.output
