"""The ``tidy-detect serve`` command: the web service on uvicorn (the ``serve`` extra).

FastAPI and uvicorn are imported inside the command, so ``tidy-detect --help`` stays fast and works
without the extra. The server starts listening at once and loads the models in the background;
``GET /healthz`` answers 503 ``loading`` until they are ready, then 200 ``ready``. If loading fails,
the server stops and the command exits with the loading error.

``python -m tidy_detect.cli serve ...`` is the same command (the load benchmark uses it).
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any, Optional

import typer

from tidy_detect.cli.app import command
from tidy_detect.cli.options import NoSpeedupsOpt
from tidy_detect.errors import ConfigError, TidyError
from tidy_detect.serve.settings import ServeSettings

SERVE_EXTRA_MESSAGE = "the web service needs the serve extra: pip install 'tidy-detect[serve]'"
API_KEY_ENV = "TIDY_DETECT_API_KEY"


def require_serve_extra() -> None:
    """Raise TidyError naming the extra when FastAPI, uvicorn or python-multipart is missing."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise TidyError(f"{SERVE_EXTRA_MESSAGE} ({exc.name or exc} is not installed)") from None


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the ``tidy-detect`` typer app."""

    defaults = ServeSettings()

    @command(app, "serve", example="tidy-detect serve --head heads/tidy.safetensors --port 8000",
             epilog=f"Memory at the defaults: {defaults.memory_summary()}. See the README's "
                                  f"'Deployment' section for what to put in front of a public server.")
    def serve_cmd(
        head: str = typer.Option(..., "--head", help="Head file (.safetensors) from `tidy-detect train` or `calibrate`, or a hub reference ORG/REPO (or ORG/REPO/FILE.safetensors, ORG/REPO@REVISION)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port."),
        max_batch: int = typer.Option(8, "--max-batch", min=1, help="Most images per model call (1: no micro-batching)."),
        max_wait_ms: float = typer.Option(20.0, "--max-wait-ms", min=0,
                                          help="How long an image waits for others to share its model call."),
        max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest request body in MiB (413 above)."),
        max_files: int = typer.Option(16, "--max-files", min=1, help="Most files per request (413 above)."),
        max_pixels: Optional[int] = typer.Option(None, "--max-pixels", min=1,
                                                 help="Most pixels per image (422 above; default: the detector's, 100M)."),
        max_request_pixels: int = typer.Option(defaults.max_request_pixels, "--max-request-pixels", min=1,
                                               help="Most pixels of all images of one request, from their headers "
                                                    "(413 above)."),
        decode_pixels: int = typer.Option(defaults.decode_pixels, "--decode-pixels", min=1,
                                          help="Pixels decoded at once, server-wide (about 8 bytes each); "
                                               "larger images wait their turn."),
        decode_workers: int = typer.Option(defaults.decode_workers, "--decode-workers", min=1,
                                           help="Threads decoding large images (small ones have their own)."),
        small_image_pixels: int = typer.Option(defaults.small_image_pixels, "--small-image-pixels", min=1,
                                               help="Images up to this many pixels decode in their own lane, never "
                                                    "behind large ones."),
        reduce_max_side: int = typer.Option(defaults.reduce_max_side, "--reduce-max-side", min=0,
                                            help="Downscale decoded images to this longer side for the models "
                                                 "(CLIP's centre crop stays native; 0: off)."),
        max_pending: int = typer.Option(256, "--max-pending", min=1, help="Most images waiting for the model (503 above)."),
        max_connections: int = typer.Option(defaults.max_connections, "--max-connections", min=1,
                                            help="Most open connections (also kept below ulimit -n); the oldest idle "
                                                 "one is closed for a new one."),
        header_timeout: float = typer.Option(defaults.header_timeout, "--header-timeout",
                                             help="Seconds to receive a request's headers (408 after)."),
        body_timeout: float = typer.Option(defaults.body_timeout, "--body-timeout",
                                           help="Most seconds between two chunks of a request body (408 after)."),
        body_total_timeout: float = typer.Option(defaults.body_total_timeout, "--body-total-timeout",
                                                 help="Most seconds for a whole request body (408 after)."),
        keepalive_timeout: float = typer.Option(defaults.keepalive_timeout, "--keepalive-timeout",
                                                help="Seconds an idle keep-alive connection stays open."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar=API_KEY_ENV, show_envvar=True,
                                              help=f"Require this key on /v1 routes (prefer the {API_KEY_ENV} "
                                                   f"variable: a command line is visible to other users)."),
        results_dir: Optional[Path] = typer.Option(None, "--results-dir",
                                                   help="Write each request's JSON records here (never the images)."),
        results_keep: int = typer.Option(defaults.results_keep, "--results-keep", min=0,
                                         help="Most files kept in --results-dir, oldest removed first (0: all)."),
        results_max_age: float = typer.Option(defaults.results_max_age_days, "--results-max-age", min=0,
                                              help="Days a file stays in --results-dir (0: no limit)."),
        threshold: float = typer.Option(0.5, "--threshold", help="p_fake above this is 'fake'."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
        clip: Optional[str] = typer.Option(None, "--clip", help="Load the head's CLIP from here (same checkpoint)."),
        captioner_model: Optional[str] = typer.Option(None, "--captioner-model", help="Load the head's captioner from here."),
        grounder_model: Optional[str] = typer.Option(None, "--grounder-model", help="Load the head's grounder from here."),
        no_speedups: bool = NoSpeedupsOpt,
        log_level: str = typer.Option("info", "--log-level",
                                      help="uvicorn's log level: critical, error, warning, info, debug."),
    ) -> None:
        """Serve detection over HTTP: POST /v1/detect, GET /v1/info, /healthz, /docs, and the page at /."""
        if max_upload_mb <= 0:
            raise ConfigError(f"--max-upload-mb must be > 0, got {max_upload_mb!r}")
        try:
            require_serve_extra()
        except TidyError as exc:
            # Printed here rather than by the CLI's error handler, whose rich markup would swallow "[serve]".
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        run_server(head, host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms,
                   max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_files=max_files, max_pixels=max_pixels,
                   max_request_pixels=max_request_pixels, decode_pixels=decode_pixels, decode_workers=decode_workers,
                   small_image_pixels=small_image_pixels, reduce_max_side=reduce_max_side,
                   max_pending=max_pending, max_connections=max_connections, header_timeout=header_timeout,
                   body_timeout=body_timeout, body_total_timeout=body_total_timeout,
                   keepalive_timeout=keepalive_timeout, api_key=api_key, results_dir=results_dir,
                   results_keep=results_keep, results_max_age_days=results_max_age, threshold=threshold,
                   device=device, dtype=dtype, clip=clip, captioner_model=captioner_model,
                   grounder_model=grounder_model, log_level=log_level, speedups=not no_speedups)


def run_server(head: str | Path, *, host: str, port: int, log_level: str = "info", threshold: float = 0.5,
               device: str = "auto", dtype: str = "auto", clip: str | None = None,
               captioner_model: str | None = None, grounder_model: str | None = None, speedups: bool = True,
               **settings: Any) -> None:
    """Listen on ``host:port`` until interrupted, loading the detector in the background.

    ``settings`` are :class:`~tidy_detect.serve.settings.ServeSettings` fields. The detector's model
    batch size is ``max_batch``, so one micro-batch is one forward pass. The port is bound first,
    so a taken port fails before any model is loaded.

    Raises:
        TidyError: the serve extra is missing; ConfigError: a bad setting, or the port cannot be
        bound; CheckpointError and ModelLoadError: the head or its models cannot be loaded (the
        server stops first).
    """
    require_serve_extra()
    from tidy_detect.serve.app import create_app
    from tidy_detect.serve.server import bind_socket, build_server, raise_open_file_limit

    from tidy_detect.sharing import resolve_head

    serve_settings = ServeSettings(**settings)
    head = resolve_head(head)  # a missing local file or hub head fails here, before the port is taken
    open_files = raise_open_file_limit()  # before binding: every connection is an open file
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    failure: list[BaseException] = []
    server: Any = None

    def load() -> Any:
        from tidy_detect.detect import Detector

        started = time.perf_counter()
        try:
            detector = Detector.load(head, device=device, dtype=dtype, batch_size=serve_settings.max_batch,
                                     threshold=threshold, clip=clip, captioner_model=captioner_model,
                                     grounder_model=grounder_model, speedups=speedups)
        except BaseException as exc:
            failure.append(exc)
            server.should_exit = True  # nothing to serve without models: stop and report
            raise
        typer.echo(f"tidy-detect: models loaded in {time.perf_counter() - started:.1f} s; ready on "
                   f"http://{_url_host(host)}:{bound_port}/ (API docs at /docs)", err=True)
        if detector.info().get("random_weights"):
            typer.echo("tidy-detect: warning: these models have random weights (the tiny test bundle?); "
                       "every verdict this server gives is meaningless", err=True)
        return detector

    if serve_settings.api_key is None and not _is_loopback(host):
        typer.echo(f"tidy-detect: warning: listening on {host} without an API key; anyone who can reach it can "
                   f"use it (set {API_KEY_ENV} or --api-key)", err=True)
    try:
        app = create_app(settings=serve_settings, loader=load)
        # One process only: the models are loaded once and the batcher sees every request.
        server = build_server(app, serve_settings, log_level=log_level, open_files=open_files)
        typer.echo(f"tidy-detect: listening on http://{_url_host(host)}:{bound_port}/, loading the models; at most "
                   f"{server.protocol.registry.cap:,} connections; {serve_settings.memory_summary()}", err=True)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            # uvicorn has already shut down gracefully and re-raises Ctrl-C; for a server that is a normal stop.
            typer.echo("tidy-detect: server stopped", err=True)
    finally:
        sock.close()
    if failure:
        error = failure[0]
        if isinstance(error, TidyError):
            raise error
        raise TidyError(f"loading the models of {head} failed ({type(error).__name__}: {error})") from error


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
