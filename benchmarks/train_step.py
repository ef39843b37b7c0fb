"""train_step_midol_vs_dino_ratio: a full M-IDoL step vs the plain-DINO step, same backbone and crops."""

from __future__ import annotations

import torch

from training.config import DEFAULTS, load_config
from training.learner import Learner
from training.pretrain import build_models

from .common import interleaved_medians

LITE = DEFAULTS.with_name("midol_lite.yaml")


def measure(arch: str = "midol-micro", batch: int = 16, local_crops: int = 2, repeats: int = 5) -> dict[str, float]:
    learners, crops = {}, None
    for objective in ("midol", "dino"):
        config = load_config(None, [f"model.arch={arch}", f"objective.name={objective}", "optim.precision=fp32",
                                    "model.num_prototypes=4096", "model.drop_path_rate=0.0"])
        torch.manual_seed(0)
        student, teacher = build_models(config, torch.device("cpu"))
        learners[objective] = Learner(config, student, teacher, torch.device("cpu"))
        size = student.config.img_size
        crops = crops or [torch.randn(batch, 3, size, size) for _ in range(2 + local_crops)]

    def step(objective: str):
        return lambda: learners[objective].step([crops], teacher_temp=0.04, momentum=0.996, freeze_last_layer=False)

    seconds = interleaved_medians({name: step(name) for name in learners}, repeats=repeats)
    images = batch  # images per step (each seen as 2 + local_crops crops)
    return {
        "train_step_midol_vs_dino_ratio": seconds["midol"] / seconds["dino"],
        "train_images_per_s_midol": images / seconds["midol"],
        "train_images_per_s_dino": images / seconds["dino"],
    }


def measure_precisions(batch: int = 32, repeats: int = 3) -> dict[str, float]:
    """midol-lite's pretraining step as ``midol_lite.yaml`` runs it (two 160 px global and four 64 px
    local crops per image) in fp32 against bf16, side by side: why that recipe trains in fp32."""
    learners = {}
    for precision in ("bf16", "fp32"):
        config = load_config(LITE, ["model.init=null", f"optim.precision={precision}"])
        torch.manual_seed(0)
        student, teacher = build_models(config, torch.device("cpu"))
        learners[precision] = Learner(config, student, teacher, torch.device("cpu"))
    crops = [torch.randn(batch, 3, 160, 160) for _ in range(2)] + [torch.randn(batch, 3, 64, 64) for _ in range(4)]

    def step(precision: str):
        return lambda: learners[precision].step([crops], teacher_temp=0.04, momentum=0.996, freeze_last_layer=False)

    seconds = interleaved_medians({precision: step(precision) for precision in learners}, repeats=repeats)
    return {"lite_train_fp32_vs_bf16_ratio": seconds["bf16"] / seconds["fp32"],
            "lite_train_images_per_s_fp32": batch / seconds["fp32"], "lite_train_images_per_s_bf16": batch / seconds["bf16"]}
