"""Where ``tidy-detect extract`` runs: the engines by name, and the Ray options of the command line.

An engine only decides where the work runs; both take the same inputs and write the same store.
Adding one is one entry in :data:`ENGINES`. The local engine runs in this process, or, when
``runtime.devices`` lists several devices (``--devices``, ``--gpus``), in one process per device of
this machine (:mod:`tidy_detect.distributed.multi`); Ray places its workers on a cluster's GPUs
with ``--num-gpus-per-worker`` instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable

from tidy_detect.config import ExtractionConfig
from tidy_detect.errors import ConfigError, UnknownNameError


def _local(inputs: Iterable[str | Path], out: str | Path, config: ExtractionConfig, ray_options: Any,
           **kwargs: Any) -> Any:
    from tidy_detect.features.extractor import extract

    devices = config.runtime.devices
    if len(devices) > 1:
        from tidy_detect.distributed.multi import extract_multi

        return extract_multi(inputs, out, config, **kwargs)
    if devices:  # one device: this process, on it
        config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, device=devices[0], devices=()))
    return extract(inputs, out, config, **kwargs)


def _ray(inputs: Iterable[str | Path], out: str | Path, config: ExtractionConfig, ray_options: Any,
         **kwargs: Any) -> Any:
    from tidy_detect.distributed.ray_engine import extract_ray

    return extract_ray(inputs, out, config, ray_options, **kwargs)


ENGINES: dict[str, Callable[..., Any]] = {"local": _local, "ray": _ray}


def _known() -> str:
    return ", ".join(ENGINES)


def check_engine(engine: str) -> str:
    """``engine`` if it is registered. Raises UnknownNameError listing the known engines."""
    if engine not in ENGINES:
        raise UnknownNameError(f"Unknown engine {engine!r}. Known: {_known()}.")
    return engine


def ray_options_from_cli(engine: str, *, address: str | None = None, workers: int | None = None,
                         num_gpus_per_worker: float | None = None, cpus_per_worker: float | None = None) -> Any:
    """The :class:`RayOptions` of the command line (None for the local engine).

    ``workers`` is shared with the local engine, where it means decoding threads; the other
    options only make sense with ``--engine ray``.

    Raises:
        UnknownNameError: an unknown engine.
        ConfigError: a Ray-only option with another engine, or an invalid value.
    """
    check_engine(engine)
    ray_only = {"--ray-address": address, "--num-gpus-per-worker": num_gpus_per_worker,
                "--cpus-per-worker": cpus_per_worker}
    if engine != "ray":
        given = [name for name, value in ray_only.items() if value is not None]
        if given:
            raise ConfigError(f"{given[0]} only applies to --engine ray, got --engine {engine}")
        return None
    from tidy_detect.distributed.ray_engine import RayOptions

    chosen = {"address": address, "workers": workers, "num_gpus_per_worker": num_gpus_per_worker,
              "cpus_per_worker": cpus_per_worker}
    return RayOptions(**{k: v for k, v in chosen.items() if v is not None})


def extract_with_engine(engine: str, inputs: Iterable[str | Path], out: str | Path,
                        config: ExtractionConfig | None = None, *, ray_options: Any = None, **kwargs: Any) -> Any:
    """Run :func:`tidy_detect.features.extractor.extract` (``local``) or its Ray twin (``ray``).

    Args:
        engine: ``local`` or ``ray``.
        inputs, out, config: as for ``extract``.
        ray_options: a :class:`~tidy_detect.distributed.ray_engine.RayOptions` for ``ray``
            (defaults: a local cluster, 2 workers); must be None for ``local``.
        **kwargs: the other arguments of ``extract`` (limit, progress, retry_errors, layout, ...).

    Returns:
        The run's :class:`~tidy_detect.features.extractor.ExtractionSummary`.

    Raises:
        UnknownNameError: "Unknown engine 'spark'. Known: local, ray."
        ConfigError: Ray options given to the local engine, or devices (``runtime.devices``) to Ray.
        and whatever the engine raises (InputError, ModelLoadError, StoreError, ...).
    """
    check_engine(engine)
    if engine != "ray" and ray_options is not None:
        raise ConfigError(f"Ray options only apply to --engine ray, got --engine {engine}")
    config = config or ExtractionConfig()
    if engine == "ray" and config.runtime.devices:
        raise ConfigError(f"--devices/--gpus ({','.join(config.runtime.devices)}) apply to the local engine; with "
                          f"--engine ray give each worker GPUs with --num-gpus-per-worker")
    return ENGINES[engine](inputs, out, config, ray_options, **kwargs)
