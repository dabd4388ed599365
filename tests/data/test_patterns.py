"""Brace patterns in INPUTs: the two rules ({a,b} and {0000..0099}), existing names only, in order."""

from __future__ import annotations

import logging

import pytest

from tidy_detect.data.inputs import collect_inputs, expand_braces, expand_inputs
from tidy_detect.errors import InputError

from tests.conftest import make_tree
from tests.data.conftest import make_shards, tree_files


@pytest.mark.parametrize("pattern,names", [
    ("shard-{0000..0003}.tar", ["shard-0000.tar", "shard-0001.tar", "shard-0002.tar", "shard-0003.tar"]),
    ("s{8..11}.tar", ["s8.tar", "s9.tar", "s10.tar", "s11.tar"]),  # no leading zero: no padding
    ("s{3..1}", ["s3", "s2", "s1"]),  # descending
    ("s{0..10..5}", ["s0", "s5", "s10"]),  # with a step
    ("s{-1..1}", ["s-1", "s0", "s1"]),
    ("{train,test}.parquet", ["train.parquet", "test.parquet"]),
    ("a{1,2}b{x,y}", ["a1bx", "a1by", "a2bx", "a2by"]),  # left to right, as the shell does
    ("d/{a,b{1..2}}/x", ["d/a/x", "d/b1/x", "d/b2/x"]),  # nested
    ("keep{x}and{}and{", ["keep{x}and{}and{"]),  # braces that are neither rule stay as they are
    ("{a,}z", ["az", "z"]),
    ("plain.tar", ["plain.tar"]),
])
def test_the_two_rules(pattern, names):
    assert expand_braces(pattern) == names


def test_a_pattern_too_large_is_refused():
    with pytest.raises(InputError, match="more than the 1,000,000"):
        expand_braces("s{0..99999999}.tar")


def test_existing_shards_in_order_missing_ones_warned_none_an_error(tmp_path, caplog):
    root = tmp_path / "tree"
    make_tree(root, {"progan": 2, "dalle": 2})
    pattern = make_shards(tree_files(root), tmp_path / "shards", per_shard=2)  # shard-{0000..0003}.tar
    assert pattern.endswith("shard-{0000..0003}.tar")
    assert expand_inputs([pattern]) == [str(tmp_path / "shards" / f"shard-{n:04d}.tar") for n in range(4)]
    items = collect_inputs([pattern])
    assert len(items) == 8 and [i.path.split("!/")[0][-8:] for i in items] == [
        f"{n:04d}.tar" for n in range(4) for _ in range(2)]
    (tmp_path / "shards" / "shard-0002.tar").unlink()
    with caplog.at_level(logging.WARNING, logger="tidy_detect.data.inputs"):
        assert len(collect_inputs([pattern.replace("0003", "0005")])) == 6  # shards 0, 1 and 3
    assert "3 of the 6 names do not exist (first: " in caplog.text and "shard-0002.tar" in caplog.text
    with pytest.raises(InputError, match=r"the pattern matches no file \(it stands for 10 names, from .*x-0000.tar"):
        collect_inputs([str(tmp_path / "shards" / "x-{0000..0009}.tar")])


def test_a_file_whose_name_has_braces_is_itself(tmp_path):
    odd = tmp_path / "img{1,2}.png"
    odd.write_bytes(b"x")
    assert expand_inputs([odd]) == [str(odd)]
