"""Running the models on a CUDA device: input transfers, out-of-memory errors, attention, graphs.

Each piece keeps the models' results (the tests compare them with the plain path, on the device):

- :func:`to_device` packs a batch's prepared host tensors (of any dtypes) into one pinned buffer
  and sends it with one non-blocking host-to-device copy, on a side stream when one is given, so
  that the copy of the next batch overlaps the current batch's compute; the tensors on the device
  are views of that one buffer. On the CPU it changes nothing.
- :func:`run_guarded` turns ``torch.OutOfMemoryError`` into a :class:`DeviceMemoryError` that names
  the stage, the batch and what to lower: no silent retry with smaller batches.
- :func:`prefer_sdpa` asks transformers for ``scaled_dot_product_attention`` (flash and
  memory-efficient kernels on CUDA) for the models that support it, and says which do not.
- :class:`GraphedCall` replays a shape-static function (CLIP's image tower) from CUDA graphs, one
  graph per padded batch size (``runtime.cuda_graphs``; off unless asked for, measured by
  ``tidy-detect bench --device cuda``).

torch is imported lazily, as everywhere in the models package.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from tidy_detect.errors import ConfigError

log = logging.getLogger(__name__)

# Offsets of the tensors packed into one transfer buffer: every dtype's alignment, and the
# 16-byte vector loads of the kernels that read them.
_ALIGN = 64
GIB = 1024 ** 3


def is_cuda(device: str | None) -> bool:
    """Whether ``device`` names a CUDA device (``cuda``, ``cuda:N``)."""
    return bool(device) and str(device).split(":", 1)[0] == "cuda"


class DeviceMemoryError(ConfigError):
    """A model stage ran out of device memory. The message names the stage, the batch it ran
    and what to lower; the batch is not retried with smaller batches (exit code 2: the batch
    size or precision chosen does not fit this device)."""


def _out_of_memory_types() -> tuple[type, ...]:
    import torch

    found = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (found,) if found is not None else ()


def memory_info(device: str) -> tuple[int, int] | None:
    """``(free, total)`` bytes of a CUDA device (``torch.cuda.mem_get_info``), else None."""
    if not is_cuda(device):
        return None
    import torch

    try:
        free, total = torch.cuda.mem_get_info(torch.device(device))
    except (RuntimeError, AssertionError):
        return None
    return int(free), int(total)


def run_guarded(fn: Callable[..., Any], *args: Any, stage: str, device: str, batch: int, what: str,
                lower: str) -> Any:
    """``fn(*args)`` (a stage's forward); torch's out-of-memory error becomes a :class:`DeviceMemoryError`.

    Args:
        stage: the extraction stage ("caption", "ground", "clip image", ...).
        device: where it ran (the message gives that device's free and total memory).
        batch: how many images, crops or texts the failing pass held.
        what: the model and its precision ("grounding-dino, bfloat16").
        lower: what the user can lower ("--batch-size (now 64)").

    Raises:
        DeviceMemoryError: the forward ran out of device memory. It is raised after the failed
            forward's frames (and their activations) are released and the cache of freed blocks
            is emptied, so the memory figures in the message are what is really free.
    """
    failure: str | None = None
    try:
        return fn(*args)
    except _out_of_memory_types() as exc:  # torch.OutOfMemoryError
        failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # Here the caught error, whose traceback holds the failed forward's frames, is gone.
    if is_cuda(device):
        import torch

        torch.cuda.empty_cache()
    info = memory_info(device)
    where = f"{info[0] / GIB:.1f} GiB free of {info[1] / GIB:.1f} GiB on {device}" if info else device
    raise DeviceMemoryError(
        f"out of device memory in the {stage} stage ({what}, {batch} per pass; {where}): lower {lower}, "
        f"or run that model in a smaller precision; nothing was retried ({failure})")


# ---------------------------------------------------------------------------------------------
# Host-to-device transfers

@dataclass(frozen=True)
class _Slot:
    name: str
    dtype: Any
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def pack(tensors: Mapping[str, Any], *, pin: bool = False) -> tuple[Any, list[_Slot]]:
    """The bytes of CPU tensors of any dtypes in one flat uint8 buffer (pinned when ``pin``),
    each at an offset aligned to 64 bytes; returns the buffer and where each tensor lies."""
    import torch

    slots: list[_Slot] = []
    offset = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        slots.append(_Slot(name, tensor.dtype, tuple(tensor.shape), offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    flat = torch.empty(max(offset, _ALIGN), dtype=torch.uint8, pin_memory=pin)
    for slot, tensor in zip(slots, tensors.values()):
        if slot.nbytes:
            _view(flat, slot).copy_(tensor)
    return flat, slots


def unpack(flat: Any, slots: list[_Slot]) -> dict[str, Any]:
    """The tensors :func:`pack` put into ``flat`` (on whatever device ``flat`` now is), as views."""
    return {slot.name: _view(flat, slot) for slot in slots}


def _view(flat: Any, slot: _Slot) -> Any:
    import torch

    if slot.nbytes == 0:
        return torch.empty(slot.shape, dtype=slot.dtype, device=flat.device)
    return flat[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)


@dataclass
class DeviceInputs:
    """One batch's model inputs on the device, possibly still being copied on a side stream.

    :meth:`ready` makes the calling thread's current stream wait for the copy and returns the
    tensors; until then nothing may read them.
    """

    tensors: dict[str, Any]
    event: Any = None  # recorded on the copying stream after the copy (CUDA only)
    buffer: Any = None  # the device buffer the tensors are views of
    host: Any = None  # the pinned host buffer, kept until the copy is known to be done
    _waited: bool = field(default=False, repr=False)

    def ready(self) -> dict[str, Any]:
        if self.event is not None and not self._waited:
            import torch

            stream = torch.cuda.current_stream(self.buffer.device)
            stream.wait_event(self.event)
            # The buffer was allocated on the copying stream: tell the allocator this stream
            # uses it too, so its memory is not handed out again while this stream still reads.
            self.buffer.record_stream(stream)
            self._waited = True
            self.host = None
        return self.tensors


def to_device(tensors: Mapping[str, Any], device: str, *, stream: Any = None) -> DeviceInputs:
    """Send CPU tensors to ``device`` with one host-to-device copy.

    On a CUDA device the tensors are packed into one pinned buffer (:func:`pack`), copied with
    ``non_blocking=True`` on ``stream`` (a side stream, so the copy overlaps compute on the
    default stream; the current stream when None) and unpacked there as views; call
    :meth:`DeviceInputs.ready` before reading them. Elsewhere the tensors are moved as they are
    (a no-op for the CPU). Values are copied bit for bit: dtypes are not changed here.
    """
    if not is_cuda(device):
        return DeviceInputs({name: t.to(device) for name, t in tensors.items()})
    import torch

    host, slots = pack(tensors, pin=True)
    context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with context:
        buffer = host.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    return DeviceInputs(unpack(buffer, slots), event, buffer, host)


def floating_to(tensor: Any, device: str, dtype: Any) -> Any:
    """A model input on ``device``: floating tensors in ``dtype``, others as they are; through
    pinned memory with a non-blocking copy on CUDA (the cast runs on the device)."""
    if is_cuda(device) and tensor.device.type == "cpu":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


# ---------------------------------------------------------------------------------------------
# Attention and graphs

def prefer_sdpa(model: Any) -> str:
    """Ask transformers for SDPA attention (``attn_implementation="sdpa"``) when the model
    supports it; returns the implementation the model then uses ("sdpa", "eager", ...).

    transformers already picks SDPA by default where it can; this makes the choice explicit for
    CUDA runs and records it. Models that do not support it (Grounding DINO, BLIP) keep their own
    attention, which is logged once per model class; tidy-detect's BLIP attention forward uses
    SDPA on any device (see :mod:`tidy_detect.models.optimize`).
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None) or "eager"
    if not getattr(type(model), "_supports_sdpa", False):
        log.info("%s has no SDPA attention in transformers; it keeps its %s attention", type(model).__name__, current)
        return current
    if current != "sdpa":
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, ImportError, AttributeError) as exc:
            log.warning("could not switch %s to SDPA attention (%s); it keeps its %s attention",
                        type(model).__name__, exc, current)
    return getattr(config, "_attn_implementation", None) or current


def graph_batch(n: int, limit: int) -> int:
    """The padded batch size a graph is captured for: the next power of two (at most ``limit``,
    at least ``n``), so a handful of graphs serves every batch size."""
    size = 1
    while size < n:
        size *= 2
    return max(n, min(size, limit))


class GraphedCall:
    """``fn(x)`` replayed from CUDA graphs, one captured per padded batch size and input shape.

    A batch of ``n`` rows is copied into the graph's static input of :func:`graph_batch` rows
    (the rest zeroed), the graph replays, and the first ``n`` output rows are returned as a new
    tensor. ``fn`` must treat rows independently (a vision tower does) and be capturable: no
    host synchronisation, no data-dependent shapes. Capture warms ``fn`` up on a side stream
    first (cuBLAS handles, kernel selection), as CUDA graphs need.

    Raises:
        ConfigError: built for a device that is not CUDA.
    """

    def __init__(self, fn: Callable[[Any], Any], device: str, limit: int = 512) -> None:
        if not is_cuda(device):
            raise ConfigError(f"CUDA graphs need a CUDA device, got {device!r}; leave runtime.cuda_graphs off "
                              f"(--cuda-graphs) on other devices")
        import torch

        self.fn = fn
        self.device = device
        self.limit = limit
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}

    def __call__(self, x: Any) -> Any:
        n = int(x.shape[0])
        size = graph_batch(n, self.limit)
        key = (size, tuple(x.shape[1:]), x.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(size, x)
        static_in, static_out, graph = self.graphs[key]
        static_in[:n].copy_(x)
        if n < size:
            static_in[n:].zero_()
        graph.replay()
        return static_out[:n].clone()

    def _capture(self, size: int, x: Any) -> tuple[Any, Any, Any]:
        import torch

        static_in = torch.zeros((size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.fn(static_in)
        log.info("captured a CUDA graph for batches of %d (%s)", size, tuple(x.shape[1:]))
        return static_in, static_out, graph
