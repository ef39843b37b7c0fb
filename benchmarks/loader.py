"""Pretraining input speed: the loader against one training step, and shards against folders.

loader_vs_step_ratio: images/s the loader delivers on midol-micro's training data
(``training.prepare_shared_data``: MedMNIST arrays plus the resized full-resolution copies,
every modality in every batch, decode + 2 global + 2 local crops + stain jitter, 2 DataLoader
workers) over images/s of one midol-micro training step on the same machine (above 1: the
loader keeps up). shard_vs_folder_ratio: the shard loader against the folder loader on the
same 515 real JPEG and TIFF files and workers. separable_blur_speedup_ratio: torchvision's 2-D
Gaussian blur of a 160 px crop (midol-lite's global size, 33 taps) over
``training.augment.SeparableGaussianBlur``'s two 1-D passes, on one thread as in a worker.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import torch
from torchvision.transforms import v2

from training.augment import MultiCrop, SeparableGaussianBlur
from training.config import load_config
from training.data import MapData, open_source
from training.learner import Learner
from training.prepare_shared_data import prepare
from training.pretrain import build_models
from training.shards import StreamData, open_shards, write_shards
from training.shared_data import FILE_FOLDERS, data_root

from .common import interleaved_medians

BATCH = 32


def images_per_second(data, batches: int) -> float:
    loader = iter(data.loader(epoch=0, batch_in_epoch=0))
    next(loader)  # workers started
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * BATCH / (time.perf_counter() - started)


def separable_blur_speedup(repeats: int = 20) -> float:
    crop, threads = torch.rand(3, 160, 160), torch.get_num_threads()
    full, separable = v2.GaussianBlur(33, sigma=(0.1, 2.0)), SeparableGaussianBlur(33, sigma=(0.1, 2.0))
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        times = interleaved_medians({"2d": lambda: full(crop), "separable": lambda: separable(crop)}, repeats)
    finally:
        torch.set_num_threads(threads)
    return times["2d"] / times["separable"]


def measure(batches: int = 12, workers: int = 2) -> dict[str, float]:
    root = data_root()
    sources = [open_source(f"{folder.split('/')[0]}={root / folder}") for folder in FILE_FOLDERS]
    augment = MultiCrop(64)
    common = dict(seed=0, balance="none", global_batch=BATCH, per_rank=BATCH, accumulate=1, rank=0, world=1, workers=workers)
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(tmp, sources, shard_size=64)
        shards = StreamData(open_shards(tmp), augment, **common)
        folders = MapData(sources, augment, **common)
        shards.steps_per_epoch = folders.steps_per_epoch  # one epoch of the same images
        shard_ips, folder_ips = images_per_second(shards, batches), images_per_second(folders, batches)
        config = load_config("training/configs/midol_micro_v3.yaml")
        training_data = MapData([open_source(spec) for spec in prepare(Path(tmp) / "data", root)],
                                MultiCrop(64, stain_tags=tuple(config["crops"]["stain_tags"])),
                                **{**common, "balance": config["data"]["balance"]})
        training_ips = images_per_second(training_data, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student, teacher = build_models(config, torch.device("cpu"))
    learner = Learner(config, student, teacher, torch.device("cpu"))
    learner.set_schedules(1e-4, 0.04)
    crops = [torch.randn(BATCH, 3, 64, 64) for _ in range(4)]
    step = interleaved_medians({"step": lambda: learner.step([crops], 0.04, 0.99, False)}, repeats=3)["step"]
    step_ips = BATCH / step
    return {"loader_vs_step_ratio": training_ips / step_ips, "shard_vs_folder_ratio": shard_ips / folder_ips,
            "separable_blur_speedup_ratio": separable_blur_speedup(),
            "training_data_loader_images_per_s": training_ips, "shard_loader_images_per_s": shard_ips,
            "folder_loader_images_per_s": folder_ips,
            "train_step_images_per_s": step_ips}
