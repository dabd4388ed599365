"""Components by name: the registries that captioners and grounders add themselves to.

Adapter modules import this module and register with a decorator
(``@CAPTIONERS.register("blip", ...)``); this module never imports them by name. A registry
imports its adapters' module (a dotted path, given when the registry is made) the first time it
is asked for a component, so ``--captioner blip`` works without anything importing the adapters
first, and the imports only ever run one way: adapters -> components.

A CLI value such as ``--captioner`` may be a registered name (``blip2``), a hub id
(``Salesforce/blip2-opt-6.7b``) or a local folder; :meth:`Registry.resolve` turns any of them into
the adapter class and the checkpoint to load, reading the checkpoint's ``model_type`` when the
value is not a name.
"""

from __future__ import annotations

import importlib
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
    """Name -> component, for one kind of adapter (captioner, grounder).

    ``module`` is the dotted path of the module whose classes register here; it is imported the
    first time the registry is read.
    """

    def __init__(self, kind: str, module: str | None = None) -> None:
        self.kind = kind
        self.module = module
        self._components: dict[str, Component] = {}

    def load(self) -> "Registry":
        """Import the adapters' module, so that its ``register`` decorators have run."""
        if self.module is not None:
            importlib.import_module(self.module)
        return self

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
        self.load()
        return sorted(self._components)

    def components(self) -> list[Component]:
        return [self._components[n] for n in self.names()]

    def get(self, name: str) -> Component:
        self.load()
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
        self.load()
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


CAPTIONERS = Registry("captioner", "tidy_detect.models.captioners")
GROUNDERS = Registry("grounder", "tidy_detect.models.grounders")
