"""One optimisation step of M-IDoL (or the plain-DINO ablation) on multi-crop batches."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from midol_hub import MIDoLModel

from .distributed import is_distributed
from .losses import DINOLoss, RoutingConsistencyLoss


class TrainingError(RuntimeError):
    """A run that cannot start, resume or go on; the message says what to fix."""


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and relative-position tables."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") or "relative_position" in name else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "no_decay": True}]


@dataclass
class StepResult:
    loss: float = 0.0
    route_loss: float = 0.0
    distill_loss: float = 0.0
    teacher_routing: list[torch.Tensor] = field(default_factory=list)


class Learner:
    """Student, EMA teacher, both objectives, AdamW, AMP and gradient accumulation."""

    def __init__(self, config: dict[str, Any], student: MIDoLModel, teacher: MIDoLModel, device: torch.device) -> None:
        obj, optim = config["objective"], config["optim"]
        self.student, self.teacher, self.device = student, teacher, device
        self.model = DistributedDataParallel(student) if is_distributed() else student
        self.distill = DINOLoss(student.config.num_prototypes, obj["student_temp"], obj["center_momentum"]).to(device)
        self.route = RoutingConsistencyLoss(obj["route_student_temp"], obj["sinkhorn_eps"], obj["sinkhorn_iters"])
        self.use_routing = obj["name"] == "midol"
        self.weights = obj["distill_weight"], obj["route_weight"]
        self.clip_grad = optim["clip_grad"]
        self.optimizer = torch.optim.AdamW(param_groups(student), lr=0.0)
        precision = optim["precision"]
        if precision not in ("fp32", "bf16", "fp16"):
            raise TrainingError(f"optim.precision must be fp32, bf16 or fp16, got {precision!r}")
        if precision == "fp16" and device.type != "cuda":
            raise TrainingError("optim.precision fp16 needs CUDA (with a GradScaler); use bf16 on CPU")
        self.precision = precision
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def set_schedules(self, lr: float, weight_decay: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if not group.get("no_decay"):
                group["weight_decay"] = weight_decay

    def step(self, micro_batches: list[list[torch.Tensor] | None], teacher_temp: float, momentum: float,
             freeze_last_layer: bool) -> StepResult:
        """Accumulate gradients over the micro-batches, then one AdamW step and the teacher EMA."""
        result = StepResult()
        share = 1 / len(micro_batches)
        for crops in micro_batches:
            if crops is None:
                continue
            with self.autocast():
                with torch.no_grad():
                    teacher_out = self.teacher(torch.cat(crops[:2]))
                student_out = self.model(torch.cat(crops))
                distill = self.distill(student_out.prototype_logits, teacher_out.prototype_logits, len(crops), teacher_temp)
                route = (self.route(student_out.routing_logits, teacher_out.routing_logits, len(crops))
                         if self.use_routing else distill.new_zeros(()))
                loss = self.weights[0] * distill + self.weights[1] * route
            value, route_value, distill_value = torch.stack([loss, route, distill]).tolist()  # one device sync
            if not math.isfinite(value):
                raise TrainingError(f"the loss is {value}; lower optim.lr or train in fp32")
            self.scaler.scale(loss * share).backward()
            result.loss += value * share
            result.route_loss += route_value * share
            result.distill_loss += distill_value * share
            result.teacher_routing.append(teacher_out.routing_logits.float().softmax(-1)[: len(crops[0])].detach())
        self.scaler.unscale_(self.optimizer)
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip_grad)
        if freeze_last_layer:
            self.student.head.prototypes.parametrizations.weight.original1.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for t_param, s_param in zip(self.teacher.parameters(), self.student.parameters()):
                t_param.mul_(momentum).add_(s_param.detach(), alpha=1 - momentum)
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "distill_loss": self.distill.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.distill.load_state_dict(state["distill_loss"])
