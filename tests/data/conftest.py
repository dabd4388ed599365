"""Builders of every input kind from one image tree, and a local S3 endpoint (moto) for URIs."""

from __future__ import annotations

import io
import json
import logging
import socket
import tarfile
import uuid
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def tree_files(root: Path, suffixes: tuple[str, ...] = (".png", ".jpg")) -> list[tuple[str, bytes]]:
    """``(relative POSIX path, bytes)`` of every image under ``root``, sorted."""
    return sorted((p.relative_to(root).as_posix(), p.read_bytes()) for p in root.rglob("*")
                  if p.suffix.lower() in suffixes)


def item_view(items, cut: str) -> list[tuple]:
    """(name inside the input, label, group, caption) of items, for comparing an input read from
    one place with the same input read from another (``cut``: the prefix of the paths)."""
    return [(i.path[len(cut):], i.label, i.group, i.caption) for i in items]


def label_of(name: str) -> int:
    return 1 if "1_fake" in name or "/ai/" in name else 0


def make_zip(files: list[tuple[str, bytes]], path: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files:
            archive.writestr(prefix + name, data)
    return path


def make_tar(files: list[tuple[str, bytes]], path: Path, mode: str = "w:gz", prefix: str = "") -> Path:
    with tarfile.open(path, mode) as archive:
        for name, data in files:
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def make_parquet(files: list[tuple[str, bytes]], path: Path, row_group_size: int = 4) -> Path:
    """Image structs as Hugging Face ``datasets`` writes them, with label and group columns."""
    table = pa.table({
        "image": [{"bytes": data, "path": name.rsplit("/", 1)[-1]} for name, data in files],
        "label": [label_of(name) for name, _ in files],
        "group": [name.split("/")[0] for name, _ in files],
    })
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def make_shards(files: list[tuple[str, bytes]], folder: Path, per_shard: int = 4) -> str:
    """WebDataset shards ``shard-0000.tar``...: samples ``KEY.png`` with the label in ``KEY.cls``
    in even shards and in ``KEY.json`` in odd ones (which also carry the group and a caption).
    Returns the brace pattern naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = [files[i:i + per_shard] for i in range(0, len(files), per_shard)]
    for n, shard in enumerate(shards):
        members = []
        for k, (name, data) in enumerate(shard):
            key = f"s{n:02d}{k:03d}"
            extension = name.rsplit(".", 1)[1]
            members.append((f"{key}.{extension}", data))
            meta = {"group": name.split("/")[0], "caption": f"sample {key}"}
            if n % 2 == 0:
                members.append((f"{key}.cls", str(label_of(name)).encode()))
            else:
                meta["label"] = "fake" if label_of(name) else "real"
            members.append((f"{key}.json", json.dumps(meta).encode()))
        make_tar(members, folder / f"shard-{n:04d}.tar", "w")
    return str(folder / f"shard-{{0000..{len(shards) - 1:04d}}}.tar")


def make_saved_dataset(files: list[tuple[str, bytes]], path: Path, splits: dict[str, list[int]] | None = None) -> Path:
    """A ``save_to_disk`` folder: an Image column, a ClassLabel whose 0 is "fake", a generator
    column; with ``splits`` (split -> row numbers) a DatasetDict folder."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["fake", "real"]),
                                  "generator": datasets.Value("string")})
    rows = {"image": [{"bytes": data, "path": name.rsplit("/", 1)[-1]} for name, data in files],
            "label": [0 if label_of(name) else 1 for name, _ in files],
            "generator": [name.split("/")[0] for name, _ in files]}
    dataset = datasets.Dataset.from_dict(rows, features=features)
    if splits is None:
        dataset.save_to_disk(str(path), max_shard_size="4KB")  # several Arrow files, in order
    else:
        datasets.DatasetDict({s: dataset.select(r) for s, r in splits.items()}).save_to_disk(str(path))
    return path


# ---------------------------------------------------------------------------------------------
# A local S3 endpoint: moto's standalone server on loopback, as a stand-in for the protocol only

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint():
    from moto.server import ThreadedMotoServer  # the test extra's moto[server]

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


class Bucket:
    """A fresh bucket on the moto endpoint, and uploads to it."""

    def __init__(self, client, name: str) -> None:
        self.client, self.name = client, name

    def uri(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}".rstrip("/")

    def put(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)
        return self.uri(key)

    def put_file(self, key: str, path: Path) -> str:
        return self.put(key, Path(path).read_bytes())

    def put_tree(self, prefix: str, root: Path) -> str:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            self.put(f"{prefix}/{path.relative_to(root).as_posix()}", path.read_bytes())
        return self.uri(prefix)


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    """A new bucket; the AWS environment points at the local endpoint with test credentials."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    name = f"tidy-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return Bucket(client, name)
