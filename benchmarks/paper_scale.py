"""The paper's pretraining on paper: ``python -m benchmarks.paper_scale``.

FLOPs of one M-IDoL training step per image at the paper's setup (Swin-B, 2 global + 2 local
crops at 224 px, 65,536 prototypes; student forward + backward on 4 crops, teacher forward on
2), counted by torch's FlopCounterMode on the meta device (no memory, no time), then the
whole run (1.15 M images x 100 epochs) and its wall-clock on 8 GPUs of a named class from
their published dense bf16 peak and a stated utilisation.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from training.config import load_config
from training.pretrain import build_models

IMAGES, EPOCHS, GPUS, UTILISATION = 1_150_000, 100, 8, 0.35
PEAK_BF16_TFLOPS = {"A100 SXM 80 GB": 312, "H100 SXM": 989}  # dense, as NVIDIA publishes them


def step_flops_per_image(config_path: str = "training/configs/midol_swin_base.yaml") -> float:
    config = load_config(config_path, ["optim.precision=fp32"])
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        student, teacher = build_models(config, torch.device("meta"))
        crops = [torch.empty(1, 3, 224, 224) for _ in range(2 + config["crops"]["local_number"])]
        with FlopCounterMode(display=False) as counter:
            with torch.no_grad():
                teacher(torch.cat(crops[:2]))
            out = student(torch.cat(crops))
            (out.prototype_logits.sum() + out.routing_logits.sum()).backward()
    return float(counter.get_total_flops())


def main() -> int:
    per_image = step_flops_per_image()
    total = per_image * IMAGES * EPOCHS
    print(f"FLOPs per image per step: {per_image / 1e9:.0f} GFLOP; whole run: {total:.2e} FLOP")
    print("| GPUs | peak bf16 | utilisation | wall-clock |\n|---|---|---|---|")
    for name, tflops in PEAK_BF16_TFLOPS.items():
        hours = total / (GPUS * tflops * 1e12 * UTILISATION) / 3600
        print(f"| {GPUS} x {name} | {tflops} TFLOPS | {UTILISATION:.0%} | {hours:.1f} h |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
