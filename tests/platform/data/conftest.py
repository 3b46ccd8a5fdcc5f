"""Small synthetic COCO-panoptic datasets shared by the data tests (generated once per session)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from maxdeeplab.platform.data.synthetic import generate_synthetic


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 train + 4 val images of 97 x 129 (non-square, so aspect handling is exercised)."""
    root = tmp_path_factory.mktemp("synthetic") / "coco"
    return generate_synthetic(root, num_train=12, num_val=4, height=97, width=129, seed=3)


@pytest.fixture()
def broken_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic set that a test may damage."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "coco"))
