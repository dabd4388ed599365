#!/usr/bin/env python
"""Peak memory of reading a benchmark tree with a layout: held whole, streamed, and sampled.

Writes a GenImage tree (``<generator>/<sub>/val/{ai,nature}/*``, eight generators, file names
as GenImage's: ``000_sdv4_00123.png`` and ``n01440764_10026.JPEG``) of empty files for each count
of ``--files`` (listing never opens a file, so the tree costs inodes, not bytes), then measures in
a fresh process per (count, mode) the peak RSS above the process's RSS after its imports:

- ``listed``: ``select_inputs(..., layout="genimage")``, the items held whole as a list (what a
  layout run held before it streamed);
- ``streamed``: ``select_inputs(..., stream=True)``: checked once, then iterated to the end as an
  extraction iterates it (each item dropped when read);
- ``sampled``: ``select_inputs(..., max_per_class=1000)``, the evaluation protocol (two passes
  over the walk; only the sample is held);
- ``sampled-list``: the same sample made the way it was before (the list, then the sample);
- ``generic``: the tree read without a layout (one folder INPUT, labels from the folder names),
  streamed as ``extract`` streams it;
- ``generic-many``: the same, each generator's folder given as its own INPUT (disjoint folders:
  nothing is remembered between them);
- ``manifest``: a CSV manifest of the tree's files (``ROOT.csv``, written once) read with
  ``--layout manifest``, streamed (each row once: a row's (path, group) is remembered in 16 bytes,
  in mapped runs once large);
- ``inspect``: ``datasets inspect`` of the tree (``--layout genimage``), which walks it;
  ``inspect-list``: the same report from the dataset held as a list (how it was made before; the
  benchmark checks that both reports are equal).

Flat means the streamed and sampled figures do not grow with the count; ``per file`` is the
growth per file from the smallest count. A walk holds one folder's names at a time (to sort
them), so with eight generators the folders grow with the count; ``--folder-size`` keeps them at
a fixed size instead (more generators, so a larger sample: 1,000 per class per generator). It also checks that ``sampled`` and ``sampled-list`` give
the same list.

    python benchmarks/layout_memory.py                       # 100,000 and 300,000 files
    python benchmarks/layout_memory.py --files 100000,1000000
    python benchmarks/layout_memory.py --files 100000,1000000 --folder-size 12500
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("listed", "streamed", "sampled", "sampled-list", "generic", "generic-many", "manifest", "inspect",
         "inspect-list")
GENERATORS = ("ADM", "BigGAN", "glide", "Midjourney", "stable_diffusion_v_1_4", "stable_diffusion_v_1_5",
              "VQDM", "wukong")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="100000,300000", help="tree sizes (default 100000,300000)")
    parser.add_argument("--folder-size", type=int, default=0,
                        help="files per class folder, the generators' count growing with --files (default: eight "
                             "generators, so the folders grow)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"which of {', '.join(MODES)} (default all)")
    parser.add_argument("--work", type=Path, help="folder for the trees (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--child", nargs=3, metavar=("ROOT", "MODE", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_tree(root: Path, files: int, folder_size: int = 0) -> float:
    """GenImage's val split with ``files`` empty images, half real and half fake, over the eight
    generators, or over as many as keep each class folder at ``folder_size`` files; seconds taken."""
    start = time.perf_counter()
    generators = GENERATORS if not folder_size else \
        tuple(f"generator_{g:03d}" for g in range(max(1, files // (2 * folder_size))))
    per_generator = files // len(generators)
    for g, generator in enumerate(generators):
        base = root / generator / f"imagenet_ai_{g:02d}" / "val"
        count = per_generator + (files - per_generator * len(generators) if g == 0 else 0)
        for label, folder in ((1, "ai"), (0, "nature")):
            target = base / folder
            target.mkdir(parents=True, exist_ok=True)
            n = count // 2 + (count % 2 if label else 0)
            for i in range(n):
                name = f"{i // 1000:03d}_{generator[:4].lower()}_{i:05d}.png" if label else \
                    f"n{1440764 + i // 1300:08d}_{i:05d}.JPEG"
                (target / name).touch()
    return time.perf_counter() - start


def write_manifest(root: Path) -> None:
    """``ROOT.csv``: every file of the tree with its label and generator, in walk order."""
    with open(f"{root}.csv", "w", encoding="utf-8") as out:
        out.write("path,label,group\n")
        for folder, _, names in sorted(os.walk(root)):
            parts = Path(folder).relative_to(root).parts
            if len(parts) < 4:
                continue
            label = 1 if parts[-1] == "ai" else 0
            out.writelines(f"{folder}/{name},{label},{parts[0]}\n" for name in sorted(names))


def _rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process, MiB."""
    now = peak = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            now = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return now, peak


def child(root: str, mode: str, out: str) -> None:
    from tidy_detect.data.layouts import datasets_for_inputs, expand_pairing, items_for_datasets
    from tidy_detect.data.sampling import sample_per_class
    from tidy_detect.data.selection import select_inputs

    base, _ = _rss_mib()
    start = time.perf_counter()
    sample: list = []
    if mode == "listed":
        count = len(select_inputs([root], layout="genimage").items)
    elif mode == "streamed":
        count = sum(1 for _ in select_inputs([root], layout="genimage", stream=True).items)
    elif mode == "sampled":
        sample = select_inputs([root], layout="genimage", max_per_class=1000).items
        count = len(sample)
    elif mode == "generic":
        count = sum(1 for _ in select_inputs([root], stream=True).items)
    elif mode in ("inspect", "inspect-list"):
        from tidy_detect.data.inspect import inspect_dataset, inspect_listings
        from tidy_detect.data.layouts import open_dataset, read_dataset

        if mode == "inspect":
            report, _ = inspect_listings(lambda: [open_dataset(root, "genimage")], root)
        else:
            report = inspect_dataset(read_dataset(root, "genimage"))
        count = report["items"]
        sample = [report]
    elif mode == "manifest":
        count = sum(1 for _ in select_inputs([f"{root}.csv"], layout="manifest", stream=True).items)
    elif mode == "generic-many":
        count = sum(1 for _ in select_inputs(sorted(str(p) for p in Path(root).iterdir()), stream=True).items)
    else:
        items = items_for_datasets(datasets_for_inputs([root], "genimage"))
        chosen = {it.path for it in sample_per_class(expand_pairing(items, {}), 1000, seed=0)}
        sample = [it for it in items if it.path in chosen]
        count = len(sample)
    seconds = time.perf_counter() - start
    _, peak = _rss_mib()
    Path(out).write_text(json.dumps({"count": count, "seconds": seconds, "base_mib": base, "peak_mib": peak,
                                     "sample": [it if isinstance(it, dict) else it.path for it in sample]}))


def measure(root: Path, mode: str, work: Path) -> dict:
    out = work / f"result-{mode}.json"
    subprocess.run([sys.executable, __file__, "--child", str(root), mode, str(out)], check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    counts = [int(n) for n in args.files.split(",") if n]
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown mode {unknown[0]!r}; known: {', '.join(MODES)}")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"{cpu}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    temp = tempfile.TemporaryDirectory(prefix="tidy-layout-mem-") if args.work is None else None
    work = Path(temp.name) if temp else args.work
    results = []
    try:
        for files in counts:
            root = work / f"GenImage-{files}-{args.folder_size}"
            if not root.exists():
                print(f"writing {files:,} files ... {write_tree(root, files, args.folder_size):.1f} s")
            if "manifest" in modes and not Path(f"{root}.csv").exists():
                write_manifest(root)
            samples = {}
            for mode in modes:
                found = measure(root, mode, work)
                samples[mode] = found.pop("sample")
                found.update(files=files, mode=mode, grown_mib=found["peak_mib"] - found["base_mib"])
                results.append(found)
            if "inspect" in samples and "inspect-list" in samples:
                same = samples["inspect"] == samples["inspect-list"]
                print(f"{files:,} files: the walked inspection {'equals' if same else 'DIFFERS FROM'} the listed one")
            if "sampled" in samples and "sampled-list" in samples:
                same = samples["sampled"] == samples["sampled-list"]
                print(f"{files:,} files: the streamed sample {'equals' if same else 'DIFFERS FROM'} the listed one "
                      f"({len(samples['sampled'])} images)")
    finally:
        if temp:
            temp.cleanup()
    print()
    print("| files | mode | images | peak RSS MiB | above imports MiB | per file (B) | s |")
    print("|---|---|---|---|---|---|---|")
    smallest = {r["mode"]: r for r in results if r["files"] == counts[0]}
    for r in results:
        first = smallest[r["mode"]]
        per = (r["grown_mib"] - first["grown_mib"]) * 2 ** 20 / (r["files"] - first["files"]) \
            if r["files"] != first["files"] else float("nan")
        print(f"| {r['files']:,} | {r['mode']} | {r['count']:,} | {r['peak_mib']:.0f} | {r['grown_mib']:.1f} | "
              f"{per:.0f} | {r['seconds']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
