"""The FastAPI app: ``POST /v1/detect``, ``GET /v1/info``, ``GET /healthz`` and the page at ``/``.

A request goes preprocess -> forward -> postprocess:

1. **preprocess** (event loop, then the decoding lanes of :mod:`tidy_detect.serve.decode`): the
   multipart body is parsed as it streams in, with the size and file-count limits checked on the
   way (413 before an oversized body is read); the images' headers are read and the request's
   pixel budget checked (413); every file is decoded once, under the server's pixel budget, and
   reduced for the models.
2. **forward** (the micro-batcher's worker thread): each decoded image goes through
   ``Detector.predict_loaded`` as soon as it is decoded, together with the images of concurrent
   requests.
3. **postprocess**: the detector's records, in upload order, exactly as ``tidy-detect detect
   --format json`` prints them; invalid files get the detector's own error record. Each record's
   ``provenance`` (what the file declares about its origin) is read from the uploaded bytes in
   threads of its own while the file decodes and the models run, and never enters the score.

Only uploaded bytes are processed; no route takes a path. Uploads are kept in memory (never spooled
to a temporary file), and nothing is written to disk unless ``ServeSettings.results_dir`` is set
(then at most ``results_keep`` files, none older than ``results_max_age_days``). Responses name
models by hub id or ``local:<folder name>``, never by a server path (:mod:`tidy_detect.serve.public`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tidy_detect import __version__
from tidy_detect.errors import ImageError, TidyError
from tidy_detect.images import LoadedImage
from tidy_detect.serve.batcher import BatcherBusyError, BatcherClosedError, MicroBatcher
from tidy_detect.serve.decode import DecodePool
from tidy_detect.serve.public import PathScrubber, public_models
from tidy_detect.serve.settings import MIB, ServeSettings

if TYPE_CHECKING:
    from tidy_detect.detect import Detector

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
API_KEY_ENV = "TIDY_DETECT_API_KEY"

# Status and error code per ImageError kind, for a request of one file (in a request of several, a
# bad file is reported in its record instead).
IMAGE_ERROR_STATUS = {
    "unsupported": (415, "unsupported_image"),
    "too-large": (422, "image_too_large"),
    "corrupt": (422, "corrupt_image"),
}
HTTP_ERROR_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                    413: "upload_too_large", 415: "unsupported_media_type", 422: "invalid_request"}
MAX_FIELD_NAME = 200  # characters of a form field's name quoted back in an error message
MAX_PART_HEADER_BYTES = 16 * 1024  # all header lines of one part together (python-multipart has no limit)
MAX_BOUNDARY = 70  # RFC 2046: 1 to 70 characters
# RFC 2046 bchars: digits, letters and '()+_,-./:=? (and a space, not last)
_BOUNDARY_CHARS = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? ")

# Everything the page needs comes from this server: the policy makes the browser refuse any other
# origin, so a page that works here works offline.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class ApiError(Exception):
    """An HTTP error with a machine-readable code and a message that says what to do."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON body of every error: ``{"error": {"code": ..., "message": ...}}``."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# -- OpenAPI models (documentation only: responses are built as plain dicts) -------------------------

class ObjectRecord(BaseModel):
    phrase: str
    box: list[float]
    box_score: float
    discrepancy: float


class ProvenanceFinding(BaseModel):
    source: str = Field(description="c2pa, xmp, iptc, png-text, exif or watermark")
    field: str
    value: str
    meaning: str
    declares_ai: Optional[bool] = Field(None, description="true: says generative AI made it; false: says another "
                                                          "origin; null: says neither")
    verified: bool = Field(False, description="true only inside a C2PA manifest whose signature validated against "
                                              "a trusted chain; everything else is a claim")
    generator: Optional[str] = None


class ProvenanceRecord(BaseModel):
    checked: bool = Field(description="false when the file was not read for provenance (then summary says why)")
    declares_ai: Optional[bool] = Field(None, description="null when nothing is declared: absence of metadata is "
                                                          "no evidence that an image is real")
    verified: bool
    summary: str
    findings: list[ProvenanceFinding]
    truncated: bool
    format: Optional[str]
    c2pa: Optional[dict[str, Any]] = Field(None, description="status: valid, untrusted, tampered, "
                                                             "invalid-signature, invalid, unreadable or remote")
    watermark: Optional[dict[str, Any]] = None
    skipped: dict[str, str]
    error: Optional[str]


class DetectionRecord(BaseModel):
    path: str
    sha256: Optional[str]
    width: Optional[int]
    height: Optional[int]
    p_fake: Optional[float]
    label: Optional[str]
    caption: Optional[str]
    objects: list[ObjectRecord]
    global_discrepancy: Optional[float]
    error: Optional[str]
    stage: Optional[str] = Field(None, description='which head gave p_fake: "full" or "global" (the cascade)')
    random_weights: bool = Field(
        False, description="true when a model behind the verdict has random weights (the tiny test bundle of "
                           "`tidy-detect models make-tiny`): the score means nothing")
    provenance: Optional[ProvenanceRecord] = Field(
        None, description="what the file itself declares about how it was made (C2PA, IPTC/XMP, generator "
                          "metadata, watermark), beside the score and never part of it; see docs/provenance.md")


class DetectResponse(BaseModel):
    request_id: str
    records: list[DetectionRecord]
    model: dict[str, Any]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


MULTIPART_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                 "description": "one or more images (JPEG, PNG, WebP, BMP, TIFF, GIF, ...)"}},
    }}},
}


# -- preprocess: the multipart body, streamed with limits ------------------------------------------

@dataclass
class Upload:
    """One uploaded file, in memory."""

    name: str
    data: bytes


class _PartCollector:
    """python-multipart callbacks that keep file parts in memory and enforce the file count."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.uploads: list[Upload] = []
        self.finished = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._chunks: list[bytes] = []
        self._name: str | None = None
        self._header_bytes = 0

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_end": self.on_end}

    def on_part_begin(self) -> None:
        self._headers, self._chunks, self._name = {}, [], None
        self._header_bytes = 0

    def _count_header(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise ApiError(400, "bad_multipart", f"the headers of part {len(self.uploads) + 1} are longer than "
                                                 f"{MAX_PART_HEADER_BYTES:,} bytes; a file part needs only "
                                                 f"Content-Disposition and Content-Type")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._header_field).lower().strip()] = bytes(self._header_value).strip()
        self._header_field.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        field = options.get(b"name", b"").decode("utf-8", "replace")[:MAX_FIELD_NAME]
        if b"filename" not in options:
            raise ApiError(422, "unexpected_field",
                           f"form field {field!r} is not a file; send each image as a file field named 'files' "
                           f"(curl -F files=@photo.jpg)")
        if len(self.uploads) + 1 > self.max_files:
            raise ApiError(413, "too_many_files",
                           f"more than {self.max_files} files in one request (this server's limit); "
                           f"split them over several requests")
        filename = options[b"filename"].decode("utf-8", "replace").strip()
        self._name = filename or f"<upload {len(self.uploads)}>"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._chunks.append(data[start:end])

    def on_part_end(self) -> None:
        if self._name is not None:
            self.uploads.append(Upload(self._name, b"".join(self._chunks)))
        self._chunks = []

    def on_end(self) -> None:
        self.finished = True


def check_boundary(boundary: bytes) -> None:
    """Raise 400 for a boundary RFC 2046 does not allow (python-multipart fails on some with a 500)."""
    shown = boundary[:80].decode("latin-1")
    if not 1 <= len(boundary) <= MAX_BOUNDARY:
        raise ApiError(400, "bad_multipart", f"the multipart boundary must be 1 to {MAX_BOUNDARY} characters "
                                             f"(RFC 2046), got {len(boundary):,}: {shown!r}")
    if not set(boundary) <= _BOUNDARY_CHARS or boundary.endswith(b" "):
        raise ApiError(400, "bad_multipart", f"the multipart boundary may hold only letters, digits and "
                                             f"'()+_,-./:=? (RFC 2046), got {shown!r}")


async def read_uploads(request: Request, settings: ServeSettings) -> list[Upload]:
    """The files of a multipart request, read with the size and count limits as the body streams in.

    Raises:
        ApiError: 415 not multipart; 413 body over ``max_upload_bytes`` (from Content-Length before
            anything is read, else as soon as the bytes read pass the limit) or more than ``max_files``
            files; 400 malformed body, boundary or Content-Length, or a client that went away;
            422 a non-file field or no file at all.
    """
    content_type = request.headers.get("content-type", "")
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise ApiError(415, "not_multipart",
                       f"POST /v1/detect takes multipart/form-data with each image as a file field named 'files' "
                       f"(curl -F files=@photo.jpg), got content type {content_type[:200] or 'none'!r}")
    boundary = options[b"boundary"]
    check_boundary(boundary)
    limit = settings.max_upload_bytes
    too_large = (f"over this server's limit of {limit:,} bytes ({limit / MIB:g} MiB) for all files of one request "
                 f"together; send fewer or smaller files per request")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():  # the HTTP server checks it too; this is the ASGI-level guard
            raise ApiError(400, "bad_request",
                           f"Content-Length must be a number of bytes, got {declared[:40]!r}") from None
        size = int(declared)
        if size > limit:
            raise ApiError(413, "upload_too_large", f"the request body is {size:,} bytes, {too_large}")
    collector = _PartCollector(settings.max_files)
    parser = MultipartParser(boundary, collector.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise ApiError(413, "upload_too_large", f"the request body is more than {limit:,} bytes, {too_large}")
            parser.write(chunk)
        parser.finalize()
    except ApiError:
        raise
    except ClientDisconnect:
        # The client went away or the body timed out (the HTTP server answered 408 already).
        raise ApiError(400, "client_disconnected", "the connection closed before the whole body arrived") from None
    except Exception as exc:  # python-multipart raises several kinds (and ValueError) on bad input
        raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed ({str(exc)[:200]})") from None
    if not collector.finished:
        raise ApiError(400, "bad_multipart", "the multipart body ends before its closing boundary (truncated upload?)")
    if not collector.uploads:
        raise ApiError(422, "no_files", "the request has no file; send each image as a file field named 'files' "
                                        "(curl -F files=@photo.jpg)")
    return collector.uploads


def image_api_error(exc: ImageError, max_pixels: int) -> ApiError:
    """The HTTP error for the one file of a single-file request."""
    status, code = IMAGE_ERROR_STATUS.get(exc.kind, (422, "bad_image"))
    message = str(exc)
    if exc.kind == "too-large":
        # load_image's advice to raise max_pixels is for whoever runs the server, not for the client
        message = message.split("; raise max_pixels")[0]
        message += f". This server takes at most {max_pixels:,} pixels per image: send a downscaled copy"
    elif exc.kind == "unsupported":
        message += ". Send the image as JPEG, PNG or WebP"
    return ApiError(status, code, message)


def unique_names(names: list[str]) -> list[str]:
    """Names made unique within one model call (the detector matches its results to names)."""
    seen: set[str] = set()
    out = []
    for name in names:
        candidate, k = name, 1
        while candidate in seen:
            k += 1
            candidate = f"{name} #{k}"
        seen.add(candidate)
        out.append(candidate)
    return out


# -- the service: detector, batcher and readiness ---------------------------------------------------

RESULT_NAME = re.compile(r"^(\d{8}T\d{12}Z)-[0-9a-f]{32}\.json$")


class ResultsFolder:
    """The results folder, kept within ``keep`` files and ``max_age_days``, oldest removed first.

    The folder's files are listed once at start; after that every write adds its name to an
    in-memory queue, so keeping the limit costs no directory listing per request. Only files named
    as this server names them are ever removed.
    """

    def __init__(self, folder: Path, keep: int, max_age_days: float) -> None:
        self.folder = folder
        self.keep = keep
        self.max_age_s = max_age_days * 86_400.0
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)
        self._files = collections.deque(sorted(p.name for p in folder.iterdir() if RESULT_NAME.match(p.name)))
        self.removed = 0
        self.prune()

    @staticmethod
    def _stamp_time(name: str) -> float:
        stamp = RESULT_NAME.match(name).group(1)  # type: ignore[union-attr]
        return datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=timezone.utc).timestamp()

    def write(self, request_id: str, body: dict[str, Any]) -> Path:
        """Write one request's records, atomically (never the images), then apply the limits."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        path = self.folder / f"{stamp}-{request_id}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"received": stamp, **body}, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        with self._lock:
            self._files.append(path.name)
        self.prune()
        return path

    def prune(self) -> None:
        now = time.time()
        while True:
            with self._lock:
                if not self._files:
                    return
                oldest = self._files[0]
                over_count = self.keep and len(self._files) > self.keep
                too_old = self.max_age_s and now - self._stamp_time(oldest) > self.max_age_s
                if not (over_count or too_old):
                    return
                self._files.popleft()
            try:
                (self.folder / oldest).unlink()
                self.removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove old result %s: %s", oldest, exc)


class Service:
    """What the routes share: settings, the detector once loaded, the decoding lanes and the micro-batcher."""

    def __init__(self, detector: Detector | None, settings: ServeSettings,
                 loader: Callable[[], Detector] | None) -> None:
        if detector is None and loader is None:
            raise TidyError("create_app needs a detector or a loader that builds one")
        self.settings = settings
        self.detector: Detector | None = None
        self.loader = loader
        self.status = "loading"
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self.batcher: MicroBatcher[tuple[LoadedImage, str], dict[str, Any]] = MicroBatcher(
            self.predict_batch, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
            max_pending=settings.max_pending)
        self.decoder = DecodePool(settings.decode_pixels, settings.decode_workers, settings.small_image_pixels)
        # Provenance reads each upload's bytes (the watermark check decodes images of at most 1.2M
        # pixels once more, ~15 MB each): threads of its own, so it never holds up the decoding lanes.
        self.provenance_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.results: ResultsFolder | None = None
        self.scrubber = PathScrubber()
        self._summary: dict[str, Any] | None = None
        self._load_task: asyncio.Future | None = None
        if detector is not None:
            self._ready(detector)

    async def start(self) -> None:
        await self.batcher.start()
        self.decoder.start()
        if self.provenance_pool is None:
            self.provenance_pool = concurrent.futures.ThreadPoolExecutor(
                max(1, self.settings.decode_workers), thread_name_prefix="tidy-provenance")
        if self.settings.results_dir is not None and self.results is None:
            self.results = ResultsFolder(self.settings.results_dir, self.settings.results_keep,
                                         self.settings.results_max_age_days)
        if self.detector is None and self._load_task is None:
            # Not awaited: the server answers (/healthz says "loading") while the models load.
            self._load_task = asyncio.ensure_future(self._load())

    async def stop(self) -> None:
        await self.batcher.close()
        self.decoder.stop()
        if self.provenance_pool is not None:
            self.provenance_pool.shutdown(wait=False, cancel_futures=True)
            self.provenance_pool = None
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            detector = await asyncio.get_running_loop().run_in_executor(None, self.loader)
        except Exception as exc:
            message = str(exc) or type(exc).__name__
            log.error("loading the models failed: %s", message)
            # The log keeps the paths; clients get the message without them.
            self.status, self.load_error = "failed", PathScrubber().text(message)
            return
        self._ready(detector)
        self.load_seconds = time.perf_counter() - started
        log.info("models loaded in %.1f s; ready", self.load_seconds)

    def _ready(self, detector: Detector) -> None:
        extraction = detector.metadata.get("extraction", {})
        folders = [(extraction.get(part) or {}).get("source") for part in ("clip", "captioner", "grounder")]
        try:
            folders += [(detector.extractor.extraction.get(part) or {}).get("source")
                        for part in ("clip", "captioner", "grounder")]
        except Exception:  # a detector without loaded models (tests): the head's sources are enough
            pass
        self.scrubber = PathScrubber(folders)
        self.detector, self.status = detector, "ready"

    def require_ready(self) -> Detector:
        if self.detector is None:
            if self.status == "failed":
                raise ApiError(503, "load_failed", f"the models failed to load: {self.load_error}")
            raise ApiError(503, "loading", "the models are still loading; retry when GET /healthz says ready",
                           headers={"Retry-After": "5"})
        return self.detector

    @property
    def max_pixels(self) -> int:
        # The detector re-checks with its own limit, so a larger setting could not take effect.
        assert self.detector is not None
        own = self.detector.extractor.config.runtime.max_pixels
        return min(self.settings.max_pixels or own, own)

    @property
    def view_size(self) -> int:
        """The side of CLIP's native-resolution centre crop, which reduction must keep."""
        assert self.detector is not None
        clip = getattr(self.detector.extractor, "clip", None)
        return int(getattr(clip, "view_size", None) or 224)

    def predict_batch(self, items: list[tuple[LoadedImage, str]]) -> list[dict[str, Any]]:
        """The forward step, run in the batcher's worker thread: detection records, in order."""
        assert self.detector is not None
        names = [name for _, name in items]
        internal = unique_names(names)
        records = self.detector.predict_loaded([(used, loaded) for used, (loaded, _) in zip(internal, items)])
        for record, name, used in zip(records, names, internal):
            if used != name:  # two uploads with the same file name in one batch
                record["path"] = name
                if record.get("error"):
                    record["error"] = record["error"].replace(used, name)
            if record.get("error"):  # a model's own message may name its folder
                record["error"] = self.scrubber.text(record["error"], any_path=False)
        return records

    def error_record(self, name: str, exc: ImageError) -> dict[str, Any]:
        """The detector's own record for an image that cannot be decoded."""
        from tidy_detect.data.inputs import ImageItem
        from tidy_detect.features.extractor import error_row

        assert self.detector is not None
        return self.detector.score_rows([error_row(ImageItem(name), exc)])[0]

    def model_summary(self) -> dict[str, Any]:
        """A short description of the detector, sent with every result (no server paths)."""
        detector = self.require_ready()
        if self._summary is None:
            info = detector.info()
            self._summary = {"models": public_models(info["models"], detector.metadata.get("extraction", {})),
                             "representation": info["representation"]["kind"], "threshold": info["threshold"],
                             "random_weights": info["random_weights"],
                             "random_weight_models": info["random_weight_models"],
                             "package_version": __version__}
        return self._summary

    def info(self) -> dict[str, Any]:
        """Everything ``GET /v1/info`` reports."""
        detector = self.require_ready()
        info = detector.info()
        extraction = detector.metadata.get("extraction", {})
        grounder, phrases = extraction.get("grounder", {}), extraction.get("phrases", {})
        data = dict(info.get("training", {}).get("data") or {})
        data.pop("stores", None)  # server-side paths say nothing useful to a client
        s = self.settings
        body = {
            "package_version": __version__,
            "status": self.status,
            "models": public_models(info["models"], extraction),
            # True on the tiny bundle's random weights: every verdict of this server means nothing.
            "random_weights": info["random_weights"],
            "random_weight_models": info["random_weight_models"],
            "device": info["device"],
            "dtype": info["dtype"],
            "head": {"representation": info["representation"], "hyperparameters": info["head"],
                     "training_data": data, "metrics": info.get("metrics", {}),
                     "trained_with_version": info.get("package_version")},
            "thresholds": {"p_fake": info["threshold"], "box": grounder.get("box_threshold"),
                           "text": grounder.get("text_threshold"), "max_objects": phrases.get("max_objects")},
            "limits": {"max_upload_bytes": s.max_upload_bytes, "max_files": s.max_files,
                       "max_pixels": self.max_pixels, "max_pending": s.max_pending,
                       "max_request_pixels": s.max_request_pixels, "reduce_max_side": s.reduce_max_side},
            "decoding": self.decoder.stats(),
            "batching": {"max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms,
                         **self.batcher.stats.to_dict(), "pending": self.batcher.pending},
            "provenance": detector.provenance_info(),
            "api_key_required": s.api_key is not None,
            "load_seconds": None if self.load_seconds is None else round(self.load_seconds, 3),
        }
        return self.scrubber.value(body)  # whatever else a head's metadata holds: no paths either

    async def decode_and_score(self, uploads: list[Upload]) -> list[dict[str, Any]]:
        """Decode every upload once, each under the pixel budgets, and score each as soon as it is
        decoded; records in upload order.

        Raises:
            ApiError: 413 the images add up to more than ``max_request_pixels``; for a request of
                one file, that file's image error; 503 the model queue is full or closing.
        """
        settings = self.settings
        try:
            self.batcher.ensure_room(len(uploads))  # before any decoding work is spent on them
        except BatcherBusyError as exc:
            raise ApiError(503, "busy", str(exc), headers={"Retry-After": "1"}) from None
        pixels = await self.decoder.pixels([u.data for u in uploads])
        max_pixels, view_size = self.max_pixels, self.view_size
        # An image over max_pixels is refused on its own (422, from its header) and decodes nothing.
        total = sum(count for count in pixels if count <= max_pixels)
        if total > settings.max_request_pixels:
            raise ApiError(413, "too_many_pixels",
                           f"the images of this request have {total:,} pixels together, over this server's limit of "
                           f"{settings.max_request_pixels:,} per request; send fewer images per request or "
                           f"downscaled copies")

        detector = self.require_ready()
        assert self.provenance_pool is not None, "Service.start() first"

        async def one(upload: Upload, count: int) -> dict[str, Any]:
            provenance = asyncio.wrap_future(self.provenance_pool.submit(detector.read_provenance, upload.data))
            try:
                decoded = await self.decoder.decode(upload.data, upload.name, count, max_pixels=max_pixels,
                                                    reduce_max_side=settings.reduce_max_side, view_size=view_size)
                upload.data = b""  # the provenance thread keeps its own reference until it is done
                if isinstance(decoded.result, ImageError):
                    if len(uploads) == 1:
                        raise image_api_error(decoded.result, max_pixels)
                    record = self.error_record(upload.name, decoded.result)
                else:
                    [record] = await self.batcher.submit([(decoded.result, upload.name)])
                record["provenance"] = await provenance
                return record
            finally:
                provenance.cancel()  # a failed request: a read not yet started is not needed

        tasks = [asyncio.ensure_future(one(u, n)) for u, n in zip(uploads, pixels)]
        try:
            return list(await asyncio.gather(*tasks))
        except BatcherBusyError as exc:
            raise ApiError(503, "busy", str(exc), headers={"Retry-After": "1"}) from None
        except BatcherClosedError as exc:
            raise ApiError(503, "shutting_down", str(exc)) from None
        finally:
            for task in tasks:  # one failed: the others' work is wasted, stop it
                task.cancel()

    def write_results(self, request_id: str, body: dict[str, Any]) -> Path:
        """Write one request's records to the results folder (see :class:`ResultsFolder`)."""
        assert self.results is not None
        return self.results.write(request_id, body)


# -- the app ---------------------------------------------------------------------------------------

def create_app(detector: Detector | None = None, settings: ServeSettings | None = None, *,
               loader: Callable[[], Detector] | None = None) -> FastAPI:
    """Build the web service around a detector.

    Args:
        detector: a loaded :class:`~tidy_detect.detect.Detector` (tests build one once and inject it).
        settings: limits, batching, API key, results folder (defaults: :class:`ServeSettings`).
        loader: instead of ``detector``, a function that loads one; it runs in a thread when the app
            starts, and ``/healthz`` answers 503 ``loading`` until it returns.

    Returns:
        The FastAPI app. Run it under its lifespan (uvicorn, or ``with TestClient(app)``): the
        micro-batcher starts and stops with it.

    Raises:
        TidyError: neither a detector nor a loader.
    """
    settings = settings or ServeSettings()
    service = Service(detector, settings, loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="tidy-detect",
        version=__version__,
        description="Detects AI-generated images from the discrepancy between an image, its caption and the "
                    "objects the caption names, in CLIP space (TIDY). Upload images to `POST /v1/detect`.",
        lifespan=lifespan,
    )
    app.state.service = service
    _add_error_handlers(app)

    v1_dependencies = [Depends(_api_key_check(settings.api_key))] if settings.api_key else []

    @app.get("/healthz", tags=["service"], summary="Readiness: 200 once the models are loaded, 503 before")
    async def healthz() -> JSONResponse:
        if service.status == "ready":
            return JSONResponse({"status": "ready"})
        body = {"status": service.status}
        if service.load_error:
            body["error"] = service.load_error
        return JSONResponse(body, status_code=503)

    error_responses = {status: {"model": ErrorBody} for status in (400, 401, 413, 415, 422, 503)}

    @app.post("/v1/detect", tags=["detection"], dependencies=v1_dependencies, response_model=None,
              summary="Score uploaded images and explain each score",
              responses={200: {"model": DetectResponse}, **error_responses},
              openapi_extra={"requestBody": MULTIPART_BODY})
    async def detect(request: Request) -> JSONResponse:
        """One record per uploaded file, in upload order (the records of `tidy-detect detect --format json`).

        In a request of several files, a file that is not a readable image gets a record with `error`
        set and the others are scored; a request of one such file gets an error status instead."""
        service.require_ready()
        uploads = await read_uploads(request, settings)
        records = await service.decode_and_score(uploads)
        request_id = uuid.uuid4().hex
        body = {"request_id": request_id, "records": records, "model": service.model_summary()}
        if service.results is not None:
            await run_in_threadpool(service.write_results, request_id, body)
        return JSONResponse(body, headers={"X-Request-ID": request_id})

    @app.get("/v1/info", tags=["service"], dependencies=v1_dependencies,
             summary="Package version, models, head summary, thresholds, limits and batching counters",
             responses={503: {"model": ErrorBody}, 401: {"model": ErrorBody}})
    async def info() -> dict[str, Any]:
        return service.info()

    index = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index, headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _api_key_check(key: str) -> Callable[..., Any]:
    expected = key.encode("utf-8")
    # Declared through FastAPI's security classes so /docs shows both ways to authenticate.
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")

    async def check(credentials: Optional[HTTPAuthorizationCredentials] = Security(bearer),
                    x_api_key: Optional[str] = Security(header)) -> None:
        supplied = x_api_key if x_api_key is not None else (credentials.credentials if credentials else None)
        if supplied is not None and hmac.compare_digest(supplied.encode("utf-8"), expected):
            return
        problem = "the API key given is wrong" if supplied is not None else "no API key given"
        raise ApiError(401, "unauthorized",
                       f"{problem}; this server needs one on /v1 routes: send the header "
                       f"'Authorization: Bearer KEY' or 'X-API-Key: KEY'", headers={"WWW-Authenticate": "Bearer"})

    return check


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", f"the request is not valid: {exc.errors()}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        incident = uuid.uuid4().hex[:12]
        log.exception("unexpected error on %s %s (incident %s)", request.method, request.url.path, incident)
        # The exception's text may name server paths: it goes to the log, the client gets the incident id.
        return error_response(500, "internal", f"internal error ({type(exc).__name__}, incident {incident}); this is "
                                               f"a bug in tidy-detect, please report it with the server log")
