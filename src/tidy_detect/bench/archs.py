"""Real-size model architectures with random weights, built offline from bundled configs.

Compute does not depend on weight values, so these measure the speed of the real checkpoints
(``archs/*.json`` copy the published architectures' sizes) without downloading them. Processors
use the real image sizes and a small offline tokenizer; ids the tokenizer does not know decode to
its unknown token (random weights produce arbitrary ids).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tidy_detect.errors import UnknownNameError

ARCH_DIR = Path(__file__).parent / "archs"
# A folder of architecture specs to bench instead of the bundled ones (the tests point it at tiny
# versions under the same names, so every section runs in seconds; child processes inherit it).
ARCH_DIR_ENV = "TIDY_DETECT_BENCH_ARCHS"


def arch_dir() -> Path:
    """The folder the specs are read from: ``$TIDY_DETECT_BENCH_ARCHS`` if set, else the bundled one."""
    override = os.environ.get(ARCH_DIR_ENV, "").strip()
    return Path(override) if override else ARCH_DIR


def arch_names() -> list[str]:
    return sorted(p.stem for p in arch_dir().glob("*.json"))


def arch_spec(name: str) -> dict[str, Any]:
    """The spec ``archs/NAME.json``: transformers class, config, processor sizes.

    Raises:
        UnknownNameError: no such architecture (the message lists the known ones).
    """
    path = arch_dir() / f"{name}.json"
    if not path.is_file():
        raise UnknownNameError(f"Unknown architecture {name!r}. Known: {', '.join(arch_names())}.")
    return json.loads(path.read_text(encoding="utf-8"))


class ClampingProcessor:
    """A processor whose ``batch_decode`` maps ids beyond the tokenizer to its unknown token."""

    def __init__(self, processor: Any) -> None:
        self._processor = processor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._processor(*args, **kwargs)

    def batch_decode(self, ids: Any, **kwargs: Any) -> list[str]:
        tokenizer = self._processor.tokenizer
        limit = len(tokenizer)
        unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
        clamped = ids.clone()
        clamped[clamped >= limit] = unk
        return self._processor.batch_decode(clamped, **kwargs)


def _fill_random(model: Any, seed: int) -> None:
    """N(0, 0.02) matrices, unit norm scales and zero biases: realistic magnitudes, no NaN or
    denormals (either could change the speed), quick even for billions of parameters (drawn on
    the device the parameters are on)."""
    import torch

    generators: dict[Any, Any] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            generator = generators.get(param.device)
            if generator is None:
                generator = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            if param.dim() >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()


def build_model(name: str, *, dtype: str = "float32", seed: int = 0, config_overrides: dict[str, Any] | None = None,
                device: str = "cpu") -> Any:
    """The architecture ``name`` with random weights, in ``dtype``, in eval mode, built straight
    on ``device`` (a 3.7-billion-parameter BLIP-2 is drawn there in seconds, never copied).

    Raises:
        UnknownNameError: an unknown architecture.
    """
    import torch
    import transformers

    spec = arch_spec(name)
    model_class = getattr(transformers, spec["class"])
    config_class = model_class.config_class
    config = config_class(**{**spec["config"], **(config_overrides or {})})
    previous = torch.get_default_dtype()
    torch.set_default_dtype({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    try:
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # older transformers: plain (slower) initialisation
            import contextlib

            no_init_weights = contextlib.nullcontext
        with no_init_weights(), torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    _fill_random(model, seed)
    return model.eval()


def build_processor(name: str, *, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """The processor for ``name`` at its real image size, and config values it implies."""
    from transformers import (Blip2Processor, BlipImageProcessorPil, BlipProcessor, CLIPProcessor,
                              GroundingDinoImageProcessorPil, GroundingDinoProcessor, Owlv2ImageProcessorPil,
                              Owlv2Processor)

    from tidy_detect.models import tiny

    spec = arch_spec(name)
    size = spec["processor"]
    words = tiny.load_words()
    kind = spec["class"]
    if kind == "CLIPModel":
        return CLIPProcessor(image_processor=tiny._clip_image_processor(size["image_size"]),
                             tokenizer=tiny._clip_tokenizer(words, seed)), {}
    if kind == "BlipForConditionalGeneration":
        tokenizer = tiny._bert_tokenizer(words, seed, model_max_length=512, bos_token="[DEC]")
        image = BlipImageProcessorPil(size={"height": size["image_size"], "width": size["image_size"]})
        return ClampingProcessor(BlipProcessor(image_processor=image, tokenizer=tokenizer)), {}
    if kind == "Blip2ForConditionalGeneration":
        tokenizer = tiny._opt_tokenizer(words, seed)
        image = BlipImageProcessorPil(size={"height": size["image_size"], "width": size["image_size"]})
        processor = Blip2Processor(image_processor=image, tokenizer=tokenizer,
                                   num_query_tokens=spec["config"]["num_query_tokens"])
        return ClampingProcessor(processor), {"image_token_index": tokenizer.convert_tokens_to_ids("<image>")}
    if kind == "GroundingDinoForObjectDetection":
        image = GroundingDinoImageProcessorPil(size={"shortest_edge": size["shortest_edge"],
                                                     "longest_edge": size["longest_edge"]})
        return GroundingDinoProcessor(image_processor=image,
                                      tokenizer=tiny._bert_tokenizer(words, seed, model_max_length=256)), {}
    if kind == "Owlv2ForObjectDetection":
        image = Owlv2ImageProcessorPil(size={"height": size["image_size"], "width": size["image_size"]})
        return Owlv2Processor(image_processor=image,
                              tokenizer=tiny._clip_tokenizer(words, seed, pad_token="!", model_max_length=16)), {}
    raise UnknownNameError(f"no processor recipe for {kind}")


def build(name: str, *, dtype: str = "float32", seed: int = 0, device: str = "cpu") -> tuple[Any, Any]:
    """(model, processor) of a real-size architecture with random weights, on ``device``."""
    processor, overrides = build_processor(name, seed=seed)
    return build_model(name, dtype=dtype, seed=seed, config_overrides=overrides, device=device), processor
