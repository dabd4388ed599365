"""Provenance options: modes, trust anchors from a file or the environment, limits that validate."""

from __future__ import annotations

import pytest

from tidy_detect.errors import ConfigError
from tidy_detect.provenance import Limits, ProvenanceOptions
from tidy_detect.provenance.options import MODE_ENV, TRUST_ENV


def test_modes_from_arguments_and_environment(monkeypatch):
    monkeypatch.delenv(MODE_ENV, raising=False)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    assert ProvenanceOptions.from_env().mode == "full"
    monkeypatch.setenv(MODE_ENV, "metadata")
    options = ProvenanceOptions.from_env()
    assert options.mode == "metadata" and options.enabled and not options.watermark
    assert ProvenanceOptions.from_env("off").enabled is False  # the argument wins
    monkeypatch.setenv(MODE_ENV, "sometimes")
    with pytest.raises(ConfigError, match=r"provenance mode \(TIDY_DETECT_PROVENANCE or --provenance\) must be one "
                                          r"of full, metadata, off, got 'sometimes'"):
        ProvenanceOptions.from_env()
    with pytest.raises(ConfigError, match="must be one of full, metadata, off"):
        ProvenanceOptions(mode="all")


def test_trust_anchors_from_a_file(chain, tmp_path, monkeypatch):
    pem = tmp_path / "roots.pem"
    pem.write_bytes(chain.root_pem)
    options = ProvenanceOptions.from_env(trust_anchors=pem)
    assert options.trust_anchors == chain.root_pem.decode() and options.trust_source == "roots.pem"
    monkeypatch.setenv(TRUST_ENV, str(pem))
    assert ProvenanceOptions.from_env().trust_anchors == chain.root_pem.decode()


@pytest.mark.parametrize("content, message", [
    (None, "cannot be read"),
    (b"hello", "no '-----BEGIN CERTIFICATE-----' block found"),
    (b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n", "not PEM certificates"),
])
def test_bad_trust_anchor_files_are_clear_errors(tmp_path, content, message):
    pem = tmp_path / "roots.pem"
    if content is not None:
        pem.write_bytes(content)
    with pytest.raises(ConfigError, match=f"C2PA trust anchors {pem}: .*{message}"):
        ProvenanceOptions.from_env(trust_anchors=pem)


def test_limits_validate_themselves():
    with pytest.raises(ConfigError, match="provenance limit max_findings must be an integer >= 1, got 0"):
        Limits(max_findings=0)
    with pytest.raises(ConfigError, match="max_string must be >= 40"):
        Limits(max_string=10)
