"""Named M-IDoL configurations, like timm's pretrained configs.

Each entry fixes an architecture and its preprocessing, and says where published weights
live (a Hub id), under which licence, and what to cite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .configuration_midol import MIDoLConfig

PAPER_CITATION = """@article{liu2026midol,
  title   = {{M-IDoL}},
  author  = {Liu and others},
  journal = {arXiv preprint arXiv:2604.08936},
  year    = {2026}
}"""


@dataclass(frozen=True)
class ModelEntry:
    """One named configuration."""

    name: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)
    hub_id: str | None = None
    license: str = "apache-2.0"
    citation: str = PAPER_CITATION
    datasets: tuple[str, ...] = ()
    data_citations: tuple[str, ...] = ()

    def make_config(self) -> MIDoLConfig:
        return MIDoLConfig(**self.config, name_or_path=self.name)

    @property
    def has_weights(self) -> bool:
        return self.hub_id is not None


_ENTRIES = (
    ModelEntry(
        name="midol-swin-base",
        description="The paper's architecture: Swin-B (patch 4, window 7, 224 px), 5 MoE experts, 1024-d.",
        config={},
    ),
    ModelEntry(
        name="midol-swin-tiny",
        description="Swin-T backbone (embed 96, depths 2-2-6-2), 5 MoE experts, 768-d; a lighter variant.",
        config=dict(
            backbone="swin_tiny_patch4_window7_224",
            embed_dim=96,
            depths=[2, 2, 6, 2],
            num_heads=[3, 6, 12, 24],
        ),
    ),
    ModelEntry(
        name="midol-micro",
        description="A 4 M-parameter Swin at 64 px (patch 2, window 4), 5 experts, 256-d; for CPU demos and tests.",
        config=dict(
            backbone="swin_tiny_patch4_window7_224",
            embed_dim=32,
            depths=[2, 2, 6, 2],
            num_heads=[1, 2, 4, 8],
            window_size=4,
            img_size=64,
            patch_size=2,
            hidden_dim=512,
            num_prototypes=4096,
        ),
    ),
)
_REGISTRY = {entry.name: entry for entry in _ENTRIES}


def list_models(pretrained: bool = False) -> list[str]:
    """Names of the registered models; with ``pretrained=True`` only those with published weights."""
    return [name for name, entry in _REGISTRY.items() if entry.has_weights or not pretrained]


def get_entry(name: str) -> ModelEntry | None:
    """The entry for ``name`` (case-insensitive, ``_`` or ``-``), or None."""
    return _REGISTRY.get(name.strip().lower().replace("_", "-"))
