"""Model names for the command line: CLIP aliases, and the component registries.

Captioners and grounders live in :mod:`tidy_detect.models.components` (adapters register there);
this module re-exports them with the CLIP aliases, for the commands that list or resolve models.
"""

from __future__ import annotations

from typing import Any

from tidy_detect.errors import ModelLoadError
from tidy_detect.models.components import CAPTIONERS, GROUNDERS, Component, Registry, checkpoint_model_type

from tidy_detect.models.loading import checkpoint_problem

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
    CAPTIONERS.load()
    GROUNDERS.load()


def missing_models(models: Any) -> list[str]:
    """Every checkpoint of a :class:`~tidy_detect.config.ModelConfig` that cannot be loaded, each
    with its fix, found before any model is loaded (so one run names them all)."""
    problems: list[str] = []
    checks = []
    for kind, registry, value, model in (("captioner", CAPTIONERS, models.captioner, models.captioner_model),
                                         ("grounder", GROUNDERS, models.grounder, models.grounder_model)):
        try:
            _, source = registry.resolve(value, model)
        except ModelLoadError as exc:
            problems.append(str(exc))
            continue
        if source:  # None: a component without a model (provided captions, no grounder)
            checks.append((f"{kind} model", source, f"--{kind}-model"))
    checks.append(("CLIP model", resolve_clip(models.clip), "--clip"))
    for what, source, option in checks:
        problem = checkpoint_problem(source, what, option)
        if problem:
            problems.append(problem)
    return problems


def check_models(models: Any) -> None:
    """Raise one ModelLoadError that lists every missing checkpoint of ``models``, if any is."""
    problems = missing_models(models)
    if len(problems) == 1:
        raise ModelLoadError(problems[0])
    if problems:
        raise ModelLoadError(f"{len(problems)} of the models needed cannot be loaded:\n"
                             + "\n".join(f"  - {p}" for p in problems))


__all__ = ["CAPTIONERS", "CLIP_ALIASES", "GROUNDERS", "Component", "Registry", "check_models", "checkpoint_model_type",
           "ensure_registered", "missing_models", "resolve_clip"]
