"""Shared fixtures. Tests never touch the network: the Hub runs offline on a cache on disk."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported anywhere
# Under pytest-xdist (``pytest -n N``) the workers share the cores: each worker, and every process
# a test starts, computes on its share, so N workers do not fight over the same cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

import argparse
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from midol_hub import DatasetError, MIDoLModel
from training import shared_data

from .helpers import K, make_micro, microsoft_backbone, prefixed, tutel_state


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real medical images (``training.shared_data.data_root``); missing data is a failure, never a skip."""
    try:
        return shared_data.data_root()
    except DatasetError as error:
        pytest.fail(f"real test data not found: {error}")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """An official training checkpoint: teacher, DDP-wrapped student, optimizer, args, loss centre."""
    root = tmp_path_factory.mktemp("official")
    teacher = {**prefixed("backbone.", microsoft_backbone(0)), **prefixed("head.", tutel_state(1))}
    student = {**prefixed("module.backbone.", microsoft_backbone(2)), **prefixed("module.head.", tutel_state(3))}
    checkpoint = {
        "student": student,
        "teacher": teacher,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "epoch": 7,
        "args": argparse.Namespace(arch="swin_base", out_dim=K, lr=1e-4, data_path=["/data"]),
        "dino_loss": {"center": torch.zeros(1, K)},
    }
    path = root / "checkpoint.pth"
    torch.save(checkpoint, path)
    return path, teacher, student


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
