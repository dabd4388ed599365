"""Generator metadata: the PNG text chunks image-generation tools write, and EXIF fields naming one.

Each tool's chunk is recognised by its keyword *and* its shape (the web UIs' ``Steps: N,
Sampler: ...`` line, ComfyUI's node graph, InvokeAI's and NovelAI's JSON), so a PNG whose
``prompt`` chunk happens to hold something else is not taken for a ComfyUI image.
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

from tidy_detect.provenance.findings import Finding, Findings, clip
from tidy_detect.provenance.options import Limits
from tidy_detect.provenance.vocabulary import known_generator

# The web UIs' "parameters": the prompt, optionally "Negative prompt: ...", then one line of
# "Key: value, Key: value" that always has Steps and usually Sampler, Model, Version.
_PARAMETER_LINE = re.compile(r"(?:^|\n|,\s*)Steps: *\d+", re.IGNORECASE)
_KEY_VALUE = re.compile(r"(Model|Version|Sampler|Size|Model hash): *([^,\n]{1,120})")
WEB_UI = "Stable Diffusion web UI"  # AUTOMATIC1111's, and the tools that write its format (Forge, SD.Next, ...)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
        return None


def _parameters(text: str) -> dict[str, str] | None:
    """The key/value pairs of a web-UI parameters text, or None when it is not one."""
    if not _PARAMETER_LINE.search(text):
        return None
    return {key.lower(): value.strip() for key, value in _KEY_VALUE.findall(text[-4096:])}


def _prompt_of(text: str, limit: int) -> str:
    return clip(text.split("\n", 1)[0], min(limit, 120))


def _web_ui(field: str, source: str, text: str, findings: Findings, limits: Limits) -> bool:
    pairs = _parameters(text)
    if pairs is None:
        return False
    details = ", ".join(f"{k} {v}" for k, v in pairs.items() if k in ("model", "version", "sampler", "size"))
    generator = WEB_UI
    findings.add(Finding(source, field, f"prompt: {_prompt_of(text, limits.max_string)}",
                         f"generation parameters in the format of {generator}s (AUTOMATIC1111, Forge, SD.Next and "
                         f"others)" + (f": {details}" if details else ""),
                         True, generator=generator))
    return True


def _comfy_prompt(value: Any) -> dict[str, Any] | None:
    """ComfyUI's API graph: {node id: {"class_type": ..., "inputs": {...}}}."""
    if not isinstance(value, dict) or not value:
        return None
    nodes = [n for n in value.values() if isinstance(n, dict) and "class_type" in n]
    return {"nodes": nodes} if nodes and len(nodes) >= len(value) // 2 else None


def _comfy_summary(nodes: list[Any]) -> str:
    checkpoints = []
    for node in nodes[:500]:
        inputs = node.get("inputs") if isinstance(node, dict) else None
        widgets = node.get("widgets_values") if isinstance(node, dict) else None
        if isinstance(inputs, dict) and isinstance(inputs.get("ckpt_name"), str):
            checkpoints.append(inputs["ckpt_name"])
        kind = str(node.get("class_type") or node.get("type") or "") if isinstance(node, dict) else ""
        if "checkpointloader" in kind.lower() and isinstance(widgets, list) and widgets and isinstance(widgets[0], str):
            checkpoints.append(widgets[0])
    text = f"{len(nodes)} nodes"
    if checkpoints:
        text += f"; checkpoint {checkpoints[0]}"
    return text


def read_png_texts(texts: list[tuple[str, str]], findings: Findings, limits: Limits) -> None:
    """Add what PNG text chunks declare to ``findings``."""
    by_key = {}
    for keyword, text in texts:
        by_key.setdefault(keyword, text)
    for keyword, text in texts:
        field = f"PNG text '{clip(keyword, 60)}'"
        lower = keyword.lower()
        if lower == "parameters":
            if not _web_ui(field, "png-text", text, findings, limits):
                value = _json(text)  # Fooocus writes its parameters as JSON
                if isinstance(value, dict) and ("prompt" in value or "base_model" in value):
                    generator = "Fooocus" if "fooocus_scheme" in by_key or "base_model" in value else WEB_UI
                    findings.add(Finding("png-text", field, f"prompt: {_prompt_of(str(value.get('prompt', '')), limits.max_string)}",
                                         f"generation parameters of {generator}", True, generator=generator))
        elif lower == "prompt":
            graph = _comfy_prompt(_json(text))
            if graph is not None:
                findings.add(Finding("png-text", field, _comfy_summary(graph["nodes"]),
                                     "the ComfyUI node graph (API format) that made the image", True, generator="ComfyUI"))
        elif lower == "workflow":
            value = _json(text)
            if isinstance(value, dict) and isinstance(value.get("nodes"), list):
                findings.add(Finding("png-text", field, _comfy_summary(value["nodes"]),
                                     "the ComfyUI workflow that made the image", True, generator="ComfyUI"))
        elif lower in ("invokeai_metadata", "invokeai_graph", "sd-metadata"):
            value = _json(text)
            if isinstance(value, dict):
                model = value.get("model")
                model_name = model.get("name") if isinstance(model, dict) else model
                if model_name is None and isinstance(value.get("image"), dict):  # older sd-metadata
                    model_name = value.get("model_weights")
                detail = f"model {clip(model_name, 80)}" if isinstance(model_name, str) else "generation metadata"
                findings.add(Finding("png-text", field, detail, "InvokeAI's generation metadata", True,
                                     generator="InvokeAI"))
        elif lower == "dream":
            findings.add(Finding("png-text", field, f"prompt: {_prompt_of(text, limits.max_string)}",
                                 "InvokeAI's (older) dream prompt", True, generator="InvokeAI"))
        elif lower == "comment" and known_generator(by_key.get("Software", "")) == "NovelAI":
            value = _json(text)
            if isinstance(value, dict):
                detail = ", ".join(f"{k} {clip(value[k], 40)}" for k in ("steps", "sampler", "seed") if k in value)
                findings.add(Finding("png-text", field, detail or "generation settings",
                                     "NovelAI's generation settings", True, generator="NovelAI"))
        elif lower in ("software", "source", "comment", "description", "author", "title", "generator"):
            generator = known_generator(text)
            if generator:
                findings.add(Finding("png-text", field, text, f"names {generator}", True, generator=generator))
            elif lower == "software":
                findings.add(Finding("png-text", field, text, "the software that wrote the file"))


# -- EXIF -----------------------------------------------------------------------------------------

_SOFTWARE, _DESCRIPTION, _ARTIST, _EXIF_IFD, _USER_COMMENT = 0x0131, 0x010E, 0x013B, 0x8769, 0x9286


def _user_comment(raw: Any) -> str | None:
    """EXIF UserComment: 8 bytes naming the character code, then the text."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    code, body = raw[:8], raw[8:]
    if code.startswith(b"UNICODE"):
        # Writers disagree on the byte order of UTF-16; a BOM or the zero bytes of ASCII tell.
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16", "replace")
        big = body[:64:2].count(0) >= body[1:64:2].count(0)
        return body.decode("utf-16-be" if big else "utf-16-le", "replace")
    return body.decode("utf-8", "replace").strip("\x00 ")


def read_exif(raw: bytes, findings: Findings, limits: Limits) -> None:
    """Add what an EXIF block (TIFF structure) declares to ``findings``; a block Pillow cannot
    parse becomes an error there."""
    from PIL import Image

    exif = Image.Exif()
    with warnings.catch_warnings(record=True) as caught:  # Pillow warns about corrupt EXIF and goes on
        warnings.simplefilter("always")
        try:
            exif.load(b"Exif\x00\x00" + raw)
            fields = {tag: exif.get(tag) for tag in (_SOFTWARE, _DESCRIPTION, _ARTIST)}
            try:
                fields[_USER_COMMENT] = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
            except Exception:  # a broken sub-directory: the main one still counts
                findings.error("EXIF: the Exif sub-directory cannot be read; UserComment not checked")
        except Exception as exc:
            findings.error(f"EXIF block cannot be parsed ({type(exc).__name__}: {str(exc)[:100]}); not read")
            return
    if caught:
        findings.error(f"EXIF block is partly corrupt ({str(caught[0].message)[:100]})")
    names = {_SOFTWARE: "EXIF Software", _DESCRIPTION: "EXIF ImageDescription", _ARTIST: "EXIF Artist",
             _USER_COMMENT: "EXIF UserComment"}
    for tag, value in fields.items():
        text = _user_comment(value) if tag == _USER_COMMENT else value
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if not isinstance(text, str) or not text.strip("\x00 "):
            continue
        text = text.strip("\x00 ")[:limits.max_block_bytes]
        if tag in (_DESCRIPTION, _USER_COMMENT) and _web_ui(names[tag], "exif", text, findings, limits):
            continue
        generator = known_generator(text)
        if generator:
            findings.add(Finding("exif", names[tag], text, f"names {generator}", True, generator=generator))
        elif tag == _SOFTWARE:
            findings.add(Finding("exif", names[tag], text, "the software that wrote the file"))
