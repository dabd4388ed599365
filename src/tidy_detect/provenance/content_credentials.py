"""C2PA Content Credentials, read and validated by the official c2pa-python bindings.

The library validates the manifest store (the claim signature, the hashes binding it to the image
data, the signer's certificate chain against the trust anchors); this module only maps its
validation results to one status and reports the claim generator, the signer and the actions with
their IPTC digital source types. Remote manifests and certificate-status (OCSP) requests are never
fetched: the file alone is read, and nothing about it leaves the machine.
"""

from __future__ import annotations

import functools
import io
import json
import threading
from typing import Any

from tidy_detect.provenance.findings import Finding, Findings, clip
from tidy_detect.provenance.options import ProvenanceOptions, TRUST_ENV
from tidy_detect.provenance.vocabulary import digital_source_type, known_generator

MIME_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "TIFF": "image/tiff",
              "GIF": "image/gif", "AVIF": "image/avif", "HEIF": "image/heif"}
MAX_ACTIONS = 16

# The status reported, from the library's validation results (c2pa "validation_state" and the
# failure codes of the active manifest):
STATUS_MEANINGS = {
    "valid": "the signature is intact, the image data is what was signed, and the signer's certificate "
             "chains to a trusted root",
    "untrusted": "the signature is intact and the image data is what was signed, but the signer's certificate "
                 f"does not chain to a trusted root (add roots with {TRUST_ENV})",
    "tampered": "the image data (or an assertion) changed after it was signed",
    "invalid-signature": "the claim's signature does not verify (the manifest changed after signing, or the "
                         "signing certificate is invalid, expired or revoked)",
    "invalid": "the manifest failed validation",
}
_SIGNATURE_FAILURES = ("claimSignature.", "signingCredential.invalid", "signingCredential.revoked",
                       "signingCredential.expired", "timeStamp.mismatch", "algorithm.unsupported")
_TAMPER_FAILURES = ("assertion.dataHash.mismatch", "assertion.bmffHash.mismatch", "assertion.boxesHash.mismatch",
                    "assertion.collectionHash.mismatch", "assertion.hashedURI.mismatch")


def unavailable() -> str | None:
    """Why C2PA cannot be read here (the bindings are missing or do not load), or None."""
    return _load()[1]


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Any, str | None]:
    try:
        import c2pa
    except ImportError:
        return None, "c2pa-python is not installed (pip install c2pa-python)"
    except OSError as exc:  # the native library does not load on this platform
        return None, f"the c2pa native library does not load ({str(exc)[:120]})"
    return c2pa, None


_contexts: dict[str | None, Any] = {}
_contexts_lock = threading.Lock()


def _context(c2pa: Any, trust_anchors: str | None) -> Any:
    """One c2pa Context per set of trust anchors (a Context may serve many Readers)."""
    with _contexts_lock:
        if trust_anchors not in _contexts:
            settings: dict[str, Any] = {"verify": {"verify_after_reading": True, "verify_trust": True,
                                                   "remote_manifest_fetch": False, "ocsp_fetch": False}}
            if trust_anchors:
                settings["trust"] = {"user_anchors": trust_anchors}
            _contexts[trust_anchors] = c2pa.Context.from_dict(settings)
        return _contexts[trust_anchors]


def status_of(state: str | None, failures: list[str]) -> str:
    """One status from the library's ``validation_state`` and failure codes (see STATUS_MEANINGS)."""
    if any(code.startswith(_SIGNATURE_FAILURES) for code in failures):
        return "invalid-signature"
    if any(code.startswith(_TAMPER_FAILURES) for code in failures):
        return "tampered"
    if "signingCredential.untrusted" in failures:
        return "untrusted"
    if state == "Trusted" and not failures:
        return "valid"
    if state == "Valid" and not failures:
        return "untrusted"  # with trust checking on, "Valid" is what an untrusted, intact manifest gets
    return "invalid"


def _agent(action: dict[str, Any]) -> str | None:
    agent = action.get("softwareAgent")
    if isinstance(agent, dict):
        agent = agent.get("name")
    return agent if isinstance(agent, str) else None


def _claim_generator(manifest: dict[str, Any]) -> str | None:
    info = manifest.get("claim_generator_info")
    if isinstance(info, list) and info and isinstance(info[0], dict) and isinstance(info[0].get("name"), str):
        version = info[0].get("version")
        return f"{info[0]['name']} {version}" if isinstance(version, str) else info[0]["name"]
    generator = manifest.get("claim_generator")
    return generator if isinstance(generator, str) else None


def read_c2pa(data: bytes, fmt: str | None, findings: Findings, options: ProvenanceOptions) -> dict[str, Any] | None:
    """Validate the file's C2PA manifest store; add what it declares to ``findings``.

    Returns the ``c2pa`` part of the provenance record, or None when the file has no manifest or
    the library does not read its format. Never raises: an unreadable manifest becomes an error in
    ``findings`` and a ``status`` of ``unreadable``.
    """
    c2pa, _ = _load()
    mime = MIME_TYPES.get(fmt or "")
    if c2pa is None or mime is None:
        return None
    limit = options.limits.max_string
    try:
        reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, _context(c2pa, options.trust_anchors))
        if reader is None:
            return None
        with reader:
            text = reader.json()
    except Exception as exc:  # C2paError and its kinds, or anything the bindings let through
        message = str(exc)
        if message.startswith("Remote:") or type(exc).__name__.endswith("RemoteManifest"):
            url = message.rsplit(" ", 1)[-1] if "url" in message else ""
            findings.add(Finding("c2pa", "remote manifest", url or "(address not given)",
                                 "the file's Content Credentials are kept at this address; only the file is read, "
                                 "so they were not fetched or verified"))
            return {"status": "remote", "validation_state": None, "failures": [], "signer": None,
                    "claim_generator": None, "manifests": 0, "remote_url": clip(url, limit) or None}
        if type(exc).__name__.endswith("NotSupported"):
            return None
        findings.error(f"C2PA manifest cannot be read ({clip(message, 160)})")
        return {"status": "unreadable", "validation_state": None, "failures": [], "signer": None,
                "claim_generator": None, "manifests": 0}
    if len(text) > options.limits.max_manifest_json:
        findings.error(f"C2PA manifest store's JSON is {len(text):,} characters, over the limit of "
                       f"{options.limits.max_manifest_json:,}; not interpreted")
        return {"status": "unreadable", "validation_state": None, "failures": [], "signer": None,
                "claim_generator": None, "manifests": 0}
    try:
        store = json.loads(text)
    except (ValueError, RecursionError) as exc:
        findings.error(f"C2PA manifest store's JSON cannot be parsed ({str(exc)[:100]})")
        return {"status": "unreadable", "validation_state": None, "failures": [], "signer": None,
                "claim_generator": None, "manifests": 0}
    return _interpret(store if isinstance(store, dict) else {}, findings, limit)


def _interpret(store: dict[str, Any], findings: Findings, limit: int) -> dict[str, Any]:
    manifests = store.get("manifests") if isinstance(store.get("manifests"), dict) else {}
    active = manifests.get(store.get("active_manifest")) if manifests else None
    active = active if isinstance(active, dict) else {}
    results = store.get("validation_results") if isinstance(store.get("validation_results"), dict) else {}
    entries = (results.get("activeManifest") or {}).get("failure") or []
    if not entries and isinstance(store.get("validation_status"), list):  # older stores
        entries = store["validation_status"]
    failures = [str(e.get("code")) for e in entries if isinstance(e, dict) and e.get("code")][:32]
    state = store.get("validation_state") if isinstance(store.get("validation_state"), str) else None
    status = status_of(state, failures)
    verified = status == "valid"
    signature = active.get("signature_info") if isinstance(active.get("signature_info"), dict) else {}
    signer = {"name": clip(signature.get("common_name") or "", limit) or None,
              "issuer": clip(signature.get("issuer") or "", limit) or None} if signature else None
    who = (signer or {}).get("name") or (signer or {}).get("issuer") or "an unnamed signer"
    if signer and signer.get("issuer") and signer.get("name"):
        who = f"{signer['name']} (issued by {signer['issuer']})"
    findings.add(Finding("c2pa", "signature", status,
                         f"Content Credentials signed by {who}: {STATUS_MEANINGS[status]}", None, verified))
    generator_text = _claim_generator(active)
    if generator_text:
        findings.add(Finding("c2pa", "claim_generator", generator_text,
                             "the application that wrote the Content Credentials", None, verified,
                             generator=known_generator(generator_text)))
    plain_actions: list[str] = []
    for assertion in (active.get("assertions") or [])[:64]:
        if not isinstance(assertion, dict) or not str(assertion.get("label", "")).startswith("c2pa.actions"):
            continue
        data = assertion.get("data") if isinstance(assertion.get("data"), dict) else {}
        for action in (data.get("actions") or [])[:MAX_ACTIONS]:
            if not isinstance(action, dict):
                continue
            name = str(action.get("action") or "unnamed action")
            agent = _agent(action)
            source_type = action.get("digitalSourceType")
            if isinstance(source_type, str) and source_type:
                code, meaning, declares = digital_source_type(source_type)
                by = f", with {agent}" if agent else ""
                findings.add(Finding("c2pa", f"action {name}", code, f"IPTC digital source type: {meaning}{by}",
                                     declares, verified, generator=known_generator(agent) if agent else None))
            else:
                plain_actions.append(name + (f" ({agent})" if agent else ""))
    if plain_actions:
        findings.add(Finding("c2pa", "actions", ", ".join(plain_actions[:8]),
                             "what the manifest says was done to the image", None, verified))
    return {"status": status, "validation_state": state, "failures": failures[:8], "signer": signer,
            "claim_generator": clip(generator_text, limit) if generator_text else None,
            "manifests": len(manifests)}
