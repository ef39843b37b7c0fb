"""One optimisation step of M-IDoL (or the plain-DINO ablation) on multi-crop batches."""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from midol_hub import MIDoLModel
from midol_hub.dtypes import native_bf16
from midol_hub.modeling_midol import backbone_stages
from midol_hub.tasks import layerwise_lr_groups

from .distributed import is_distributed
from .head_norm import HeadNormTracking
from .losses import FeaturePreservationLoss, KoLeoLoss, MIDoLLoss


class TrainingError(RuntimeError):
    """A run that cannot start, resume or go on; the message says what to fix."""


CLIP_MODES = ("per_param", "global")
STRATEGIES = ("ddp", "fsdp")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL_LOAD = StateDictOptions(full_state_dict=True)
FULL_LOAD_OPTIMIZER = StateDictOptions(full_state_dict=True, strict=False)  # frozen prototypes have no Adam state yet


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """No weight decay on biases and norms (every 1-D parameter), as the official DINO groups."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "no_decay": True}]


@torch.no_grad()
def clip_each_parameter(parameters, max_norm: float) -> None:
    """Scale each parameter's gradient to norm ``max_norm`` at most, separately (official
    ``utils.clip_gradients``; ``clip_grad_norm_`` would clip their global norm instead)."""
    for param in parameters:
        if param.grad is not None:
            scale = max_norm / (param.grad.norm(2) + 1e-6)
            param.grad.mul_(scale.clamp(max=1.0))


class MultiCropForward(torch.nn.Module):
    """The student on every crop: one forward per crop size (global and small local crops of a
    CNN), outputs concatenated in crop order; one forward when all crops share a size. A module,
    so that DDP wraps the whole multi-crop forward as one call."""

    def __init__(self, student: MIDoLModel) -> None:
        super().__init__()
        self.student = student

    def forward(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prototype logits, routing logits, pooled features) of all crops, in crop order."""
        groups: list[list[torch.Tensor]] = []
        for crop in crops:
            if groups and groups[-1][0].shape[-2:] == crop.shape[-2:]:
                groups[-1].append(crop)
            else:
                groups.append([crop])
        outputs = [self.student(torch.cat(group)) for group in groups]
        return tuple(torch.cat([getattr(out, name) for out in outputs]) for name in ("prototype_logits", "routing_logits", "pooled"))


@dataclass
class StepResult:
    loss: float = 0.0
    route_loss: float = 0.0
    distill_loss: float = 0.0
    koleo_loss: float = 0.0
    preserve_loss: float = 0.0
    teacher_routing: list[torch.Tensor] = field(default_factory=list)


class Learner:
    """Student, EMA teacher, the M-IDoL loss (plus KoLeo with ``objective.koleo_weight`` and feature
    preservation with ``objective.preserve_start_weight``), AdamW, clipping, AMP and gradient accumulation."""

    def __init__(self, config: dict[str, Any], student: MIDoLModel, teacher: MIDoLModel, device: torch.device) -> None:
        obj, optim = config["objective"], config["optim"]
        self.student, self.teacher, self.device = student, teacher, device
        self.strategy = config["dist"]["strategy"]
        if self.strategy not in STRATEGIES:
            raise TrainingError(f"dist.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        self.sharded = is_distributed() and self.strategy == "fsdp"
        if self.sharded:  # each backbone stage and the head are units: gathered for their forward, freed after
            for model in (student, teacher):
                for stage in backbone_stages(model.backbone):
                    fully_shard(stage)
                fully_shard(model.head)
                fully_shard(model)
            self.model = MultiCropForward(student)
        else:
            forward = MultiCropForward(student)
            self.model = DistributedDataParallel(forward) if is_distributed() else forward
        self.loss = MIDoLLoss(
            student.config.num_prototypes, 2 + config["crops"]["local_number"], obj["teacher_temp"], obj["student_temp"],
            obj["route_student_temp"], obj["center_momentum"], obj["sinkhorn_eps"], obj["sinkhorn_iters"],
            route_weight=obj["route_weight"] if obj["name"] == "midol" else 0.0, distill_weight=obj["distill_weight"],
            routing=obj["routing"],
        ).to(device)
        self.koleo_weight = obj["koleo_weight"]
        if self.koleo_weight < 0:
            raise TrainingError(f"objective.koleo_weight must be >= 0, got {self.koleo_weight!r}")
        self.koleo = KoLeoLoss()
        self.preserve_weight = obj["preserve_start_weight"]
        if self.preserve_weight < 0:
            raise TrainingError(f"objective.preserve_start_weight must be >= 0, got {self.preserve_weight!r}")
        if self.preserve_weight and is_distributed():
            raise TrainingError("objective.preserve_start_weight trains on one process; set it to 0 under torchrun")
        self.start, self.preserve = None, None
        if self.preserve_weight:  # the student as it starts, frozen: the same weights on resume, which rebuilds the start
            self.start = copy.deepcopy(student).eval().requires_grad_(False)
            self.preserve = FeaturePreservationLoss(student.backbone.num_features).to(device)
        self.clip_grad, self.clip_mode = optim["clip_grad"], optim["clip_mode"]
        if self.clip_mode not in CLIP_MODES:
            raise TrainingError(f"optim.clip_mode must be one of {', '.join(CLIP_MODES)}, got {self.clip_mode!r}")
        decay = optim["layer_decay"]
        if not 0 < decay <= 1:
            raise TrainingError(f"optim.layer_decay must be in (0, 1], got {decay!r}")
        groups = param_groups(student) if decay == 1 else layerwise_lr_groups(student, 0.0, decay, 0.0)
        if self.preserve is not None:  # the linear map, at the full learning rate; weight decay would only shrink it
            groups.append({"params": list(self.preserve.parameters()), "weight_decay": 0.0, "no_decay": True})
        self.optimizer = torch.optim.AdamW(groups, lr=0.0)
        precision = optim["precision"]
        if precision == "auto":  # bf16 where the device computes it natively (2x fp32 there), else fp32 (6x faster than emulated bf16)
            precision = "bf16" if native_bf16(device) else "fp32"
        if precision not in ("fp32", "bf16", "fp16"):
            raise TrainingError(f"optim.precision must be auto, fp32, bf16 or fp16, got {precision!r}")
        if precision == "fp16" and device.type != "cuda":
            raise TrainingError("optim.precision fp16 needs CUDA (with a GradScaler); use bf16 on CPU")
        self.precision = precision
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        momentum = config["model"]["head_norm_momentum"]
        self.head_norm = HeadNormTracking(student, teacher, momentum) if momentum else None

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def set_schedules(self, lr: float, weight_decay: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if not group.get("no_decay"):
                group["weight_decay"] = weight_decay

    def step(self, micro_batches: list[list[torch.Tensor] | None], teacher_temp: float, momentum: float,
             freeze_last_layer: bool, freeze_backbone: bool = False) -> StepResult:
        """Accumulate gradients over the micro-batches, then one AdamW step and the teacher EMA
        (``freeze_backbone``: only the head steps; AdamW leaves parameters without a gradient alone);
        with ``model.head_norm_momentum`` the teacher's forwards also move its head norm's statistics."""
        result = StepResult()
        share = 1 / len(micro_batches)
        for crops in micro_batches:
            if crops is None:
                continue
            with self.autocast():
                with torch.no_grad(), self.head_norm.tracking() if self.head_norm else contextlib.nullcontext():
                    teacher_out = self.teacher(torch.cat(crops[:2]))
                student_prototypes, student_routing, student_pooled = self.model(crops)
                loss, route, distill = self.loss(student_prototypes, teacher_out.prototype_logits,
                                                 student_routing, teacher_out.routing_logits, teacher_temp)
                koleo = loss.new_zeros(())
                if self.koleo_weight:  # DINOv2: summed over the global crops, each batch on its own
                    koleo = sum(self.koleo(view) for view in student_pooled[: 2 * len(crops[0])].chunk(2))
                    loss = loss + self.koleo_weight * koleo
                preserve = loss.new_zeros(())
                if self.preserve is not None:  # the global crops, both at once
                    global_crops = torch.cat(crops[:2])
                    with torch.no_grad():
                        start = self.start.forward_pooled(global_crops)
                    preserve = self.preserve(student_pooled[: len(global_crops)], start)
                    loss = loss + self.preserve_weight * preserve
            value, route_value, distill_value, koleo_value, preserve_value = torch.stack(
                [loss, route, distill, koleo, preserve]).tolist()  # one device sync
            if not math.isfinite(value):
                raise TrainingError(f"the loss is {value}; lower optim.lr or train in fp32")
            self.scaler.scale(loss * share).backward()
            result.loss += value * share
            result.route_loss += route_value * share
            result.distill_loss += distill_value * share
            result.koleo_loss += koleo_value * share
            result.preserve_loss += preserve_value * share
            result.teacher_routing.append(teacher_out.routing_logits.float().softmax(-1)[: len(crops[0])].detach())
        self.scaler.unscale_(self.optimizer)
        if self.clip_grad and self.clip_mode == "per_param":
            clip_each_parameter(self.student.parameters(), self.clip_grad)
        elif self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip_grad)
        if freeze_last_layer:
            self.student.head.prototypes.parametrizations.weight.original1.grad = None
        if freeze_backbone:
            for parameter in self.student.backbone.parameters():
                parameter.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            if self.sharded:  # a forward without backward leaves FSDP's root unit gathered: shard it back
                self.teacher.reshard()
            for t_param, s_param in zip(self.teacher.parameters(), self.student.parameters()):
                t_param.mul_(momentum).add_(s_param.detach(), alpha=1 - momentum)
            if self.head_norm:
                self.head_norm.share()
        return result

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s full (unsharded) state dict; under FSDP a collective every rank must call."""
        return get_model_state_dict(model, options=FULL) if self.sharded else model.state_dict()

    def full_state(self) -> dict[str, Any]:
        """Student, teacher and optimizer as full (unsharded) state dicts, so that a checkpoint of
        any strategy resumes under DDP and exports. Under FSDP every rank must call it."""
        optimizer = (get_optimizer_state_dict(self.student, self.optimizer, options=FULL) if self.sharded
                     else self.optimizer.state_dict())
        learner = {"optimizer": optimizer, "scaler": self.scaler.state_dict(), "loss": self.loss.state_dict()}
        if self.preserve is not None:
            learner["preserve"] = self.preserve.state_dict()
        return {"student": self.model_state(self.student), "teacher": self.model_state(self.teacher), "learner": learner}

    def load_full_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`full_state` saved (from a run of either strategy, see below)."""
        if (self.preserve is not None) != ("preserve" in state["learner"]):
            raise TrainingError(f"this checkpoint was trained {'with' if self.preserve is None else 'without'} "
                                "objective.preserve_start_weight; resume it with the run's own config (config.yaml in the run directory)")
        optimizer = state["learner"]["optimizer"]
        by_name = all(isinstance(key, str) for key in optimizer["state"])  # what FSDP saves: keyed by parameter name
        if self.sharded:
            if not by_name and optimizer["state"]:
                raise TrainingError("this checkpoint's optimizer state comes from a DDP run; resume it with "
                                    "dist.strategy=ddp (an FSDP checkpoint resumes under either strategy)")
            set_model_state_dict(self.student, state["student"], options=FULL_LOAD)
            set_model_state_dict(self.teacher, state["teacher"], options=FULL_LOAD)
            set_optimizer_state_dict(self.student, self.optimizer, optimizer, options=FULL_LOAD_OPTIMIZER)
        else:
            self.student.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            if by_name and optimizer["state"]:
                set_optimizer_state_dict(self.student, self.optimizer, optimizer, options=FULL_LOAD_OPTIMIZER)
            else:
                self.optimizer.load_state_dict(optimizer)
        self.scaler.load_state_dict(state["learner"]["scaler"])
        self.loss.load_state_dict(state["learner"]["loss"])
        if self.preserve is not None:
            self.preserve.load_state_dict(state["learner"]["preserve"])
