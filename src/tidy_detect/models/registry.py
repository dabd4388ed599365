"""Components by name: captioners and grounders register here; CLIP names are aliases of hub ids.

A CLI value such as ``--captioner`` may be a registered name (``blip2``), a hub id
(``Salesforce/blip2-opt-6.7b``) or a local folder; :meth:`Registry.resolve` turns any of them into
the adapter class and the checkpoint to load, reading the checkpoint's ``model_type`` when the
value is not a name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tidy_detect.errors import ModelLoadError, UnknownNameError
from tidy_detect.models.loading import hub_offline, hub_reachable, looks_like_hub_id


@dataclass(frozen=True)
class Component:
    """A registered adapter: how to build it and which checkpoints it understands."""

    kind: str
    name: str
    factory: Callable[..., Any]
    default_model: str | None
    model_types: tuple[str, ...] = ()
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Name -> component, for one kind of adapter (captioner, grounder)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._components: dict[str, Component] = {}

    def register(self, name: str, *, default_model: str | None, model_types: tuple[str, ...] = (),
                 description: str = "", **defaults: Any) -> Callable[[Any], Any]:
        """Class decorator: ``@CAPTIONERS.register("blip", default_model="Salesforce/...")``."""

        def decorate(factory: Any) -> Any:
            if name in self._components:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._components[name] = Component(self.kind, name, factory, default_model, model_types,
                                               description, dict(defaults))
            return factory

        return decorate

    def names(self) -> list[str]:
        return sorted(self._components)

    def components(self) -> list[Component]:
        return [self._components[n] for n in self.names()]

    def get(self, name: str) -> Component:
        try:
            return self._components[name]
        except KeyError:
            raise UnknownNameError(f"Unknown {self.kind} {name!r}. Known: {', '.join(self.names())}.") from None

    def resolve(self, value: str, model: str | None = None) -> tuple[Component, str | None]:
        """Return the component and checkpoint for ``--<kind> value [--<kind>-model model]``.

        ``value`` is a registered name, or a hub id / local folder whose ``config.json`` names a
        ``model_type`` that one component handles.

        Raises:
            UnknownNameError: the value is neither a name nor a checkpoint of a known type.
        """
        if value in self._components:
            component = self._components[value]
            return component, model or component.default_model
        model_type = checkpoint_model_type(value, kind=self.kind)
        if model_type is None:
            raise UnknownNameError(
                f"Unknown {self.kind} {value!r}. Known: {', '.join(self.names())}. "
                f"(The hub id or local folder of a supported checkpoint works too.)"
            )
        for component in self._components.values():
            if model_type in component.model_types:
                return component, value
        supported = sorted({t for c in self._components.values() for t in c.model_types})
        raise UnknownNameError(
            f"{self.kind} checkpoint {value!r} has model_type {model_type!r}, which no {self.kind} handles. "
            f"Supported model types: {', '.join(supported)}. Known {self.kind}s: {', '.join(self.names())}."
        )


def checkpoint_model_type(source: str, *, kind: str = "model") -> str | None:
    """The ``model_type`` in the ``config.json`` of a local folder or a hub checkpoint.

    Returns ``None`` when ``source`` is neither a folder nor a hub id.

    Raises:
        ModelLoadError: a hub id whose config is neither cached nor downloadable.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"{path}: this folder has no config.json, so it is not a saved {kind} checkpoint")
    elif looks_like_hub_id(source):
        try:
            from huggingface_hub import hf_hub_download, try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
            if isinstance(cached, str):
                config_file = Path(cached)
            elif hub_offline() or not hub_reachable():
                raise ModelLoadError("offline")
            else:
                config_file = Path(hf_hub_download(source, "config.json"))
        except Exception as exc:
            raise ModelLoadError(
                f"Cannot tell which {kind} handles {source!r}: its config.json is not in the local "
                f"Hugging Face cache and the hub could not be reached ({type(exc).__name__}). "
                f"Pass the adapter name and the checkpoint separately, e.g. --{kind} NAME --{kind}-model {source}, "
                f"or a local folder."
            ) from None
    else:
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_file}: cannot read the checkpoint's config ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file}: a checkpoint's config must be a JSON object, got {type(config).__name__}")
    return config.get("model_type")


CAPTIONERS = Registry("captioner")
GROUNDERS = Registry("grounder")

# CLIP is one adapter for every Hugging Face CLIP checkpoint; these short names are conveniences.
CLIP_ALIASES = {
    "vit-l-14": "openai/clip-vit-large-patch14",
    "vit-l-14-336": "openai/clip-vit-large-patch14-336",
    "vit-b-16": "openai/clip-vit-base-patch16",
    "vit-b-32": "openai/clip-vit-base-patch32",
}


def resolve_clip(value: str) -> str:
    """A CLIP alias becomes its hub id; hub ids and folders pass through."""
    return CLIP_ALIASES.get(value, value)


def ensure_registered() -> None:
    """Import the adapter modules so that their ``register`` decorators have run."""
    from tidy_detect.models import captioners, grounders  # noqa: F401
