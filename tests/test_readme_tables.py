"""tools/readme_tables.py: only the marked regions change, each region must be there once, and the
card rule reads as written (the README's figures themselves are checked by ``--check`` in .ci/run)."""

from __future__ import annotations

import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "tools"))
import readme_tables  # noqa: E402


@pytest.fixture
def regions(monkeypatch):
    monkeypatch.setattr(readme_tables, "REGIONS", {"a": lambda: "\n| x |\n", "n": lambda: "7"})


def test_only_the_regions_are_rewritten(regions):
    text = ("intro (<!-- generated:n -->15<!-- /generated:n --> nodes)\n\n<!-- generated:a -->\n| old |\n"
            "<!-- /generated:a -->\ntail | kept |\n")
    assert readme_tables.render(text) == ("intro (<!-- generated:n -->7<!-- /generated:n --> nodes)\n\n"
                                          "<!-- generated:a -->\n| x |\n<!-- /generated:a -->\ntail | kept |\n")


@pytest.mark.parametrize("text", [
    "<!-- generated:a --><!-- /generated:a -->",  # n missing
    "<!-- generated:a --><!-- /generated:a --><!-- generated:n --><!-- /generated:n --><!-- generated:z -->"
    "<!-- /generated:z -->",  # unknown
    "<!-- generated:a --><!-- /generated:a --><!-- generated:a --><!-- /generated:a -->"
    "<!-- generated:n --><!-- /generated:n -->",  # twice
])
def test_a_missing_unknown_or_repeated_region_is_an_error(regions, text):
    with pytest.raises(SystemExit, match="README regions"):
        readme_tables.render(text)


def test_smallest_card():
    gib = 1 << 30
    assert readme_tables.smallest_card(18 * gib, 1.05) == "24 GB"  # 18.9 GiB of 22.5
    assert readme_tables.smallest_card(21.2 * gib, 1.05) == "24 GB (tight)"  # 22.3 GiB: within 10%
    assert readme_tables.smallest_card(22.6 * gib, 1.0) == "32 GB"
    assert readme_tables.smallest_card(200 * gib, 1.0) == "more than 141 GB (use offload)"


def test_the_readme_has_every_region_once():
    text = (REPO / "README.md").read_text()
    for name in readme_tables.REGIONS:
        assert text.count(f"<!-- generated:{name} -->") == 1 and text.count(f"<!-- /generated:{name} -->") == 1
