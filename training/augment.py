"""DINO multi-crop augmentation on [0, 1] image tensors (C, H, W)."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from midol_hub.modalities import IMAGENET_MEAN, IMAGENET_STD


class MultiCrop:
    """Two global crops and ``local_number`` local crops, all returned at ``size`` pixels.

    The paper resizes every crop to the global size. ``local_size`` (smaller than ``size``)
    renders local crops at that resolution first, then upsamples them, keeping one input size
    for the network (a dynamic-size Swin differs from the inference network).
    """

    def __init__(
        self,
        size: int,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        local_number: int = 2,
        local_size: int | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        flip_and_color = [
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        normalize = [v2.Normalize(mean, std)]
        blur = v2.GaussianBlur(kernel_size=max(3, size // 10 * 2 + 1), sigma=(0.1, 2.0))
        crop = lambda scale, out: v2.RandomResizedCrop(out, scale=tuple(scale), antialias=True)  # noqa: E731
        self.global_1 = v2.Compose([crop(global_scale, size), *flip_and_color, blur, *normalize])
        self.global_2 = v2.Compose(
            [crop(global_scale, size), *flip_and_color, v2.RandomApply([blur], p=0.1), v2.RandomSolarize(0.5, p=0.2), *normalize]
        )
        local = [crop(local_scale, local_size or size)]
        if local_size and local_size != size:
            local.append(v2.Resize(size, antialias=True))
        self.local = v2.Compose([*local, *flip_and_color, v2.RandomApply([blur], p=0.5), *normalize])
        self.local_number = local_number

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [self.global_1(image), self.global_2(image)] + [self.local(image) for _ in range(self.local_number)]

    @property
    def num_crops(self) -> int:
        return 2 + self.local_number
