"""M-IDoL pretraining: ``python -m training.pretrain --config CONFIG --data PATH ... --output-dir DIR``.

The same command runs distributed under ``torchrun --nproc_per_node=K -m training.pretrain ...``.
Each step: multi-crop views -> student (all crops) and EMA teacher (global crops) ->
routing-consistency loss (Sinkhorn-balanced teacher routing) + DINO self-distillation ->
AdamW step with clipping -> EMA update of the teacher.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.utils.model import freeze_batch_norm_2d

from midol_hub import MIDoLConfig, MIDoLModel, get_entry, load_model
from midol_hub.allocator import keep_freed_memory
from midol_hub.dtypes import supported_precisions
from midol_hub.errors import DatasetError
from midol_hub.modalities import SHARED
from midol_hub.utils import join_torchrun, leave_torchrun, run_command, state_sha256

from .augment import MultiCrop
from .checkpoint import (
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import RENAMED_VALUES, ConfigError, load_config, save_config
from .data import BALANCE_MODES, MapData, open_source
from .distributed import is_distributed
from .imagenet import IMAGENET, IMAGENET_SOURCE, load_imagenet_backbone
from .learner import Learner, TrainingError
from .monitor import KNNMonitor, RoutingMonitor, routing_stats
from .schedules import cosine, linear_then_constant
from .shards import StreamData, is_shard_spec, open_shards

log = logging.getLogger("training")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file over training/configs/defaults.yaml")
    parser.add_argument("--data", nargs="+", required=True,
                        help="folders, .npz files, .txt image lists, or shard folders / shards / brace patterns; TAG=PATH tags a root")
    parser.add_argument("--output-dir", required=True, help="run directory: config, log.jsonl, checkpoints")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size")
    parser.add_argument("--objective", choices=("midol", "dino"), default=None, help="midol, or the plain DINO ablation")
    parser.add_argument("--balance", choices=BALANCE_MODES + tuple(RENAMED_VALUES[("data", "balance")]), default=None,
                        help="tags: draw every tag (or untagged root) equally often per epoch; tags_per_batch: and in every batch")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    overrides = list(args.set)
    if args.batch_size is not None:
        overrides.append(f"optim.batch_size={args.batch_size}")
    if args.max_steps is not None:
        overrides.append(f"run.max_steps={args.max_steps}")
    if args.objective is not None:
        overrides.append(f"objective.name={args.objective}")
    if args.balance is not None:
        overrides.append(f"data.balance={args.balance}")
    return load_config(args.config, overrides)


def model_config(config: dict[str, Any], drop_path: float) -> MIDoLConfig:
    """The MIDoLConfig trained: the registry architecture with prototypes kept."""
    entry = get_entry(config["model"]["arch"])
    if entry is None:
        raise ConfigError(f"model.arch {config['model']['arch']!r} is not a registry name")
    model = config["model"]
    fields = {**entry.config, "top_k": model["top_k"], "gate_noise": model["gate_noise"], **model["overrides"]}
    fields.update(keep_prototypes=True, num_prototypes=model["num_prototypes"], drop_path_rate=drop_path)
    if config["objective"]["name"] == "dino":
        fields.update(num_experts=1, top_k=1, expert_modalities=[SHARED])
    elif config["objective"]["name"] != "midol":
        raise ConfigError(f"objective.name must be 'midol' or 'dino', got {config['objective']['name']!r}")
    return MIDoLConfig(**fields, name_or_path=entry.name)


def freeze_batch_norm(model: MIDoLModel) -> None:
    """``model.batch_norm: frozen``: the backbone's batch norms keep the start's statistics and
    affine (a batch of 32 mixed crops makes poor statistics; the paper's Swin has no batch norm)."""
    model.backbone = freeze_batch_norm_2d(model.backbone)


def build_models(config: dict[str, Any], device: torch.device) -> tuple[MIDoLModel, MIDoLModel]:
    student = MIDoLModel(model_config(config, config["model"]["drop_path_rate"]))
    if config["model"]["init"]:
        init_from(student, config["model"]["init"])
    batch_norm = config["model"]["batch_norm"]
    if batch_norm == "frozen":
        freeze_batch_norm(student)
    elif batch_norm != "train":
        raise ConfigError(f"model.batch_norm must be 'train' or 'frozen', got {batch_norm!r}")
    head_norm_momentum = config["model"]["head_norm_momentum"]
    if not 0 <= head_norm_momentum <= 1:
        raise ConfigError(f"model.head_norm_momentum must be in [0, 1], got {head_norm_momentum!r}")
    if head_norm_momentum and batch_norm != "frozen":
        raise ConfigError("model.head_norm_momentum needs model.batch_norm: frozen (with train, every batch norm follows its batches)")
    # the official teacher is never switched to eval mode: stochastic depth and gate noise act on it too
    teacher_train_mode = config["model"]["teacher_train_mode"]
    teacher = MIDoLModel(model_config(config, config["model"]["drop_path_rate"] if teacher_train_mode else 0.0))
    if batch_norm == "frozen":
        freeze_batch_norm(teacher)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    # DINO's norm_last_layer: prototype norms stay fixed at 1
    student.head.prototypes.parametrizations.weight.original0.requires_grad_(False)
    return student.to(device).train(), teacher.to(device).train(teacher_train_mode)


def open_training_data(specs: list[str], config: dict[str, Any], augment: MultiCrop, per_rank: int, rank: int,
                       world: int) -> MapData | StreamData:
    """Folders, .npz files and lists as map-style data, or shard directories, shards and brace
    patterns as a stream; the two kinds do not mix in one run."""
    shard_specs = [spec for spec in specs if is_shard_spec(spec.partition("=")[2] if "=" in spec else spec)]
    common = dict(seed=config["run"]["seed"], balance=config["data"]["balance"], global_batch=config["optim"]["batch_size"],
                  per_rank=per_rank, accumulate=config["optim"]["accumulate"], rank=rank, world=world,
                  workers=config["data"]["num_workers"])
    if not shard_specs:
        return MapData([open_source(spec, config["data"]["split"], config["data"]["frames"]) for spec in specs], augment,
                       **common)
    if len(shard_specs) != len(specs):
        raise DatasetError("--data mixes shards with folders or files; write them all to shards with "
                        "python -m training.make_shards, or train on the folders and files alone")
    shards = [shard for spec in shard_specs for shard in open_shards(spec)]
    return StreamData(shards, augment, buffer=config["data"]["shuffle_buffer"], **common)


def init_from(student: MIDoLModel, source: str) -> None:
    """Start from ``"imagenet"`` (the backbone's installed ImageNet weights, :mod:`training.imagenet`;
    a fresh head) or from a midol_hub model: its whole backbone, and the head tensors whose shapes
    match (a one-expert DINO head does not fit five experts: the head then starts fresh,
    as the official run starts a fresh head on an ImageNet backbone). The student's config takes
    the init's pretraining record, so every checkpoint carries the lineage of its weights."""
    if source == IMAGENET:
        load_imagenet_backbone(student)
        student.config.pretraining = {"weights": IMAGENET_SOURCE}
        return
    own = student.state_dict()
    loaded = load_model(source)
    student.config.pretraining = loaded.config.pretraining
    init = loaded.state_dict()
    backbone_missing = [k for k in own if k.startswith("backbone.") and (k not in init or init[k].shape != own[k].shape)]
    if backbone_missing:
        raise TrainingError(f"model.init {source} does not match model.arch: backbone tensors {backbone_missing[:3]} differ")
    fitting = {k: v for k, v in init.items() if k in own and v.shape == own[k].shape}
    student.load_state_dict(fitting, strict=False)
    fresh = sorted({k.rsplit(".", 1)[0] for k in own if k not in fitting})
    if fresh:
        log.info("model.init %s: backbone loaded; fresh (not in the init or of another shape): %s", source, ", ".join(fresh))


ARCHITECTURE_KEYS = ("embed_dim", "depths", "num_heads", "window_size", "img_size", "patch_size", "num_experts",
                     "hidden_dim", "num_prototypes")
"""What a checkpoint must share with the run that resumes it (the timm name only picks the Swin class)."""


def _architecture(model_config: dict[str, Any]) -> dict[str, Any]:
    return {key: model_config.get(key) for key in ARCHITECTURE_KEYS}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    keep_freed_memory()  # CPU steps stop faulting their activations in anew (midol_hub.allocator)
    code = 1
    try:
        code = run_command("training.pretrain", lambda: run(args), (ConfigError, DatasetError, TrainingError))
        return code
    finally:
        leave_torchrun(succeeded=code == 0)


def run(args: argparse.Namespace) -> None:
    config = resolve_config(args)
    rank, world, device_name = join_torchrun()
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.output_dir)
    checkpoints = list_checkpoints(out) if out.is_dir() else []
    if args.resume and not checkpoints:
        raise TrainingError(f"--resume: {out} has no checkpoint to resume from")
    if not args.resume and checkpoints:
        raise TrainingError(f"{out} already holds a run; pass --resume to continue it or choose a new --output-dir")

    optim_cfg, run_cfg, obj = config["optim"], config["run"], config["objective"]
    per_rank, remainder = divmod(optim_cfg["batch_size"], world * optim_cfg["accumulate"])
    if remainder or per_rank == 0:
        raise ConfigError(
            f"optim.batch_size {optim_cfg['batch_size']} must be a multiple of ranks x accumulate ({world * optim_cfg['accumulate']})"
        )
    torch.manual_seed(run_cfg["seed"])
    student, teacher = build_models(config, device)
    image_size = student.config.img_size
    crops = config["crops"]
    if crops["global_size"] and crops["global_size"] != image_size:
        if student.config.is_swin:
            raise ConfigError(f"crops.global_size {crops['global_size']}: a Swin backbone trains at its input size {image_size}")
        image_size = crops["global_size"]
    try:
        normalisation = student.config.profile("auto")
        augment = MultiCrop(image_size, crops["global_scale"], crops["local_scale"], crops["local_number"],
                            crops["local_size"], normalisation.mean, normalisation.std, stain_tags=tuple(crops["stain_tags"]),
                            stain_p=crops["stain_p"], stain_sigma=crops["stain_sigma"], ihc_patterns=crops["ihc_patterns"],
                            local_upsample=crops["local_upsample"], colour_jitter_strength=crops["colour_jitter"],
                            colour_jitter_p=crops["colour_jitter_p"], grayscale_p=crops["grayscale_p"])
    except ValueError as error:
        raise ConfigError(f"crops: {error}") from None
    global_batch = optim_cfg["batch_size"]
    data = open_training_data(args.data, config, augment, per_rank, rank, world)
    steps_per_epoch = data.steps_per_epoch
    total_steps = optim_cfg["epochs"] * steps_per_epoch
    max_steps = min(total_steps, run_cfg["max_steps"] or total_steps)

    learner = Learner(config, student, teacher, device)
    step, epoch, batch_in_epoch = 0, 0, 0
    machines: list[dict[str, Any]] = []
    if args.resume:
        state = load_checkpoint(checkpoints[-1])
        if _architecture(state["model_config"]) != _architecture(student.config.to_dict()):
            raise TrainingError(
                f"--resume: {checkpoints[-1].name} was trained with another architecture or objective; "
                "resume with the run's own config (see config.yaml in the run directory)"
            )
        learner.load_full_state(state)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        set_rng_state(state["rng"])
        machines = state.get("machines", [{"from_step": 0}])  # checkpoints before 2026-12-07 did not record it
    here = training_machine(device, world, learner.precision)
    if {key: value for key, value in (machines or [{}])[-1].items() if key != "from_step"} != here:
        machines = [*machines, {"from_step": step, **here}]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")

    def save(step_now: int, epoch_now: int, batch_now: int) -> None:
        full = learner.full_state()  # a collective under FSDP: every rank takes part
        if rank == 0:
            payload = {**full, "step": step_now, "epoch": epoch_now, "batch_in_epoch": batch_now, "rng": rng_state(),
                       "config": config, "model_config": student.config.to_dict(), "machines": machines}
            save_checkpoint(out, step_now, payload, run_cfg["keep_checkpoints"])

    # monitors run the teacher: on rank 0, or on every rank when FSDP needs them all for a forward
    monitoring = rank == 0 or learner.sharded
    knn = KNNMonitor(run_cfg["knn_data"], image_size) if monitoring and run_cfg["knn_data"] and run_cfg["knn_every"] else None
    routing = None
    if monitoring and run_cfg["routing_every"] and obj["name"] == "midol" and any(data.tags):
        routing = RoutingMonitor(data.samples_by_tag(run_cfg["routing_images"]), image_size)
    warmup = int(optim_cfg["warmup_epochs"] * steps_per_epoch)
    base_lr = optim_cfg["lr"] * global_batch / 256
    log_file = open(out / "log.jsonl", "a", encoding="utf-8") if rank == 0 else None
    progress = _progress_bar(rank, max_steps, step)
    skipped = 0
    tags = data.tags

    while step < max_steps:
        batches = iter(data.loader(epoch, batch_in_epoch))
        while batch_in_epoch < steps_per_epoch and step < max_steps:
            started = time.perf_counter()
            lr = cosine(step, total_steps, base_lr, optim_cfg["min_lr"], warmup)
            wd = cosine(step, total_steps, optim_cfg["weight_decay"], optim_cfg["weight_decay_end"])
            momentum = cosine(step, total_steps, optim_cfg["momentum_teacher"], 1.0)
            teacher_temp = linear_then_constant(
                step, int(obj["warmup_teacher_temp_epochs"] * steps_per_epoch), obj["warmup_teacher_temp"], obj["teacher_temp"]
            )
            learner.set_schedules(lr, wd)
            micro_batches, sources_seen = [], []
            for _ in range(optim_cfg["accumulate"]):
                batch = next(batches)
                for name in batch["failed"]:
                    log.warning("skipped unreadable image %s", name)
                skipped += len(batch["failed"])
                micro_batches.append(None if batch["crops"] is None else [c.to(device, non_blocking=True) for c in batch["crops"]])
                if batch["source"] is not None:
                    sources_seen.append(batch["source"])
            result = learner.step(micro_batches, teacher_temp, momentum, freeze_last_layer=epoch < optim_cfg["freeze_last_layer"],
                                  freeze_backbone=step < optim_cfg["freeze_backbone_epochs"] * steps_per_epoch)
            step += 1
            batch_in_epoch += 1
            monitors = {}
            if knn is not None and step % run_cfg["knn_every"] == 0:
                monitors["knn_accuracy"] = knn.accuracy(teacher)
            if routing is not None and (step % run_cfg["routing_every"] == 0 or step == max_steps):
                monitors["routing"] = routing.report(teacher)
            if log_file is not None and step % run_cfg["log_every"] == 0:
                record = {"step": step, "epoch": epoch, "loss": result.loss, "route_loss": result.route_loss,
                          "distill_loss": result.distill_loss, "koleo_loss": result.koleo_loss,
                          "preserve_loss": result.preserve_loss, "lr": lr, "wd": wd, "momentum": momentum,
                          "teacher_temp": teacher_temp, "skipped_images": skipped,
                          "images_per_s": global_batch / (time.perf_counter() - started)}
                if result.teacher_routing:
                    record.update(routing_stats(torch.cat(result.teacher_routing).cpu(), torch.cat(sources_seen), tags))
                record.update(monitors)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            progress.update(1)
            progress.set_postfix(loss=f"{result.loss:.3f}")
            if step % run_cfg["checkpoint_every"] == 0 or step == max_steps:
                save(step, epoch, batch_in_epoch)
        if batch_in_epoch >= steps_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
            save(step, epoch, batch_in_epoch)
    progress.close()
    _check_ranks_in_sync(learner.model_state(teacher), rank, world, out)
    if log_file is not None:
        log_file.close()


def training_machine(device: torch.device, world: int, precision: str) -> dict[str, Any]:
    """Where a run's steps are computed: kept in its checkpoints from the step a session starts at
    (``"machines"``), so that the card says what trained it and how fast, across resumes."""
    machine = supported_precisions(device)
    record = {"cpu": machine["cpu"], "cores": machine["cores"], "native_bf16": machine["native_bf16"], "ranks": world,
              "precision": precision}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def _check_ranks_in_sync(teacher_state: dict[str, torch.Tensor], rank: int, world: int, out: Path) -> None:
    """Rank 0 records every rank's teacher checksum; they must agree under DDP."""
    sums = [state_sha256(teacher_state)]
    if is_distributed():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, sums[0])
        sums = gathered
    if rank == 0:
        (out / "ranks.json").write_text(json.dumps({"teacher_sha256": sums, "in_sync": len(set(sums)) == 1}))


def _progress_bar(rank: int, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=rank != 0, unit="step", desc="pretrain")


if __name__ == "__main__":
    sys.exit(main())
