"""The model card ``README.md`` that ``save_pretrained`` writes next to the weights.

Front matter comes from ``huggingface_hub.ModelCardData`` (licence, library, pipeline tag,
tags, datasets, base model, and a ``model-index`` of the evaluation results, so the Hub shows
them); the text from ``midol_hub/model_cards/``: one template per registry model plus ``midol.md`` for
any other, each embedding the shared ``common.md``.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_midol import MIDoLConfig
from .registry import PAPER_CITATION, get_entry

GENERIC_TEMPLATE = "midol"
TAGS = ["medical-imaging", "self-supervised", "mixture-of-experts", "m-idol"]  # plus the backbone's: see architecture_tag
SEPARATION = "Modality separation (test sets)"  # the key benchmarks.evaluate writes its routing results under
METRIC_TYPES = {"accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy", "auc": "roc_auc", "f1": "f1"}


def card_templates() -> list[str]:
    """Names of the available templates: the registry models' and the generic one."""
    files = resources.files("midol_hub.model_cards").iterdir()
    return sorted(f.name[:-3] for f in files if f.name.endswith(".md") and f.name != "common.md")


def _read(name: str) -> Template:
    return Template(resources.files("midol_hub.model_cards").joinpath(f"{name}.md").read_text(encoding="utf-8"))


def _load_results(results: dict[str, Any] | str | Path | None) -> dict[str, Any] | None:
    if results is None or isinstance(results, dict):
        return results
    return json.loads(Path(results).read_text(encoding="utf-8"))


def architecture_tag(config: MIDoLConfig) -> str:
    """The Hub tag of the backbone: ``swin-transformer`` for a Swin, otherwise its timm name."""
    return "swin-transformer" if config.is_swin else config.backbone


def render_model_card(
    config: MIDoLConfig,
    name: str | None = None,
    results: dict[str, Any] | str | Path | None = None,
    base_model: str | None = None,
    notes: str | None = None,
) -> ModelCard:
    """The card for ``config``.

    ``name`` picks the registry model's template (licence, datasets, description);
    ``results`` is a dict or JSON file ``{dataset: {protocol: {metric: value}}}`` (as
    ``benchmarks.evaluate`` writes) that becomes the evaluation table and the model-index;
    ``base_model`` goes into the front matter of derived models; ``notes`` is markdown added
    after the table (training details, comparisons).
    """
    entry = get_entry(name) if name else None
    template = entry.name if entry is not None and entry.name in card_templates() else GENERIC_TEMPLATE
    results = _load_results(results)
    data = ModelCardData(
        license=entry.license if entry else "other",
        library_name="midol-hub",
        pipeline_tag="image-feature-extraction",
        tags=[*TAGS, architecture_tag(config)],
        datasets=list(entry.datasets) if entry and entry.datasets else None,
        base_model=base_model,
        model_name=name or "M-IDoL model",
        eval_results=eval_results(results) or None,
    )
    values = dict(
        name=name or "M-IDoL model",
        load_name=name or "path/to/this/model",
        num_experts=config.num_experts,
        backbone_description=_backbone_description(config),
        img_size=config.img_size,
        num_features=config.num_features,
        experts=", ".join(f"{i}: {m}" for i, m in enumerate(config.expert_modalities)),
        calibrated=_calibration_summary(config),
        pretraining=_pretraining_summary(config),
        input_spec="{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in input_spec(config).items()) + "\n}",
        evaluation=evaluation_table(results),
        notes="\n" + notes.strip() + "\n" if notes else "",
        citation=entry.citation if entry else PAPER_CITATION,
        data_citations="\n".join(f"- {c}" for c in entry.data_citations) if entry and entry.data_citations else "",
    )
    values["common"] = _read("common").substitute(values)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_read(template).substitute(values)}")


def _backbone_description(config: MIDoLConfig) -> str:
    if not config.is_swin:
        return f"`{config.backbone}` (timm's architecture)"
    return (f"`{config.backbone}` (embed {config.embed_dim}, depths {'-'.join(map(str, config.depths))}, heads "
            f"{'-'.join(map(str, config.num_heads))}, window {config.window_size}, patch {config.patch_size})")


def _calibration_summary(config: MIDoLConfig) -> str:
    calibration = config.modality_calibration
    if not calibration:
        return "no (expert order follows the paper's framing)"
    if "macro_accuracy" not in calibration:
        return "yes"
    accuracy = ", ".join(f"{m} {a:.2f}" for m, a in calibration["accuracy"].items())
    shared = "".join(f"; {m} has no expert of its own and shares expert {e} ({config.expert_modalities[e]})"
                     for m, e in config.shared_experts.items())
    return f"yes, on training images: routing accuracy {accuracy} (macro {calibration['macro_accuracy']:.2f}){shared}"


def _pretraining_summary(config: MIDoLConfig) -> str:
    record = config.pretraining
    if not record:
        return "not recorded"
    text = f"{record['objective']} objective"
    if record.get("routing"):
        text += f", {record['routing']} routing"
    text += f", top-{record['top_k']} gates, {record['steps']} steps of batch {record['batch_size']}"
    if record.get("init"):
        text += f", started from {Path(record['init']).name}" + _lineage(record.get("init_pretraining"))
    if record.get("machines"):
        text += f"; trained on {machines_summary(record['machines'], record['steps'])}"
    deviations = record.get("deviations_from_official") or {}
    text += "; deviations from the official code: " + (", ".join(f"{k}={v}" for k, v in deviations.items()) or "none")
    return text


def machines_summary(machines: list[dict], steps: int) -> str:
    """Which machine computed which steps of a run (its checkpoints' ``machines``), in words: "steps
    0-750 on a machine not recorded, 750-7,968 on AMD EPYC 7B13 (2 cores, no native bf16), 1 rank, fp32"."""
    parts = []
    for machine, following in zip(machines, [*machines[1:], {"from_step": steps}]):
        if following["from_step"] == machine["from_step"]:  # resumed elsewhere, then stopped before a checkpoint
            continue
        span = f"{machine['from_step']:,}-{following['from_step']:,}"
        if "cpu" not in machine:
            parts.append(f"{span} on a machine not recorded")
            continue
        where = machine.get("gpu") or (f"{machine['cpu']} ({machine['cores']} cores, "
                                       f"{'native' if machine['native_bf16'] else 'no native'} bf16)")
        parts.append(f"{span} on {where}, {machine['ranks']} rank{'s' if machine['ranks'] > 1 else ''}, "
                     f"{machine['precision']}")
    return "steps " + ", ".join(parts)


def _lineage(record: dict | None) -> str:
    """How the init was itself trained, as far as recorded: " (N steps from A (M steps from B))", ending
    in the published weights a run started from (" (ImageNet-1k ...)")."""
    if not record:
        return ""
    if "weights" in record:  # published weights, not a run of ours (the ImageNet start)
        return f" ({record['weights']})"
    text = f"{record['steps']} steps" + (f" from {record['init']}" if record.get("init") else " from random initialisation")
    return f" ({text}{_lineage(record.get('init_pretraining'))})"


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


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def eval_results(results: dict[str, Any] | None) -> list[EvalResult]:
    """The model-index entries of ``results``: every numeric test-split metric, and the macro
    accuracy of ``modality="auto"`` when the results hold a modality-separation block."""
    entries = []
    for dataset, protocols in (results or {}).items():
        if dataset == SEPARATION:
            scores = protocols.get("auto routing", {})
            if "macro_accuracy" in scores:
                entries.append(EvalResult(task_type="image-classification", task_name="modality detection (modality='auto')",
                                          dataset_type="midol-hub-modality-test-splits", dataset_name=dataset,
                                          dataset_split="test", metric_type="accuracy", metric_name="macro accuracy",
                                          metric_value=float(scores["macro_accuracy"])))
            continue
        for protocol, metrics in protocols.items():
            if protocol == "sizes":
                continue
            for metric, value in metrics.items():
                if metric in METRIC_TYPES and isinstance(value, (int, float)):
                    # the Hub groups results by task and dataset, so the protocol goes into the metric's name
                    entries.append(EvalResult(task_type="image-classification", task_name="frozen-feature classification",
                                              dataset_type=_slug(dataset), dataset_name=dataset, dataset_split="test",
                                              metric_type=METRIC_TYPES[metric], metric_name=f"{protocol} {metric}",
                                              metric_value=float(value)))
    return entries


def evaluation_table(results: dict[str, Any] | str | Path | None) -> str:
    """Markdown tables of ``{dataset: {protocol: {metric: value}}}``, metrics as columns, and of
    the modality-separation block when present (``sizes`` entries are left out)."""
    results = _load_results(results)
    if not results:
        return "No evaluation results yet."
    separation = results.get(SEPARATION)
    results = {name: {p: m for p, m in protocols.items() if p != "sizes"} for name, protocols in results.items()
               if name != SEPARATION}
    metrics = sorted({m for protocols in results.values() for scores in protocols.values() for m in scores})
    lines = ["| dataset | protocol | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for dataset, protocols in results.items():
        for protocol, scores in protocols.items():
            cells = [f"{scores[m]:.3f}" if isinstance(scores.get(m), (int, float)) else "" for m in metrics]
            lines.append(f"| {dataset} | {protocol} | " + " | ".join(cells) + " |")
    if separation:
        lines += ["", separation_table(separation)]
    return "\n".join(lines)


def separation_table(separation: dict[str, Any]) -> str:
    """How ``modality="auto"`` answered on held-out images of known modality, on full-resolution
    test files, on out-of-scope images, and how well its confidence is calibrated."""
    scores, size = separation["auto routing"], separation["sizes"]["test"]
    lines = [f"`modality=\"auto\"` on {size} test-split images (NMI between modality and expert {scores['nmi']:.3f}):", ""]
    if "accuracy" not in scores:
        return "\n".join(lines + ["Uncalibrated: no expert is assigned to a modality yet."])
    full = separation.get("full resolution")
    header = "| modality | test splits: named correctly | called unknown |"
    lines += [header + (" full-resolution test files: named correctly | called unknown | files |" if full else ""),
              "|---|---|---|" + ("---|---|---|" if full else "")]
    for m, a in scores["accuracy"].items():
        row = f"| {m} | {a:.3f} | {scores['unknown_rate'][m]:.3f} |"
        if full:
            row += f" {full['accuracy'][m]:.3f} | {full['unknown_rate'][m]:.3f} | {full['images'][m]} |"
        lines.append(row)
    lines.append(f"| **macro** | **{scores['macro_accuracy']:.3f}** | |" + (f" **{full['macro_accuracy']:.3f}** | | |" if full else ""))
    if full and full["misses"]:
        lines += ["", "Full-resolution misses: " + ", ".join(f"{name} -> {said}" for name, said in full["misses"].items()) + "."]
    outside = separation.get("out of scope")
    if outside:
        wrong = [f"{name} -> {said}" for name, said in outside["answers"].items() if said != "unknown"]
        lines += ["", f"Out of scope ({outside['images']} real images that are none of the five modalities): "
                      f"{outside['unknown_rate']:.3f} called `unknown`" + (f"; given a modality: {', '.join(wrong)}." if wrong else ".")]
    confidence = separation.get("confidence")
    if confidence:
        auroc = "n/a" if confidence["auroc"] is None else f"{confidence['auroc']:.3f}"
        lines += ["", f"`confidence` as the probability that `modality` is right, over all {confidence['images']} images "
                      f"above: expected calibration error {confidence['ece']:.3f}, AUROC right vs wrong {auroc} "
                      f"(right {confidence['right']:.3f}, mean confidence {confidence['mean_confidence']:.3f})."]
    return "\n".join(lines)
