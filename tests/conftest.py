"""Shared fixtures. Tests never touch the network: the Hub runs offline on a cache on disk."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported anywhere

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from midol_hub import MIDoLModel, get_entry

DATA_ROOT = Path(os.environ.get("MIDOL_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real medical images; missing data is a failure, never a skip."""
    if not (DATA_ROOT / "PROVENANCE.md").is_file():
        pytest.fail(f"real test data not found at {DATA_ROOT}; set MIDOL_DATA to the shared/data folder")
    return DATA_ROOT


def make_micro(seed: int = 0, **overrides) -> MIDoLModel:
    """A seeded random midol-micro model (no download, no warning)."""
    torch.manual_seed(seed)
    config = get_entry("midol-micro").make_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    return MIDoLModel(config).eval()


@pytest.fixture(scope="session")
def micro() -> MIDoLModel:
    return make_micro()


@pytest.fixture(scope="session")
def micro_dir(tmp_path_factory, micro) -> Path:
    directory = tmp_path_factory.mktemp("micro")
    micro.save_pretrained(directory)
    return directory


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
