"""The CUDA path's code as far as the CPU runs it: transfers, out-of-memory errors, the memory
model, inputs prepared ahead, batch chunking, the static cache, the switches' guards. What needs
a GPU is in test_cuda.py (marked ``cuda``)."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import numpy as np
import pytest
import torch

from tidy_detect.config import CPU_BATCH_SIZE, ExtractionConfig, FeatureConfig, RuntimeConfig, load_preset, parse_devices
from tidy_detect.data.inputs import ImageItem
from tidy_detect.errors import ConfigError
from tidy_detect.features.extractor import Extractor, extract, rows_for_batch, ExtractionSummary
from tidy_detect.images import LoadedImage
from tidy_detect.models import memory
from tidy_detect.models.device import (DeviceMemoryError, GraphedCall, graph_batch, pack, run_guarded, to_device,
                                       unpack)
from tidy_detect.models.optimize import runs_on

from tests.conftest import make_tree, random_image


@pytest.fixture(scope="module")
def extractor(tiny_bundle):
    config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 4})
    return Extractor(config).load()


def _loaded(images):
    return [LoadedImage(im, f"{k:064x}", im.width, im.height, "PNG", 0) for k, im in enumerate(images)]


def _images(n, seed=0, sizes=None):
    rng = np.random.default_rng(seed)
    sizes = sizes or [(int(rng.integers(30, 90)), int(rng.integers(30, 90))) for _ in range(n)]
    return [random_image(rng, w, h) for w, h in sizes]


def _same_rows(a, b, exact=True):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("path", "caption", "phrases", "object_phrases", "boxes", "box_scores", "local_fallback"):
            assert x[key] == y[key], key
        for key in ("global_image", "global_text", "local_images", "local_texts"):
            if exact:
                np.testing.assert_array_equal(x[key], y[key])
            else:
                np.testing.assert_allclose(x[key], y[key], rtol=1e-5, atol=1e-6)


# -- transfers -----------------------------------------------------------------------------------

def test_pack_and_unpack_keep_every_dtype_and_shape_bit_for_bit():
    tensors = {"pixels": torch.randn(3, 5, 7), "ids": torch.arange(11), "half": torch.randn(2, 3).to(torch.bfloat16),
               "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "bytes": torch.arange(5).byte()}
    flat, slots = pack(tensors)
    assert flat.dtype == torch.uint8 and flat.dim() == 1
    assert all(slot.offset % 64 == 0 for slot in slots)
    back = unpack(flat, slots)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor)
    # Views of the one buffer: writing through the buffer shows in the tensors.
    flat.zero_()
    assert not back["pixels"].any()


def test_to_device_on_the_cpu_moves_nothing():
    tensors = {"a": torch.randn(4, 3), "b": torch.arange(4)}
    moved = to_device(tensors, "cpu")
    ready = moved.ready()
    assert moved.event is None and all(ready[k] is tensors[k] or torch.equal(ready[k], tensors[k]) for k in tensors)


# -- out of memory -------------------------------------------------------------------------------

def test_out_of_memory_becomes_a_project_error_naming_the_stage_and_what_to_lower():
    def forward():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(DeviceMemoryError) as caught:
        run_guarded(forward, stage="ground", device="cpu", batch=64, what="grounding-dino, bfloat16",
                    lower="--batch-size (now 64)")
    message = str(caught.value)
    assert "ground stage" in message and "64 per pass" in message and "lower --batch-size (now 64)" in message
    assert "nothing was retried" in message and "Tried to allocate 20.00 GiB" in message
    assert isinstance(caught.value, ConfigError) and caught.value.exit_code == 2


def test_out_of_memory_error_keeps_no_activation_of_the_failed_forward_alive():
    holder = {}

    def forward():
        activation = torch.empty(1024)
        holder["ref"] = weakref.ref(activation)
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(DeviceMemoryError):
        run_guarded(forward, stage="caption", device="cpu", batch=1, what="x", lower="--batch-size")
    gc.collect()
    assert holder["ref"]() is None


def test_other_errors_pass_through_unchanged():
    def forward():
        raise ValueError("a model error")

    with pytest.raises(ValueError, match="a model error"):
        run_guarded(forward, stage="clip image", device="cpu", batch=1, what="x", lower="--batch-size")


def test_a_run_that_runs_out_of_device_memory_stops_without_retrying_image_by_image(extractor, tmp_path, monkeypatch):
    root = tmp_path / "tree"
    make_tree(root, {"gen": 3})
    calls = []

    def caption(images, given=None, prepared=None):
        calls.append(len(images))
        return run_guarded(lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")),
                           stage="caption", device="cpu", batch=len(images), what="blip2, float32",
                           lower="--batch-size (now 4)")

    monkeypatch.setattr(extractor.captioner, "caption", caption)
    with pytest.raises(DeviceMemoryError, match="caption stage"):
        extract([root], tmp_path / "store", extractor=extractor)
    assert calls == [4]  # the first batch once: no image-by-image retries
    from tidy_detect.features.store import FeatureStore

    assert FeatureStore(tmp_path / "store").config["runs"][-1]["status"] == "failed"


# -- memory model and batch sizes ----------------------------------------------------------------

def test_a_transformer_layer_is_counted_as_written():
    # 257 tokens x (6 x 1024 + 4096) values x 2 bytes, plus 16 heads x 257^2 twice for eager attention.
    assert memory.vit_layer_bytes(257, 1024, 4096, 16, 2, sdpa=True) == 257 * (6 * 1024 + 4096) * 2
    assert memory.vit_layer_bytes(257, 1024, 4096, 16, 2, sdpa=False) == (257 * (6 * 1024 + 4096)
                                                                         + 2 * 16 * 257 * 257) * 2


def test_the_paper_models_memory_per_item_from_their_architectures():
    from tidy_detect.bench.gpu import computed_memory

    table = computed_memory()
    mib = {name.split(" (")[0]: row["per_item_mib"] for name, row in table.items()}
    # ViT-L/14 at 224 px: 257 tokens x (6 x 1024 + 4096) x 4 bytes = 10.5 MB.
    assert mib["clip image"] == pytest.approx(257 * (6 * 1024 + 4096) * 4 / 2 ** 20, rel=1e-3)
    # BLIP-2: the OPT-2.7B KV cache alone is 2 x 32 layers x (32 + 30) positions x 2560 x 2 bytes = 19.4 MiB.
    assert mib["caption"] > 2 * 32 * 62 * 2560 * 2 / 2 ** 20
    assert mib["ground"] > mib["caption"] > mib["clip image"] > mib["clip text"] > 0
    assert all(row["kind"].startswith("computed") for row in table.values())


def test_plan_batches_fills_the_share_of_free_memory_and_keeps_every_stage_whole():
    stages = {"caption": memory.StageMemory("caption", 100, ""), "ground": memory.StageMemory("ground", 400, ""),
              "clip image": memory.StageMemory("clip image", 10, "")}
    plan = memory.plan_batches(stages, 10_000, items_per_image={"clip image": 5}, fraction=0.5, max_batch=128)
    # 5,000 bytes: 50 captions, 12 groundings, 500 crops (100 images of 5 items): the batch is 12.
    assert plan == {"caption": 50, "ground": 12, "clip image": 500, "batch": 12}
    assert memory.plan_batches(stages, 0)["batch"] == 1  # never below one
    assert memory.plan_batches(stages, 10 ** 15)["batch"] == memory.MAX_AUTO_BATCH  # capped


def test_the_cpu_batch_size_stays_8_unless_given(tiny_bundle):
    config = load_preset(tiny_bundle / "tiny.toml")
    assert config.runtime.batch_size is None
    extractor = Extractor(config)
    assert extractor.batch_size == CPU_BATCH_SIZE
    given = Extractor(config.updated(runtime={"batch_size": 5}))
    assert given.batch_size == 5
    assert given.config.runtime.batch_size == 5


def test_runtime_options_of_the_gpu_path_validate_themselves():
    assert RuntimeConfig(devices=["cpu", "cuda:1"]).devices == ("cpu", "cuda:1")
    assert RuntimeConfig(devices="cuda:0, cuda:1").devices == ("cuda:0", "cuda:1")
    assert parse_devices("cuda:0,,cpu") == ("cuda:0", "cpu")
    with pytest.raises(ConfigError, match="runtime.devices must list cpu, cuda or cuda:N devices, got 'gpu0'"):
        RuntimeConfig(devices=("gpu0",))
    with pytest.raises(ConfigError, match="were both given"):
        RuntimeConfig(device="cuda:0", devices=("cuda:1",))
    with pytest.raises(ConfigError, match="runtime.prepare_ahead must be one of auto, on, off"):
        RuntimeConfig(prepare_ahead="always")
    with pytest.raises(ConfigError, match="runtime.static_cache must be true or false"):
        RuntimeConfig(static_cache="yes")
    with pytest.raises(ConfigError, match="runtime.batch_size must be >= 1 or unset"):
        RuntimeConfig(batch_size=0)
    data = ExtractionConfig.from_dict({"runtime": {"devices": ["cuda:0", "cuda:1"], "cuda_graphs": True}})
    assert data.runtime.devices == ("cuda:0", "cuda:1") and data.runtime.cuda_graphs


def test_speedups_are_decided_per_device():
    assert all(runs_on(name, "cpu") for name in ("quick-gelu-folding", "fused-linear-activation", "malloc",
                                                  "swin-layer", "blip-attention"))
    assert runs_on("blip-attention", "cuda:0")
    assert not any(runs_on(name, "cuda") for name in ("quick-gelu-folding", "fused-linear-activation", "malloc",
                                                       "swin-layer", "grounding-dino-deformable-attention"))
    with pytest.raises(ValueError, match="unknown speed-up 'warp'"):
        runs_on("warp", "cpu")


# -- inputs prepared ahead -----------------------------------------------------------------------

def test_rows_prepared_ahead_are_the_rows_made_inline(extractor):
    images = _loaded(_images(4, seed=1))
    items = [ImageItem(f"/x/{k}.png") for k in range(4)]
    inline = extractor.process(items, images)
    prepared = extractor.prepare(images)
    assert set(prepared.inputs.tensors) >= {"caption.pixel_values", "clip.global", "ground.0.pixel_values"}
    assert prepared.inputs.tensors["clip.global"].dtype == torch.uint8
    _same_rows(extractor.process(items, images, prepared=prepared), inline)


def test_a_part_of_a_prepared_batch_gives_the_rows_of_that_part(extractor):
    # Images of three aspect ratios: the grounder prepares them in three input sizes.
    images = _loaded(_images(5, seed=2, sizes=[(60, 40), (40, 60), (60, 40), (50, 50), (40, 60)]))
    items = [ImageItem(f"/x/{k}.png") for k in range(5)]
    prepared = extractor.prepare(images)
    assert len(prepared.ground_groups) == 3
    part = [0, 2, 4]
    inline = extractor.process([items[k] for k in part], [images[k] for k in part])
    _same_rows(extractor.process([items[k] for k in part], [images[k] for k in part], prepared=prepared), inline)
    # An image the batch was not prepared for: the inputs are made inline.
    other = _loaded(_images(1, seed=9))
    assert prepared.select(other) is None


def test_a_batch_with_bad_images_and_duplicates_keeps_them_apart_when_prepared(extractor):
    from tidy_detect.errors import CorruptImageError

    images = _loaded(_images(3, seed=3))
    items = [ImageItem(f"/x/{k}.png") for k in range(4)]
    batch = [(items[0], images[0], 0.0), (items[1], CorruptImageError("/x/1.png: broken"), 0.0),
             (items[2], images[1], 0.0), (items[3], images[2], 0.0)]
    prepared = extractor.prepare(images)
    with_inputs = rows_for_batch(extractor, batch, ExtractionSummary(total=4), prepared=prepared)
    without = rows_for_batch(extractor, batch, ExtractionSummary(total=4))
    assert [r["error_kind"] for r in with_inputs] == [None, "corrupt", None, None]
    _same_rows([r for r in with_inputs if r["error"] is None], [r for r in without if r["error"] is None])


def test_extraction_prepared_ahead_writes_the_same_store(tiny_bundle, tmp_path):
    root = tmp_path / "tree"
    make_tree(root, {"a": 3, "b": 2})
    rows = {}
    for mode in ("off", "on"):
        config = load_preset(tiny_bundle / "tiny.toml").updated(runtime={"batch_size": 3, "prepare_ahead": mode})
        extractor = Extractor(config).load()
        assert extractor.prepares_ahead == (mode == "on")
        summary = extract([root], tmp_path / mode, extractor=extractor)
        assert summary.processed == 10
        from tidy_detect.features.store import FeatureStore

        store = FeatureStore(tmp_path / mode)
        rows[mode] = sorted(store.rows(), key=lambda r: r["path"])
        assert store.config["runs"][-1]["prepare_ahead"] == (mode == "on")
        extractor.close()
    _same_rows(rows["on"], rows["off"])


# -- stage batches, the CLIP global view, the switches -------------------------------------------

def test_passes_cut_to_the_stage_limits_give_the_same_results(extractor):
    images = _loaded(_images(5, seed=4))
    items = [ImageItem(f"/x/{k}.png") for k in range(5)]
    whole = extractor.process(items, images)
    saved = (extractor.captioner.max_batch, extractor.grounder.max_batch, extractor.clip.max_batch)
    try:
        extractor.captioner.max_batch, extractor.grounder.max_batch, extractor.clip.max_batch = 2, 2, 3
        _same_rows(extractor.process(items, images), whole, exact=False)
    finally:
        extractor.captioner.max_batch, extractor.grounder.max_batch, extractor.clip.max_batch = saved


def test_the_8_bit_global_view_is_normalised_to_the_same_values(extractor):
    clip = extractor.clip
    views = _images(3, seed=5)
    uint8 = clip.global_view_uint8(views)
    assert uint8.dtype == np.uint8 and uint8.shape == (3, clip.view_size, clip.view_size, 3)
    np.testing.assert_array_equal(clip._device_pixels(uint8).numpy(), clip.global_pixels(views))
    np.testing.assert_array_equal(clip.encode_pixels(uint8), clip.encode_pixels(clip.global_pixels(views)))


def test_crops_preprocessed_in_threads_are_the_same(extractor):
    from concurrent.futures import ThreadPoolExecutor

    crops = _images(40, seed=6)
    with ThreadPoolExecutor(4) as pool:
        np.testing.assert_array_equal(extractor.clip.crop_pixels(crops, pool.map), extractor.clip.crop_pixels(crops))


def test_the_static_kv_cache_gives_the_same_captions_where_transformers_has_one(tiny_bundle):
    from tidy_detect.models.captioners import build_captioner

    features = FeatureConfig(caption_max_tokens=12)
    images = _images(3, seed=7)
    dynamic = build_captioner("blip2", str(tiny_bundle / "blip2"), features=features, device="cpu", dtype="float32")
    static = build_captioner("blip2", str(tiny_bundle / "blip2"), features=features, device="cpu", dtype="float32",
                             static_cache=True)
    assert static.static_cache and not dynamic.static_cache
    assert static.caption(images) == dynamic.caption(images)
    blip = build_captioner("blip", str(tiny_bundle / "blip"), features=features, device="cpu", dtype="float32",
                           static_cache=True)
    assert not blip.static_cache  # BLIP cannot: its dynamic cache is kept


def test_cuda_graphs_are_refused_off_cuda_and_bucket_batches():
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device, got 'cpu'"):
        GraphedCall(lambda x: x, "cpu")
    assert [graph_batch(n, 64) for n in (1, 2, 3, 5, 33, 64, 100)] == [1, 2, 4, 8, 64, 64, 100]


def test_the_run_records_the_gpu_choices(extractor):
    info = extractor.runtime_info()
    assert info["batch_size"] == 4 and info["batch_size_given"] is True
    assert set(info["stage_batches"]) == {"caption", "ground", "clip"}
    assert info["prepare_ahead"] is False and info["static_cache"] is False and info["cuda_graphs"] is False
    assert set(info["attention"]) == {"clip", "captioner", "grounder"}
    assert info["memory_plan"] is None  # planned from free memory on GPUs only
