"""The backbone's last batch norm, the one a CNN's pooled feature comes out of, for runs with
``model.batch_norm: frozen``: its statistics followed during training
(``model.head_norm_momentum``) or refitted at export (``training.export --refit-head-norm``).

Why: frozen, the statistics stay the start's while the layers below learn, and the head's
channels drift below zero, where ReLU6 silences them for every image. In midol-lite's tenth run
19-45% of the 1,280 pooled channels never fired on a set's training images (ImageNet start:
0.2-4%), and the pooled feature's linear probe lost what the run gained (README, "midol-lite").
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from timm.layers.norm_act import FrozenBatchNormAct2d
from torchvision.ops.misc import FrozenBatchNorm2d

from midol_hub import MIDoLModel
from midol_hub.errors import DatasetError

from .distributed import all_reduce_sum, world_size

BATCH_NORMS = (torch.nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d, FrozenBatchNormAct2d)


def head_norm(model: MIDoLModel) -> torch.nn.Module:
    """The last batch norm of ``model``'s backbone, plain or frozen (timm's ``freeze_batch_norm_2d``)."""
    norms = [module for module in model.backbone.modules() if isinstance(module, BATCH_NORMS)]
    if not norms:
        raise DatasetError(f"the backbone {model.config.backbone} has no batch norm")
    return norms[-1]


class HeadNormTracking:
    """``model.head_norm_momentum`` m > 0: the teacher's head norm still normalises with running
    statistics (no batch statistics in the forward, no gradient through them), but they follow
    its input on the global crops of every micro-batch, ``running <- (1 - m) running + m batch`` (batch
    moments averaged over ranks); the student normalises with the teacher's statistics, copied
    after each step. Weights, affine and every other batch norm stay frozen."""

    def __init__(self, student: MIDoLModel, teacher: MIDoLModel, momentum: float) -> None:
        self.student_norm, self.teacher_norm, self.momentum = head_norm(student), head_norm(teacher), momentum

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """Within it, the teacher's forwards update its head norm's statistics."""
        handle = self.teacher_norm.register_forward_pre_hook(self._update)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def _update(self, norm: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].double()
        moments = torch.stack([x.mean((0, 2, 3)), x.square().mean((0, 2, 3))])
        mean, square = all_reduce_sum(moments) / world_size()
        count = world_size() * x.numel() // x.shape[1]
        variance = (square - mean.square()).clamp_min(0) * count / max(count - 1, 1)  # unbiased, as batch norm keeps it
        norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), self.momentum)
        norm.running_var.lerp_(variance.to(norm.running_var.dtype), self.momentum)

    @torch.no_grad()
    def share(self) -> None:
        """The student takes the teacher's statistics."""
        self.student_norm.running_mean.copy_(self.teacher_norm.running_mean)
        self.student_norm.running_var.copy_(self.teacher_norm.running_var)


@torch.no_grad()
def refit_head_norm_statistics(model: MIDoLModel, images: Mapping[str, Sequence], batch_size: int = 48,
                               seed: int = 0) -> int:
    """Re-estimate the running mean and variance of an exported model's head norm on ``images``
    by modality, shuffled together, as a cumulative average; returns how many images. Weights,
    affine and every other batch norm stay as trained (refitting all of them, AdaBN, measured
    worse, README)."""
    norm = head_norm(model)
    if not isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
        raise DatasetError(f"the head norm of {model.config.backbone} is frozen ({type(norm).__name__}); refit an exported model")
    items = [(modality, image) for modality, group in images.items() for image in group]
    if not items:
        raise DatasetError("no images to refit the head's batch norm on")
    np.random.default_rng(seed).shuffle(items)
    momentum = norm.momentum
    norm.reset_running_stats()
    norm.momentum = None  # a cumulative average over the batches, not an EMA
    norm.train()
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            model.backbone(torch.cat([model.preprocess([image], modality) for modality, image in chunk]))
    finally:
        norm.momentum = momentum
        norm.eval()
    return len(items)
