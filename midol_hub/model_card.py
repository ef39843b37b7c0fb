"""Render the model card ``README.md`` that ``save_pretrained`` writes next to the weights.

Templates live in ``model_cards/``: one per registry model (front matter and description)
plus ``midol.md`` for any other model, each embedding the shared ``common.md`` body.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from .configuration_midol import MIDoLConfig
from .registry import PAPER_CITATION, get_entry

GENERIC_TEMPLATE = "midol"


def card_templates() -> list[str]:
    """Names of the available templates: the registry models' and the generic one."""
    files = resources.files("midol_hub.model_cards").iterdir()
    return sorted(f.name[:-3] for f in files if f.name.endswith(".md") and f.name != "common.md")


def _read(name: str) -> Template:
    return Template(resources.files("midol_hub.model_cards").joinpath(f"{name}.md").read_text(encoding="utf-8"))


def render_model_card(
    config: MIDoLConfig,
    name: str | None = None,
    results: dict[str, Any] | str | Path | None = None,
    base_model: str | None = None,
    notes: str | None = None,
) -> str:
    """Fill the card for ``config``.

    ``name`` picks the registry model's template (licence, datasets, description);
    ``results`` is a dict or JSON file ``{dataset: {protocol: {metric: value}}}`` that becomes
    the evaluation table; ``base_model`` goes into the front matter of derived models;
    ``notes`` is markdown added after the table (training details, comparisons).
    """
    entry = get_entry(name) if name else None
    template = entry.name if entry is not None and entry.name in card_templates() else GENERIC_TEMPLATE
    front = []
    if entry is not None and entry.datasets:
        front += ["datasets:"] + [f"- {json.dumps(d)}" for d in entry.datasets]
    if base_model:
        front.append(f"base_model: {base_model}")
    values = dict(
        name=name or "M-IDoL model",
        load_name=name or "path/to/this/model",
        license=entry.license if entry else "other",
        extra_front_matter="".join(line + "\n" for line in front),
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
        input_spec="{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in input_spec(config).items()) + "\n}",
        evaluation=evaluation_table(results),
        notes="\n" + notes.strip() + "\n" if notes else "",
        citation=entry.citation if entry else PAPER_CITATION,
        data_citations="\n".join(f"- {c}" for c in entry.data_citations) if entry and entry.data_citations else "",
    )
    values["common"] = _read("common").substitute(values)
    return _read(template).substitute(values)


def input_spec(config: MIDoLConfig) -> dict[str, dict[str, Any]]:
    """Machine-readable per-modality input description, from the config's profiles."""
    return {
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


def evaluation_table(results: dict[str, Any] | str | Path | None) -> str:
    """Markdown table of ``{dataset: {protocol: {metric: value}}}``, metrics as columns
    (a ``sizes`` entry per dataset, as ``midol_hub.evaluate`` writes, is left out)."""
    if results is None:
        return "No evaluation results yet."
    if not isinstance(results, dict):
        results = json.loads(Path(results).read_text(encoding="utf-8"))
    results = {name: {p: m for p, m in protocols.items() if p != "sizes"} for name, protocols in results.items()}
    metrics = sorted({m for protocols in results.values() for scores in protocols.values() for m in scores})
    lines = ["| dataset | protocol | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for dataset, protocols in results.items():
        for protocol, scores in protocols.items():
            cells = [f"{scores[m]:.3f}" if isinstance(scores.get(m), (int, float)) else "" for m in metrics]
            lines.append(f"| {dataset} | {protocol} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
