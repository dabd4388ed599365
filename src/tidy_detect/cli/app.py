"""The ``tidy-detect`` typer app and its conventions. Library errors become one clear line and an
exit code here (``errors.EXIT_CODES``, listed in ``tidy-detect --help``)."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import escape

from tidy_detect import __version__
from tidy_detect.errors import EXIT_CODES, TidyError

# -h as well as --help, everywhere (click passes the setting down to every subcommand).
CONTEXT = {"help_option_names": ["-h", "--help"]}


def _no_flag_metavar() -> None:
    """typer's rich help shows a type for flags (``--force <bool>``, ``-v <int>``), which reads as if
    they took a value; flags and counters show none (a counter's help says ``-v``/``-vv``).
    Guarded: an older or newer typer without this method keeps its own rendering."""
    option = getattr(getattr(typer, "core", None), "TyperOption", None)
    original = getattr(option, "display_type_rich", None)
    if original is None or getattr(original, "_tidy_flags", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> Any:
        if getattr(self, "is_flag", False) or getattr(self, "count", False):
            return None
        return original(self, ctx)

    display_type_rich._tidy_flags = True  # type: ignore[attr-defined]
    option.display_type_rich = display_type_rich


_no_flag_metavar()

app = typer.Typer(
    name="tidy-detect",
    help="Detect AI-generated images from the discrepancy between an image and its caption in CLIP space (TIDY).",
    epilog="Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES) + ".",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings=CONTEXT,
)
models_app = typer.Typer(help="List the available models and presets; build the tiny offline bundle.",
                         no_args_is_help=True, context_settings=CONTEXT)
store_app = typer.Typer(help="Inspect and maintain feature stores.", no_args_is_help=True, context_settings=CONTEXT)
app.add_typer(models_app, name="models")
app.add_typer(store_app, name="store")

out = Console()
err = Console(stderr=True)
_state = {"traceback": False}
log = logging.getLogger("tidy_detect")


def _version(value: bool) -> None:
    if value:
        out.print(f"tidy-detect {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, show_default=False,
                                help="More log output: -v for progress details, -vv for debug."),
    traceback: bool = typer.Option(False, "--traceback", help="Show the full traceback on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["traceback"] = traceback
    from rich.logging import RichHandler

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=err, show_path=False)], force=True)
    if verbose < 2:
        for noisy in ("transformers", "huggingface_hub", "urllib3", "filelock"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    _show_status()


class _StatusLines(logging.Handler):
    """Prints the library's status messages (models loading) as dim lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            err.print(f"[dim]• {escape(record.getMessage())}[/]", highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - a status line must never fail a command
            self.handleError(record)


def _show_status() -> None:
    status = logging.getLogger("tidy_detect.status")
    status.handlers = [h for h in status.handlers if not isinstance(h, _StatusLines)] + [_StatusLines()]
    status.setLevel(logging.INFO)
    status.propagate = False


def command(parent: typer.Typer, *args: Any, example: str | None = None, **kwargs: Any
            ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command whose TidyErrors print as one line with the error's exit code.

    ``example`` is a command line shown at the end of the command's help.
    """
    if example:
        kwargs["epilog"] = f"Example: {example}" + (f"\n\n{kwargs['epilog']}" if kwargs.get("epilog") else "")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            try:
                return fn(*a, **k)
            except TidyError as exc:
                if _state["traceback"]:
                    raise
                err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                err.print("[yellow]interrupted[/]; finished work is saved, rerun the same command to go on")
                raise typer.Exit(130) from None
            except (typer.Exit, typer.Abort):
                raise
            except Exception as exc:
                if _state["traceback"]:
                    raise
                err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}\n"
                          f"This is a bug in tidy-detect; rerun with --traceback and report the output.",
                          highlight=False, soft_wrap=True)
                raise typer.Exit(70) from None

        return parent.command(*args, **kwargs)(wrapper)

    return decorate


