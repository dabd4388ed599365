"""Provenance evidence: what an image file itself declares about how it was made.

Read from the file's bytes, beside the model's score and never mixed into it (evaluation never
reads it): C2PA Content Credentials validated by the c2pa library (the only *verified* evidence),
IPTC digital source types in XMP, the text chunks image-generation tools write, EXIF fields naming
a generator, and the invisible watermark of Stable Diffusion's reference scripts. Absence of
metadata is reported as absence, never as evidence of a real image.

    >>> from tidy_detect.provenance import read_provenance
    >>> read_provenance("photo.png")["summary"]  # doctest: +SKIP

The record's schema is documented in docs/provenance.md.
"""

from __future__ import annotations

from tidy_detect.provenance.dataset import count_generator_metadata, metadata_warnings
from tidy_detect.provenance.options import MODES, Limits, ProvenanceOptions
from tidy_detect.provenance.reader import NOTHING_FOUND, not_read, read_provenance, short_label

__all__ = ["Limits", "MODES", "NOTHING_FOUND", "ProvenanceOptions", "count_generator_metadata",
           "metadata_warnings", "not_read", "read_provenance", "short_label"]
