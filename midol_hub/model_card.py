"""Render the model card ``README.md`` that ``save_pretrained`` writes next to the weights."""

from __future__ import annotations

import json
from importlib import resources
from string import Template

from .configuration_midol import MIDoLConfig
from .registry import PAPER_CITATION, get_entry

TEMPLATE = "midol.md"


def render_model_card(config: MIDoLConfig, name: str | None = None) -> str:
    """Fill the card template from ``config``; registry models add their licence and description."""
    name = name or "M-IDoL model"
    entry = get_entry(name)
    template = Template(resources.files("midol_hub.model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8"))
    input_spec = {
        modality: {
            "channels": profile["channels"],
            "value_range": [0.0, 1.0],
            "size": [profile["size"], profile["size"]],
            "resize": profile["resize"],
            "mean": profile["mean"],
            "std": profile["std"],
        }
        for modality, profile in config.preprocessing.items()
    }
    return template.substitute(
        name=name,
        load_name=name,
        license=entry.license if entry else "other",
        description=entry.description if entry else "",
        num_experts=config.num_experts,
        backbone=config.backbone,
        embed_dim=config.embed_dim,
        depths="-".join(map(str, config.depths)),
        num_heads="-".join(map(str, config.num_heads)),
        window_size=config.window_size,
        patch_size=config.patch_size,
        img_size=config.img_size,
        num_features=config.num_features,
        experts=", ".join(f"{i}: {m}" for i, m in enumerate(config.expert_modalities)),
        calibrated="yes" if config.modality_calibration else "no (expert order follows the paper's framing)",
        input_spec=json.dumps(input_spec, indent=2),
        citation=entry.citation if entry else PAPER_CITATION,
    )
