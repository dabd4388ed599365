"""count_generator_metadata: per group and class, how many files declare their origin (a leak check)."""

from __future__ import annotations

import pytest

from tidy_detect.data.inputs import ImageItem, collect_inputs
from tidy_detect.errors import ConfigError
from tidy_detect.provenance import count_generator_metadata, metadata_warnings

from tests.provenance import fixtures as F


def make_leaky_tree(root):
    """``root/sd/{0_real,1_fake}``: the fakes keep the web UI's parameters, the reals are plain; and a
    clean group where neither class carries anything."""
    paths = []
    for group, leaky in (("sd", True), ("clean", False)):
        for label in ("0_real", "1_fake"):
            folder = root / group / label
            folder.mkdir(parents=True)
            for i in range(4):
                path = folder / f"img{i}.png"
                if leaky and label == "1_fake":
                    path.write_bytes(F.png_with_text({"parameters": F.A1111_PARAMETERS}, image=F.photo(i)))
                else:
                    path.write_bytes(F.encode(F.photo(i), "PNG"))
                paths.append(path)
    return paths


def test_counts_per_group_and_class_and_the_leak_warning(tmp_path):
    make_leaky_tree(tmp_path / "data")
    items = collect_inputs([tmp_path / "data"])
    result = count_generator_metadata(items)
    sd = result["groups"]["sd"]
    assert sd["fake"]["checked"] == 4 and sd["fake"]["with_metadata"] == 4 and sd["fake"]["declares_ai"] == 4
    assert sd["fake"]["sources"] == {"png-text": 4}
    assert list(sd["fake"]["generators"].values()) == [4]
    assert sd["real"]["with_metadata"] == 0 and sd["real"]["checked"] == 4
    clean = result["groups"]["clean"]
    assert clean["real"]["with_metadata"] == clean["fake"]["with_metadata"] == 0
    assert [w["group"] for w in result["warnings"]] == ["sd"]
    assert "100% of the fake images carry provenance metadata but 0% of the real ones" in result["warnings"][0]["message"]


def test_plain_paths_count_as_unlabelled(tmp_path):
    good = tmp_path / "a.png"
    good.write_bytes(F.png_with_text({"Software": "ComfyUI"}))
    missing = tmp_path / "gone.png"
    result = count_generator_metadata([good, missing])
    counts = result["groups"]["(none)"]["unlabelled"]
    assert counts == {"checked": 2, "unreadable": 1, "with_metadata": 1, "declares_ai": 1, "declares_not_ai": 0,
                      "sources": {"png-text": 1}, "generators": {"ComfyUI": 1}}
    assert result["warnings"] == []


def test_members_of_an_archive_are_read_through_their_source(tmp_path):
    import zipfile

    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("1_fake/a.png", F.png_with_text({"parameters": F.A1111_PARAMETERS}))
        z.writestr("0_real/b.png", F.encode(F.photo(), "PNG"))
    result = count_generator_metadata(collect_inputs([archive]))
    [group] = result["groups"].values()
    assert group["fake"]["declares_ai"] == 1 and group["real"]["with_metadata"] == 0


def test_warning_rule_and_bad_arguments():
    counts = {"g": {"real": {"checked": 100, "with_metadata": 5}, "fake": {"checked": 100, "with_metadata": 9}}}
    assert metadata_warnings(counts) == []  # 9% is not twice 5%
    counts["g"]["fake"]["with_metadata"] = 10
    assert [w["group"] for w in metadata_warnings(counts)] == ["g"]
    counts["g"]["real"]["with_metadata"] = counts["g"]["fake"]["with_metadata"] = 2
    assert metadata_warnings(counts) == []  # 2% on both sides: under the share that matters
    with pytest.raises(ConfigError, match="workers must be an integer >= 1, got 0"):
        count_generator_metadata([], workers=0)
    with pytest.raises(ConfigError, match="takes paths or items with a .path"):
        count_generator_metadata([42])
    assert count_generator_metadata([ImageItem("/nonexistent/x.png", 1, "g")])["groups"]["g"]["fake"]["unreadable"] == 1
