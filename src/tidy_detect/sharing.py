"""Where a head comes from: a local file, or a Hugging Face hub reference for ``--head``.

A head reference is a local path, or, when no such file exists, a file in a hub model repository::

    ORG/REPO                              ORG/REPO's head.safetensors (DEFAULT_FILENAME)
    ORG/REPO/FILE.safetensors             another file of the repository (may be in folders)
    ORG/REPO@REVISION[/FILE.safetensors]  at a branch, tag or commit (default: main)

with ``hf://`` in front allowed (then never a local path). Files come through
``huggingface_hub.hf_hub_download`` into the ordinary hub cache (``HF_HUB_CACHE``, else
``HF_HOME/hub``, read when the head is resolved), so a head downloaded once is used offline after.
Like the models (:mod:`tidy_detect.models.loading`), the cache is tried first; the network only
when the file is not cached, offline mode (``HF_HUB_OFFLINE=1``) is off and the hub is reachable.
A resolved file is then read and checked like any local head, its extraction config included.
Model cards to publish a head with are written by :mod:`tidy_detect.cards`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tidy_detect.errors import CheckpointError, ConfigError

DEFAULT_FILENAME = "head.safetensors"
HUB_PREFIX = "hf://"
LIBRARY_NAME = "tidy-detect"
# A revision is one path segment: a branch, a tag or a commit hash.
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class HubReference:
    """A head file in a hub model repository."""

    repo_id: str
    filename: str = DEFAULT_FILENAME
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}{'@' + self.revision if self.revision else ''}/{self.filename}"


def parse_hub_reference(text: str) -> HubReference | None:
    """The hub reference ``text`` spells, or None when it is not of that form (see the module docs).

    ``ORG/REPO`` is a reference; so is ``ORG/REPO/.../NAME.safetensors``. Anything starting with
    ``/``, ``.`` or ``~``, or with more than two parts that does not end in ``.safetensors``, is not.

    Raises:
        ConfigError: ``text`` starts with ``hf://`` but is not a valid reference, or names an
            invalid repository id or revision.
    """
    text = str(text).strip()
    explicit = text.startswith(HUB_PREFIX)
    body = text[len(HUB_PREFIX):] if explicit else text
    form = f"ORG/REPO[@REVISION][/FILE.safetensors], got {text!r}"
    if not explicit and (body.startswith(("/", ".", "~")) or "\\" in body):
        return None
    parts = body.split("/")
    if len(parts) < 2 or not all(parts) or any(p in (".", "..") for p in parts) \
            or (len(parts) > 2 and not parts[-1].endswith(".safetensors")):
        if explicit:
            raise ConfigError(f"a hub head reference must be {form}")
        return None
    if len(parts) == 2 and not explicit and parts[1].endswith((".safetensors", ".json")):
        return None  # "heads/tidy.safetensors": a local file, mistyped or missing, not a repository
    org, repo = parts[0], parts[1]
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
        if not _REVISION.match(revision):
            raise ConfigError(f"the revision of hub head reference {text!r} must be a branch, tag or commit "
                              f"(letters, digits, '.', '_', '-'), got {revision!r}")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = f"{org}/{repo}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        if not explicit and len(parts) == 2:
            return None  # "heads/my head", say: a local name, not a repository
        raise ConfigError(f"hub head reference {text!r}: {repo_id!r} is not a valid repository id ({exc})") from None
    filename = "/".join(parts[2:]) or DEFAULT_FILENAME
    return HubReference(repo_id, filename, revision)


def hub_cache_dir() -> str | None:
    """The hub cache folder as the environment says now (``HF_HUB_CACHE``, else ``HF_HOME/hub``);
    None leaves huggingface_hub's own default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _cache_shown() -> str:
    from huggingface_hub import constants

    return hub_cache_dir() or str(constants.HF_HUB_CACHE)


def local_head_file(path: str | Path) -> Path:
    """``path``, or ``path`` with ``.safetensors`` added, whichever is a file.

    Raises:
        CheckpointError: neither is a file.
    """
    path = Path(path).expanduser()
    if not path.is_file() and path.with_suffix(".safetensors").is_file():
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such head checkpoint; train one with `tidy-detect train`, or calibrate "
                              f"a one-class head with `tidy-detect calibrate`")
    return path


def resolve_head(reference: str | Path) -> Path:
    """The local file of a head reference: the path itself when it exists, else the hub file
    (from the cache, downloaded when allowed and needed).

    Raises:
        CheckpointError: no such local file and not a hub reference; or a hub file that is not
            cached and cannot be downloaded (offline, unreachable, no such repository, file or
            revision); the message says what to do.
        ConfigError: a malformed ``hf://`` reference.
    """
    text = str(reference)
    if not text.startswith(HUB_PREFIX):
        path = Path(text).expanduser()
        if path.is_file() or path.with_suffix(".safetensors").is_file():
            return local_head_file(path)
    hub = parse_hub_reference(text)
    if hub is None:
        return local_head_file(text)  # raises the plain "no such head checkpoint"
    return _download(hub, text)


def _download(hub: HubReference, text: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from tidy_detect import __version__
    from tidy_detect.models.loading import hub_offline, hub_reachable

    where = (f"head {text!r}" + ("" if text.startswith(HUB_PREFIX) else " (no such local file)")
             + f": hub repository {hub.repo_id}, file {hub.filename}"
             + (f", revision {hub.revision}" if hub.revision else ""))
    options = {"revision": hub.revision, "cache_dir": hub_cache_dir(), "library_name": LIBRARY_NAME,
               "library_version": __version__}
    try:
        return Path(hf_hub_download(hub.repo_id, hub.filename, local_files_only=True, **options))
    except LocalEntryNotFoundError:
        pass  # not cached (or the revision's ref is not): try the hub if we may
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: the local hub cache ({_cache_shown()}) cannot be read ({exc})") from None
    download = f"hf download {hub.repo_id} {hub.filename}" + (f" --revision {hub.revision}" if hub.revision else "")
    if hub_offline() or not hub_reachable():
        reason = "offline mode is on (HF_HUB_OFFLINE)" if hub_offline() else "the hub cannot be reached"
        raise CheckpointError(
            f"{where}: it is not in the local hub cache ({_cache_shown()}) and {reason}. Run `{download}` where "
            f"there is network (with the same HF_HUB_CACHE, or copy the cache folder here), or download the file "
            f"and pass its path to --head.")
    try:
        return Path(hf_hub_download(hub.repo_id, hub.filename, **options))
    except GatedRepoError:
        raise CheckpointError(f"{where}: the repository is gated; accept its terms on the hub and log in "
                              f"(`hf auth login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{where}: no such repository on the hub (or it is private: log in with "
                              f"`hf auth login` or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{where}: the repository has no revision {hub.revision!r}") from None
    except EntryNotFoundError:
        raise CheckpointError(f"{where}: the repository has no file {hub.filename!r}; name the head file as "
                              f"{hub.repo_id}/FILE.safetensors") from None
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"{where}: the download failed ({exc}); retry, or run `{download}` and pass the file "
                              f"to --head") from None
