"""Captioners: an image in, one clean sentence out. Each is one registered class.

``caption(images, given)`` takes a batch of RGB PIL images (and, for ``provided``, the captions
from the manifest) and returns one caption per image: decoding is deterministic (greedy or beam
search, no sampling), the prompt and special tokens are removed.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from PIL import Image

import logging

from tidy_detect.config import FeatureConfig
from tidy_detect.errors import InputError
from tidy_detect.models.device import floating_to, run_guarded
from tidy_detect.models.loading import prepare_model, revision_of, torch_dtype
from tidy_detect.models.memory import StageMemory, captioner as captioner_memory
from tidy_detect.models.tiny import has_random_weights
from tidy_detect.models.components import CAPTIONERS

log = logging.getLogger(__name__)

LLAVA_PROMPT = "Please generate a one-sentence caption for the input image."

# BLIP-large sometimes opens captions with these non-words (a known decoding artifact of the
# released checkpoint); they are not objects and would reach the phrase extractor otherwise.
_ARTIFACT_WORDS = re.compile(r"\b(?:arafed|araffe|arafe|arrafed|araffed|arafly)\b\s*", re.IGNORECASE)
_ROLE_PREFIX = re.compile(r"^\s*(?:assistant|answer|caption)\s*:\s*", re.IGNORECASE)


def clean_caption(text: str, prompt: str | None = None) -> str:
    """One clean sentence: no echoed prompt, role prefix, artifact words or extra whitespace."""
    text = text.strip()
    if prompt and text.lower().startswith(prompt.strip().lower()):
        text = text[len(prompt.strip()):]
    text = _ROLE_PREFIX.sub("", text)
    text = text.splitlines()[0] if text.strip() else ""
    text = _ARTIFACT_WORDS.sub("", text)
    text = re.sub(r"\s+", " ", text).strip().strip('"').strip()
    return text


class _HFCaptioner:
    """Shared preprocess -> generate -> decode for transformers captioners.

    ``max_batch`` caps the images of one ``generate`` (None: the whole batch; the extractor sets
    it from the device's memory, see :mod:`tidy_detect.models.memory`). ``static_cache`` asks
    ``generate`` for a static KV cache where transformers supports one for the model (on CUDA
    transformers then compiles the decoding step); elsewhere the dynamic cache stays, with one
    log line. Either cache gives the same tokens.
    """

    requires_caption = False
    model_class = ""
    default_prompt: str | None = None

    def __init__(self, name: str, source: str, *, features: FeatureConfig, device: str, dtype: str,
                 optimize: bool = True, components: tuple[Any, Any] | None = None,
                 static_cache: bool = False) -> None:
        self.name = name
        self.source = source
        self.device = device
        self.dtype = dtype
        self.max_tokens = features.caption_max_tokens
        self.min_tokens = 0  # benchmarks fix the caption length to compare runs
        self.num_beams = features.caption_num_beams
        self.prompt = features.caption_prompt if features.caption_prompt is not None else self.default_prompt
        self.max_batch: int | None = None
        self.model, self.processor, self.fingerprint = prepare_model(
            self.model_class, source, what="captioner model", option="--captioner-model", device=device, dtype=dtype,
            optimize=optimize, components=components)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            # Decoder-only models continue the prompt: pad on the left so every row ends at its prompt.
            tokenizer.padding_side = "left"
        self.static_cache = bool(static_cache) and self.supports_static_cache()

    def supports_static_cache(self) -> bool:
        """Whether transformers can generate with a static KV cache for this model (its
        ``_can_compile_fullgraph``: BLIP-2 and LLaVA yes, BLIP no); logs when it cannot."""
        if getattr(type(self.model), "_can_compile_fullgraph", False):
            return True
        log.info("%s cannot generate with a static KV cache in transformers; the dynamic cache is used",
                 type(self.model).__name__)
        return False

    def memory(self) -> StageMemory:
        """Device memory per image of one ``generate`` (see :mod:`tidy_detect.models.memory`)."""
        tokenizer = getattr(self.processor, "tokenizer", None)
        prompt_tokens = len(tokenizer(self.prompt)["input_ids"]) if self.prompt and tokenizer is not None else 0
        config = self.model.config
        sdpa = getattr(config, "_attn_implementation", None) == "sdpa"
        return captioner_memory(config, config.model_type, self.dtype, new_tokens=self.max_tokens,
                                prompt_tokens=prompt_tokens, beams=self.num_beams, sdpa=sdpa)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "model_type": self.model.config.model_type,
                "revision": revision_of(self.model), "weights": self.fingerprint,
                "random_weights": has_random_weights(self.model, self.source), "prompt": self.prompt,
                "max_tokens": self.max_tokens, "num_beams": self.num_beams}

    def inputs(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        """Preprocess: model inputs for a batch."""
        if self.prompt:
            return self.processor(images=list(images), text=[self.prompt] * len(images), padding=True,
                                  return_tensors="pt")
        return self.processor(images=list(images), return_tensors="pt")

    def prepare(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        """Preprocess ahead of time (in a worker thread): the model inputs of :meth:`inputs` as
        CPU tensors, for :meth:`caption`'s ``prepared``."""
        return {k: v for k, v in self.inputs(images).items() if hasattr(v, "to")}

    def caption(self, images: Sequence[Image.Image], given: Sequence[str | None] | None = None,
                prepared: dict[str, Any] | None = None) -> list[str]:
        """One caption per image, in order.

        Args:
            images: the batch.
            given: captions supplied with the inputs (used by ``provided`` only).
            prepared: :meth:`prepare`'s tensors for these images (on the CPU or the device).

        Raises:
            DeviceMemoryError: a ``generate`` ran out of device memory.
        """
        import torch

        if not images:
            return []
        inputs = prepared if prepared is not None else self.prepare(images)
        dtype = torch_dtype(self.dtype)
        inputs = {k: floating_to(v, self.device, dtype) for k, v in inputs.items()}
        step = self.max_batch or len(images)
        texts: list[str] = []
        for start in range(0, len(images), step):
            chunk = {k: v[start:start + step] for k, v in inputs.items()}
            texts.extend(run_guarded(self._generate, chunk, stage="caption", device=self.device,
                                     batch=min(step, len(images) - start), what=f"{self.name}, {self.dtype}",
                                     lower=f"--batch-size (now {len(images)})"))
        return [clean_caption(t, self.prompt) for t in texts]

    def _generate(self, inputs: dict[str, Any]) -> list[str]:
        import torch

        extra = {"cache_implementation": "static"} if self.static_cache else {}
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_tokens, min_new_tokens=self.min_tokens,
                                      num_beams=self.num_beams, do_sample=False, **extra)
        prompt_ids = inputs.get("input_ids")
        if prompt_ids is not None and out.shape[1] >= prompt_ids.shape[1] and \
                torch.equal(out[:, :prompt_ids.shape[1]].cpu(), prompt_ids.cpu()):
            out = out[:, prompt_ids.shape[1]:]  # the model echoed its prompt
        return self.processor.batch_decode(out.cpu(), skip_special_tokens=True)


@CAPTIONERS.register("blip2", default_model="Salesforce/blip2-opt-2.7b", model_types=("blip-2",),
                     description="BLIP-2 (the paper's captioner: blip2-opt-2.7b)")
class Blip2Captioner(_HFCaptioner):
    model_class = "Blip2ForConditionalGeneration"


@CAPTIONERS.register("blip", default_model="Salesforce/blip-image-captioning-large", model_types=("blip",),
                     description="BLIP captioning (large)")
class BlipCaptioner(_HFCaptioner):
    model_class = "BlipForConditionalGeneration"


@CAPTIONERS.register("llava", default_model="llava-hf/llava-1.5-7b-hf", model_types=("llava",),
                     description="LLaVA-1.5 with the paper's one-sentence caption prompt")
class LlavaCaptioner(_HFCaptioner):
    model_class = "LlavaForConditionalGeneration"
    default_prompt = LLAVA_PROMPT

    def inputs(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        text = f"USER: <image>\n{self.prompt} ASSISTANT:"
        return self.processor(images=list(images), text=[text] * len(images), padding=True, return_tensors="pt")


@CAPTIONERS.register("provided", default_model=None, description="captions given in the manifest's caption column")
class ProvidedCaptioner:
    """Uses the captions supplied with the inputs; images without one are errors."""

    requires_caption = True

    def __init__(self, name: str, source: str | None, *, features: FeatureConfig, device: str, dtype: str,
                 **_: Any) -> None:
        self.name = name

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": None, "model_type": None, "weights": None, "random_weights": False}

    def caption(self, images: Sequence[Image.Image], given: Sequence[str | None] | None = None,
                prepared: Any = None) -> list[str]:
        given = list(given or [None] * len(images))
        missing = [i for i, text in enumerate(given) if not (text and text.strip())]
        if missing:
            raise InputError(f"captioner 'provided' needs a caption for every image; {len(missing)} have none "
                             f"(give them in the manifest's 'caption' column)")
        return [clean_caption(t) for t in given]


def build_captioner(value: str, model: str | None, *, features: FeatureConfig, device: str, dtype: str,
                    optimize: bool = True, static_cache: bool = False) -> Any:
    """The captioner for ``--captioner value [--captioner-model model]``.

    Raises:
        UnknownNameError: an unknown captioner. ModelLoadError: its checkpoint cannot be loaded.
    """
    component, source = CAPTIONERS.resolve(value, model)
    extra = {"static_cache": True} if static_cache else {}
    return component.factory(component.name, source, features=features, device=device, dtype=dtype, optimize=optimize,
                             **extra)
