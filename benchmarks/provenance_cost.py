#!/usr/bin/env python
"""What reading provenance costs per file, by kind of file and check (no models involved).

Each case is read ``--repeat`` times with :func:`tidy_detect.provenance.read_provenance` in the mode
given; the table shows the median and the slowest time per read and what the record said. Files
are made here (a test certificate chain for C2PA, invisible-watermark's encoder for the mark), as in
tests/provenance. Runs in well under a minute on 2 cores.

    python benchmarks/provenance_cost.py                # full and metadata modes
    python benchmarks/provenance_cost.py --repeat 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.provenance import fixtures as F  # noqa: E402
from tidy_detect.provenance import ProvenanceOptions, read_provenance  # noqa: E402


def cases(chain: F.Chain) -> dict[str, bytes]:
    photo = F.photo(1, (512, 512))
    made = {
        "plain PNG 512x512": F.encode(photo, "PNG"),
        "plain JPEG 1024x768": F.encode(F.photo(2, (1024, 768)), "JPEG", quality=90),
        "C2PA-signed JPEG 512x512": F.sign(F.encode(photo, "JPEG", quality=90), chain),
        "web-UI parameters PNG 512x512": F.png_with_text({"parameters": F.A1111_PARAMETERS}, image=photo),
        "XMP JPEG 512x512": F.jpeg_with_xmp(F.xmp_packet(), image=photo),
        "plain PNG 1024x1024 (SDXL's size, under the watermark's limit)": F.encode(F.photo(3, (1024, 1024)), "PNG"),
        "plain PNG 3000x2000 (over the watermark's limit)": F.encode(F.photo(4, (3000, 2000)), "PNG"),
        "hostile: 300 MB zTXt bomb": F.png_with_chunks(F.png_chunk(b"zTXt", b"parameters\x00\x00"
                                                                   + zlib.compress(b"a" * 300_000_000, 9))),
        "hostile: billion laughs XMP": F.jpeg_with_xmp(F.BILLION_LAUGHS),
        "hostile: 20 MB tEXt chunk": F.png_with_chunks(F.png_chunk(b"tEXt", b"parameters\x00" + b"x" * 20_000_000)),
    }
    try:
        made["watermarked PNG 512x512"] = F.watermarked_png(b"SDV2")
    except ImportError:
        pass
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="reads per case (default 5)")
    args = parser.parse_args()
    chain = F.make_chain()
    files = cases(chain)
    read_provenance(files["plain PNG 512x512"], ProvenanceOptions())  # imports (c2pa, OpenCV, torch) once
    print("| file | bytes | mode | median ms | max ms | summary |\n|---|---|---|---|---|---|")
    for mode in ("full", "metadata"):
        options = ProvenanceOptions(mode=mode, trust_anchors=chain.root_pem.decode())
        for name, data in files.items():
            times, record = [], None
            for _ in range(args.repeat):
                started = time.perf_counter()
                record = read_provenance(data, options)
                times.append((time.perf_counter() - started) * 1000)
            summary = (record["summary"][:70] + "…") if len(record["summary"]) > 70 else record["summary"]
            print(f"| {name} | {len(data):,} | {mode} | {statistics.median(times):.1f} | {max(times):.1f} | {summary} |")


if __name__ == "__main__":
    main()
