"""Typed, frozen configuration objects. Each validates itself when built.

``ExtractionConfig`` holds what a user chooses for extraction; ``models``/``features`` change the
features (they are fingerprinted into every store), ``runtime`` only changes where and how fast
the work runs. Presets are TOML files with the same three tables.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from tidy_detect.errors import ConfigError, UnknownNameError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "presets"

GLOBAL_VIEWS = ("center-crop", "clip")
# How a grounder scores a caption phrase against a box; see tidy_detect.models.grounders.
GROUNDING_RULES = ("span-mean", "token-max")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODEL_KINDS = ("clip", "captioner", "grounder")  # the models whose precision is chosen one by one
# Whether the next batch's model inputs are prepared and sent to the device during the current one.
PREPARE_AHEAD = ("auto", "on", "off")
# Images per model batch on the CPU when runtime.batch_size is unset (GPUs: models.memory chooses).
CPU_BATCH_SIZE = 8

# Chunks that name a part of the picture rather than an object in it ("a close" from "a close up
# of", "front" from "in front of", "the image"). Compared with the chunk's root lemma, lower case.
DEFAULT_PHRASE_STOPLIST = (
    "close", "closeup", "close-up", "front", "back", "side", "top", "bottom", "middle", "center",
    "left", "right", "background", "foreground", "image", "picture", "photo", "photograph",
    "view", "shot", "scene", "frame", "painting", "drawing", "illustration", "rendering",
    "render", "screenshot", "lot", "couple", "bunch", "pair", "group", "kind", "type", "variety",
    "number", "it", "this", "that", "there", "what", "which", "who", "one", "something", "thing",
)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Which models extraction uses: registered names, hub ids or local folders.

    ``captioner_model``/``grounder_model`` of ``None`` mean the adapter's default checkpoint.
    """

    clip: str = "openai/clip-vit-large-patch14"
    captioner: str = "blip2"
    captioner_model: str | None = None
    grounder: str = "grounding-dino"
    grounder_model: str | None = None

    def __post_init__(self) -> None:
        for name in ("clip", "captioner", "grounder"):
            value = getattr(self, name)
            _check(isinstance(value, str) and value.strip() != "",
                   f"models.{name} must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class FeatureConfig:
    """Choices that change the extracted features; all are written into every store.

    ``None`` for ``view_size``, ``caption_prompt``, ``box_threshold`` and ``text_threshold`` means
    "the model's own default"; the store records the resolved value.
    """

    global_view: str = "center-crop"
    view_size: int | None = None
    caption_prompt: str | None = None
    # BLIP-2's own cap is 30 (LAVIS ``generate(max_length=30)``, its COCO captioning config
    # ``max_len: 30``) and the paper gives none; but the cap is shared by every captioner, and
    # LLaVA's one-sentence captions can run past 30 tokens, cut mid-phrase with their last
    # objects. Decoding is greedy by default, so a caption that ends before 30 tokens is the same
    # under any higher cap: 60 changes only captions that 30 would cut, and stays below CLIP's
    # 77-token text limit, past which T0 would be cut anyway.
    caption_max_tokens: int = 60
    caption_num_beams: int = 1
    max_objects: int = 6
    box_threshold: float | None = None
    text_threshold: float | None = None
    phrase_stoplist: tuple[str, ...] = DEFAULT_PHRASE_STOPLIST
    grounding_rule: str = "span-mean"
    # Pixels of the original image, on the box's shorter side. CLIP's preprocessing crops a box
    # to a square of its shorter side and resizes it to 224 (16x16 patches of 14 px for
    # ViT-L/14): under 8 source pixels each patch sees less than half a pixel, i.e. interpolated
    # blur, not the object, and such boxes are where the detector's regression is least
    # reliable. 8 px still keeps small real objects (3% of a 256-px CNNDetection image).
    min_box_size: float = 8.0

    def __post_init__(self) -> None:
        _check(self.global_view in GLOBAL_VIEWS,
               f"features.global_view must be one of {', '.join(GLOBAL_VIEWS)}, got {self.global_view!r}")
        _check(self.view_size is None or (isinstance(self.view_size, int) and self.view_size >= 8),
               f"features.view_size must be an integer >= 8 or unset, got {self.view_size!r}")
        _check(isinstance(self.caption_max_tokens, int) and 1 <= self.caption_max_tokens <= 512,
               f"features.caption_max_tokens must be in [1, 512], got {self.caption_max_tokens!r}")
        _check(isinstance(self.caption_num_beams, int) and self.caption_num_beams >= 1,
               f"features.caption_num_beams must be >= 1, got {self.caption_num_beams!r}")
        _check(isinstance(self.max_objects, int) and 0 <= self.max_objects <= 64,
               f"features.max_objects must be in [0, 64], got {self.max_objects!r}")
        for name in ("box_threshold", "text_threshold"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, (int, float)) and 0.0 <= value <= 1.0),
                   f"features.{name} must be in [0, 1] or unset, got {value!r}")
        _check(self.grounding_rule in GROUNDING_RULES,
               f"features.grounding_rule must be one of {', '.join(GROUNDING_RULES)}, got {self.grounding_rule!r}")
        _check(isinstance(self.min_box_size, (int, float)) and not isinstance(self.min_box_size, bool)
               and 0 <= self.min_box_size <= 4096,
               f"features.min_box_size must be a number of pixels in [0, 4096], got {self.min_box_size!r}")
        if not isinstance(self.phrase_stoplist, tuple):
            object.__setattr__(self, "phrase_stoplist", tuple(self.phrase_stoplist))


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how fast extraction runs, and in which precision each model computes.

    ``dtype`` is every model's precision unless its own field says otherwise: ``clip_dtype``
    defaults to float32 (the features themselves: UniFD and the other peers compute CLIP features
    in float32, so features comparable with theirs need it), ``captioner_dtype`` and
    ``grounder_dtype`` follow ``dtype`` (half precision on GPUs changes little of a caption or a
    box, and halves their cost). The resolved dtypes are recorded with each model in stores and
    heads, and are part of their compatibility checks.

    ``batch_size`` is the number of images per model batch (and per store shard); unset, it is
    chosen for the device: 8 on the CPU, and on a GPU from its free memory by the per-stage
    memory model of :mod:`tidy_detect.models.memory`. ``devices`` lists several devices for one
    run on this machine: one process per device, each with its own copy of the models (see
    :mod:`tidy_detect.distributed.multi`). The GPU switches (docs/gpu.md) change where and how
    the same function is computed, never the features: ``prepare_ahead`` prepares the next
    batch's model inputs in worker threads and copies them to the device while the current batch
    runs (``auto``: on CUDA devices), ``static_cache`` generates captions with a static KV cache
    where transformers supports it for the captioner (on CUDA transformers then compiles the
    decoding step), ``cuda_graphs`` replays CLIP's image tower from CUDA graphs; ``compile``
    torch-compiles CLIP's vision tower.
    """

    device: str = "auto"
    dtype: str = "auto"
    clip_dtype: str | None = "float32"
    captioner_dtype: str | None = None
    grounder_dtype: str | None = None
    batch_size: int | None = None
    num_workers: int = 2
    max_pixels: int = 100_000_000
    compile: bool = False
    max_file_bytes: int = 512 * 1024 * 1024  # see tidy_detect.images.DEFAULT_MAX_FILE_BYTES
    # tidy-detect's CPU speed-ups of the models (tidy_detect.models.optimize); false runs
    # transformers' own code (also TIDY_DETECT_SPEEDUPS=off, --no-speedups).
    speedups: bool = True
    devices: tuple[str, ...] = ()
    prepare_ahead: str = "auto"
    static_cache: bool = False
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        for name in ("compile", "static_cache", "cuda_graphs"):
            value = getattr(self, name)
            _check(isinstance(value, bool), f"runtime.{name} must be true or false, got {value!r}")
        _check(self.prepare_ahead in PREPARE_AHEAD,
               f"runtime.prepare_ahead must be one of {', '.join(PREPARE_AHEAD)}, got {self.prepare_ahead!r}")
        _check(isinstance(self.speedups, bool), f"runtime.speedups must be true or false, got {self.speedups!r}")
        _check(self.dtype in DTYPES, f"runtime.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for kind in MODEL_KINDS:
            value = getattr(self, f"{kind}_dtype")
            _check(value is None or value in DTYPES,
                   f"runtime.{kind}_dtype must be one of {', '.join(DTYPES)} or unset, got {value!r}")
        _check(isinstance(self.device, str) and _device_name(self.device, auto=True),
               f"runtime.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if not isinstance(self.devices, tuple):
            _check(isinstance(self.devices, (list, str)),
                   f"runtime.devices must be a list of devices, got {self.devices!r}")
            object.__setattr__(self, "devices", parse_devices(self.devices) if isinstance(self.devices, str)
                               else tuple(self.devices))
        for device in self.devices:
            _check(isinstance(device, str) and _device_name(device, auto=False),
                   f"runtime.devices must list cpu, cuda or cuda:N devices, got {device!r} in {list(self.devices)}")
        _check(not (self.devices and self.device != "auto"),
               f"runtime.device ({self.device!r}) and runtime.devices ({list(self.devices)}) were both given; "
               f"give one of them (--device, or --devices/--gpus)")
        _check(self.batch_size is None or (isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool)
                                           and self.batch_size >= 1),
               f"runtime.batch_size must be >= 1 or unset (chosen for the device), got {self.batch_size!r}")
        _check(isinstance(self.num_workers, int) and self.num_workers >= 0,
               f"runtime.num_workers must be >= 0, got {self.num_workers!r}")
        _check(isinstance(self.max_pixels, int) and self.max_pixels >= 1,
               f"runtime.max_pixels must be >= 1, got {self.max_pixels!r}")
        _check(isinstance(self.max_file_bytes, int) and not isinstance(self.max_file_bytes, bool)
               and self.max_file_bytes >= 1, f"runtime.max_file_bytes must be >= 1, got {self.max_file_bytes!r}")

    def model_dtype(self, kind: str) -> str:
        """The dtype asked for one model (``clip``, ``captioner``, ``grounder``): its own, else ``dtype``."""
        return getattr(self, f"{kind}_dtype") or self.dtype


def _device_name(value: str, *, auto: bool) -> bool:
    if auto and value == "auto":
        return True
    if value in ("cpu", "cuda", "mps"):
        return True
    return value.startswith("cuda:") and value[5:].isdigit()


def parse_devices(value: str) -> tuple[str, ...]:
    """``"cuda:0,cuda:1"`` as ``("cuda:0", "cuda:1")`` (spaces and empty entries ignored).

    Raises:
        ConfigError: an entry that is not cpu, cuda or cuda:N.
    """
    devices = tuple(part.strip() for part in str(value).split(",") if part.strip())
    for device in devices:
        _check(_device_name(device, auto=False),
               f"devices must be a comma-separated list of cpu, cuda or cuda:N, got {device!r} in {value!r}")
    return devices


@dataclass(frozen=True)
class ExtractionConfig:
    """Everything extraction needs to know: models, feature choices, runtime."""

    models: ModelConfig = field(default_factory=ModelConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": dataclasses.asdict(self.models),
            "features": {**dataclasses.asdict(self.features),
                         "phrase_stoplist": list(self.features.phrase_stoplist)},
            "runtime": dataclasses.asdict(self.runtime),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> "ExtractionConfig":
        """Build from nested tables ``models``/``features``/``runtime``; unknown keys are errors."""
        sections = {"models": ModelConfig, "features": FeatureConfig, "runtime": RuntimeConfig}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"{source}: unknown table {unknown[0]!r}; known tables: {', '.join(sections)}")
        built = {}
        for name, kind in sections.items():
            built[name] = _build(kind, data.get(name, {}), f"{source}: [{name}]")
        return cls(**built)

    def updated(self, **sections: Mapping[str, Any]) -> "ExtractionConfig":
        """A copy with some fields replaced, e.g. ``updated(models={"grounder": "none"})``.

        ``None`` values are ignored, so CLI options left unset keep the preset's value.
        """
        current = {"models": self.models, "features": self.features, "runtime": self.runtime}
        for name, changes in sections.items():
            if name not in current:
                raise ConfigError(f"unknown config table {name!r}; known tables: {', '.join(current)}")
            changes = {k: v for k, v in changes.items() if v is not None}
            if changes:
                valid = {f.name for f in fields(current[name])}
                for key in changes:
                    if key not in valid:
                        raise ConfigError(f"unknown {name} option {key!r}; known: {', '.join(sorted(valid))}")
                current[name] = dataclasses.replace(current[name], **changes)
        return ExtractionConfig(**current)


def _build(kind: type, values: Any, where: str):
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a table of options, got {type(values).__name__}")
    valid = {f.name for f in fields(kind)}
    for key in values:
        if key not in valid:
            raise ConfigError(f"{where}: unknown option {key!r}; known: {', '.join(sorted(valid))}")
    try:
        return kind(**values)
    except TypeError as exc:  # e.g. a list where a string belongs
        raise ConfigError(f"{where}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Presets

def builtin_presets() -> dict[str, Path]:
    """Presets shipped with the package, by name."""
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.toml"))}


def preset_description(path: Path) -> str:
    """The first comment line of a preset file, used by ``models list``."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def load_preset(name_or_path: str | Path) -> ExtractionConfig:
    """Read a preset by built-in name or TOML file path.

    Relative model paths in a preset file are resolved against the file's folder, so a bundle of
    local models can be moved together with its preset.

    Raises:
        UnknownNameError: neither a built-in preset nor an existing file.
        ConfigError: the file is not valid TOML or has unknown or invalid options.
    """
    presets = builtin_presets()
    path = Path(name_or_path)
    if str(name_or_path) in presets:
        path = presets[str(name_or_path)]
    elif not path.is_file():
        raise UnknownNameError(
            f"Unknown preset {str(name_or_path)!r}: not a built-in preset and no such file. "
            f"Known presets: {', '.join(presets)}; or pass the path of a TOML file."
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"preset {path}: not valid TOML ({exc})") from exc
    models = dict(data.get("models", {}))
    for key in ("clip", "captioner_model", "grounder_model"):
        value = models.get(key)
        if isinstance(value, str) and value.startswith(("./", "../")):
            models[key] = str((path.parent / value).resolve())
    if models:
        data = {**data, "models": models}
    return ExtractionConfig.from_dict(data, source=f"preset {path}")


REPRESENTATIONS = ("both", "global", "local", "image", "text")


@dataclass(frozen=True)
class RepresentationConfig:
    """How stored embeddings become the head's input vector.

    ``kind``: ``both`` (w1·D_g + w2·D_l), ``global`` (D_g), ``local`` (D_l), ``image`` (I0) or
    ``text`` (T0). ``normalize`` L2-normalises every embedding before differences are taken.
    """

    kind: str = "both"
    w1: float = 1.0
    w2: float = 1.0
    normalize: bool = True

    def __post_init__(self) -> None:
        _check(self.kind in REPRESENTATIONS,
               f"representation must be one of {', '.join(REPRESENTATIONS)}, got {self.kind!r}")
        for name in ("w1", "w2"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
                   f"{name} must be >= 0, got {value!r}")
        _check(self.kind != "both" or self.w1 + self.w2 > 0,
               f"w1 + w2 must be > 0 for the 'both' representation, got w1={self.w1}, w2={self.w2}")
        _check(isinstance(self.normalize, bool), f"normalize must be true or false, got {self.normalize!r}")
