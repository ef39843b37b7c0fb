"""Run the benchmarks and print a table: ``python -m benchmarks.run [--quick] [--json OUT]``.

Every figure is a ratio of two measurements taken side by side in this run, so it holds on a
noisy shared machine; absolute throughputs are printed beside it for context. The run keeps
freed memory as the ``midol`` commands do (:mod:`midol_hub.allocator`);
``allocator_speedup_ratio`` measures what that gives, in separate processes.
"""

from __future__ import annotations

import argparse
import json

import torch

from midol_hub.allocator import keep_freed_memory
from midol_hub.dtypes import cpu_name, supported_precisions

from . import encode, loader, loading, onnx_runtime, search_scale, train_step

TARGETS = {
    "encode_overhead_ratio": (">=", 0.97),
    "lite_encode_vs_timm_ratio": (">=", 0.97),
    "midol_encode_fullres_vs_forward_ratio": (">=", 0.85),
    "eight_bit_preprocess_speedup": (">=", 1.5),
    "eight_bit_max_grey_levels": ("<=", 1.0),
    "allocator_speedup_ratio": (">=", 1.5),
    "tiff_frame_time_ratio": ("<=", 1.5),
    "cpu_efficiency_ratio": (">=", 0.75),
    "bf16_speedup_ratio": (">=", 1.8),
    "bf16_cos_min": (">=", 0.999),
    "lite_bf16_speedup_ratio": (">=", 1.2),  # bf16 clearly faster: dtype="auto" is right to pick it
    "lite_bf16_cos_min": (">=", 0.999),
    "folder_vs_forward_ratio": (">=", 0.85),
    "load_peak_rss_ratio": ("<=", 1.3),
    "load_time_ratio": ("<=", 1.2),
    "train_step_midol_vs_dino_ratio": ("<=", 1.10),
    "lite_train_fp32_vs_bf16_ratio": (">=", 1.2),
    "loader_vs_step_ratio": (">=", 1.0),
    "shard_vs_folder_ratio": (">=", 0.9),
    "separable_blur_speedup_ratio": (">=", 3.0),
    "onnxruntime_vs_torch_ratio": (">=", 0.9),
    "onnxruntime_max_abs_diff": ("<=", 1e-4),
    "ann_recall_at_10": (">=", 0.95),
    "ann_query_speedup_ratio": (">=", 10.0),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, small inputs")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 7
    keep_freed_memory()
    results: dict[str, float] = {}
    results.update(encode.measure(repeats=repeats))
    results.update(encode.measure_cnn(repeats=repeats, files=32 if args.quick else 96))
    results.update(encode.measure_eight_bit(repeats=repeats))
    results.update(encode.measure_allocator(repeats=2 if args.quick else 3))
    results.update(encode.measure_frames())
    results.update(loading.measure(repeats=1 if args.quick else 3))
    results.update(train_step.measure(repeats=repeats, batch=8 if args.quick else 16))
    results.update(train_step.measure_precisions(repeats=2 if args.quick else 3))
    results.update(loader.measure(batches=4 if args.quick else 12))
    results.update(onnx_runtime.measure(repeats=repeats))
    results.update(search_scale.measure(size=100_000 if args.quick else 1_000_000))
    machine = supported_precisions("cpu")
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; native bf16: "
          f"{'yes (' + ', '.join(machine['cpu_bf16_features']) + ')' if machine['native_bf16'] else 'no'}; "
          f"dtype='auto' chose {machine['auto']}")
    if not machine["native_bf16"]:  # the bf16 targets apply only where bf16 is native
        TARGETS.pop("bf16_speedup_ratio")
        TARGETS.pop("lite_bf16_speedup_ratio")
        print("no native bf16 on this CPU: the bf16 speed-ups have no target here; dtype='auto' must choose float32: "
              + ("yes" if machine["auto"] == "float32" else "NO"))
    print(f"{'measurement':<38} {'value':>10}  target")
    for key, value in results.items():
        target = TARGETS.get(key)
        verdict = ""
        if target:
            met = value <= target[1] if target[0] == "<=" else value >= target[1]
            verdict = f"{target[0]} {target[1]}  {'met' if met else 'NOT met'}"
        print(f"{key:<38} {value:>10.4g}  {verdict}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
