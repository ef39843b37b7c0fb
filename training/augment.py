"""DINO multi-crop augmentation on [0, 1] image tensors (C, H, W), with stain jitter for pathology."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from midol_hub.modalities import IMAGENET_MEAN, IMAGENET_STD

# Ruifrok & Johnston (2001) optical densities of haematoxylin, eosin and DAB (rows, unit norm),
# the stain vectors that skimage.color.rgb2hed uses.
HED_FROM_RGB = torch.linalg.inv(torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]))
RGB_FROM_HED = torch.linalg.inv(HED_FROM_RGB)
_OD_FLOOR = 1e-6


class StainJitter:
    """Random stain variation in haematoxylin-eosin-DAB space (Tellez et al., 2019), plus re-staining.

    The image is unmixed into H, E and DAB optical densities. Each stain's density is scaled by
    ``1 + U(-sigma, sigma)`` and shifted by ``U(-sigma, sigma)``. With probability ``restain_p``
    the tile is also re-stained as an immunohistochemistry tile: eosin mostly removed, a light
    haematoxylin counterstain, and brown DAB laid on random patches where the marker sits, one of
    ``patterns`` drawn per tile: ``"nuclear"`` (on the haematoxylin: Ki67, ER, p53) or
    ``"cytoplasmic"`` (on the eosin, which marks cytoplasm and membranes: cytokeratins, HER2).
    So the pathology expert learns H&E and IHC as one modality from H&E and the few IHC regions
    we have (nuclear Ki67 only).
    """

    PATTERNS = ("nuclear", "cytoplasmic")

    def __init__(self, sigma: float = 0.05, restain_p: float = 0.5, patterns: str | tuple[str, ...] = ("nuclear",)) -> None:
        patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)  # "nuclear" means ("nuclear",)
        unknown = set(patterns) - set(self.PATTERNS)
        if not patterns or unknown:
            raise ValueError(f"IHC re-staining patterns (ihc_patterns) must be a non-empty subset of {self.PATTERNS}, "
                             f"got {tuple(patterns)}")
        self.sigma, self.restain_p, self.patterns = sigma, restain_p, patterns

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        density = -torch.log(image.clamp_min(_OD_FLOOR)).permute(1, 2, 0) @ HED_FROM_RGB
        if torch.rand(()) < self.restain_p:
            h, e, _ = density.clamp_min(0).unbind(-1)
            # one pattern needs no draw, so the released (nuclear-only) recipe's random stream is unchanged
            pattern = self.patterns[int(torch.randint(len(self.patterns), ()))] if len(self.patterns) > 1 else self.patterns[0]
            cells = torch.rand(1, 1, max(1, h.shape[0] // 12), max(1, h.shape[1] // 12))
            marked = F.interpolate(cells, size=h.shape, mode="bilinear")[0, 0] > 0.4 + 0.5 * torch.rand(())
            dab = (h if pattern == "nuclear" else e) * marked * (0.5 + torch.rand(()))
            density = torch.stack([h * (0.3 + 0.4 * torch.rand(())), e * 0.2 * torch.rand(()), dab], dim=-1)
        alpha = 1 + (torch.rand(3) * 2 - 1) * self.sigma
        beta = (torch.rand(3) * 2 - 1) * self.sigma
        jittered = (density * alpha + beta).clamp_min(0) @ RGB_FROM_HED
        return torch.exp(-jittered).clamp(0, 1).permute(2, 0, 1).contiguous()


COLOUR_JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
"""DINO's colour jitter strengths (``torchvision`` ``ColorJitter`` arguments); how often: ``MultiCrop(colour_jitter_p=)``."""


def colour_jitter(overrides: dict[str, float] | None = None) -> v2.ColorJitter:
    """DINO's colour jitter with ``overrides`` of some of its strengths (e.g. ``{"hue": 0}``)."""
    unknown = set(overrides or {}) - set(COLOUR_JITTER)
    if unknown:
        raise ValueError(f"colour_jitter takes {', '.join(COLOUR_JITTER)}, got {', '.join(sorted(unknown))}")
    return v2.ColorJitter(**{**COLOUR_JITTER, **(overrides or {})})


class SeparableGaussianBlur(v2.GaussianBlur):
    """torchvision's ``GaussianBlur`` (the same sigma draw, Gaussian and reflect padding) on a float
    (C, H, W) image as two 1-D passes: torchvision convolves with the full 2-D kernel, 1,089
    multiply-adds per pixel for the 33-tap blur of a 160 px crop where these take 66, and that
    blur was most of the data loaders' time."""

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        (width, height), channels = self.kernel_size, inpt.shape[-3]

        def kernel(size: int, sigma: float) -> torch.Tensor:
            offsets = torch.arange(size, dtype=inpt.dtype) - (size - 1) / 2
            return torch.softmax(-(offsets / sigma) ** 2 / 2, dim=0)

        padded = F.pad(inpt[None], [width // 2, width // 2, height // 2, height // 2], mode="reflect")
        rows = F.conv2d(padded, kernel(width, params["sigma"][0]).view(1, 1, 1, width).expand(channels, 1, 1, width),
                        groups=channels)
        return F.conv2d(rows, kernel(height, params["sigma"][1]).view(1, 1, height, 1).expand(channels, 1, height, 1),
                        groups=channels)[0]


class MultiCrop:
    """Two global crops at ``size`` pixels and ``local_number`` local crops.

    The paper resizes every crop to the global size. ``local_size`` (smaller than ``size``)
    renders local crops at that resolution first; with ``local_upsample`` they are then
    upsampled to ``size``, keeping one input size for the network (a dynamic-size Swin differs
    from the inference network), without it they stay small, as DINO's 96 px local crops for a
    CNN, which takes any size (and costs a fifth as much on them). Images whose tag
    is in ``stain_tags`` get :class:`StainJitter` (drawn once per image, shared by its crops,
    with probability ``stain_p``) before cropping. Each crop gets DINO's colour jitter (strengths
    ``colour_jitter_strength`` over :data:`COLOUR_JITTER`) with probability ``colour_jitter_p``
    and grayscale with probability ``grayscale_p``: invariances that cost colour-coded medical
    classes (blood cells, stains, pigment) are settings, not constants.
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
        stain_tags: tuple[str, ...] = (),
        stain_p: float = 0.8,
        stain_sigma: float = 0.05,
        ihc_patterns: str | tuple[str, ...] = ("nuclear",),
        local_upsample: bool = True,
        colour_jitter_strength: dict[str, float] | None = None,
        colour_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
    ) -> None:
        flip_and_color = [
            v2.RandomHorizontalFlip(),
            v2.RandomApply([colour_jitter(colour_jitter_strength)], p=colour_jitter_p),
            v2.RandomGrayscale(p=grayscale_p),
        ]
        normalize = [v2.Normalize(mean, std)]
        blur = SeparableGaussianBlur(kernel_size=max(3, size // 10 * 2 + 1), sigma=(0.1, 2.0))
        crop = lambda scale, out: v2.RandomResizedCrop(out, scale=tuple(scale), antialias=True)  # noqa: E731
        self.global_1 = v2.Compose([crop(global_scale, size), *flip_and_color, blur, *normalize])
        self.global_2 = v2.Compose(
            [crop(global_scale, size), *flip_and_color, v2.RandomApply([blur], p=0.1), v2.RandomSolarize(0.5, p=0.2), *normalize]
        )
        local = [crop(local_scale, local_size or size)]
        if local_size and local_size != size and local_upsample:
            local.append(v2.Resize(size, antialias=True))
        self.local = v2.Compose([*local, *flip_and_color, v2.RandomApply([blur], p=0.5), *normalize])
        self.local_number = local_number
        self.stain_tags, self.stain = set(stain_tags), v2.RandomApply([StainJitter(stain_sigma, patterns=ihc_patterns)], p=stain_p)

    def __call__(self, image: torch.Tensor, tag: str | None = None) -> list[torch.Tensor]:
        if tag in self.stain_tags:
            image = self.stain(image)
        return [self.global_1(image), self.global_2(image)] + [self.local(image) for _ in range(self.local_number)]

    @property
    def num_crops(self) -> int:
        return 2 + self.local_number
