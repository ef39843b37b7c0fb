"""Run configuration: ``configs/defaults.yaml``, a small per-run YAML over it, then ``--set`` overrides."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import yaml

DEFAULTS = Path(__file__).parent / "configs" / "defaults.yaml"
FREE_FORM = {("model", "overrides")}  # dicts whose keys are not fixed by the defaults
RENAMED_VALUES = {("data", "balance"): {"roots": "tags", "batches": "tags_per_batch"}}
"""Old spellings that still load (with a FutureWarning): old name -> new name."""


class ConfigError(ValueError):
    """A config file or ``--set`` override that does not fit the defaults."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Defaults, merged with ``path`` (if given), then each ``key.sub=value`` override."""
    config = yaml.safe_load(DEFAULTS.read_text())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (see training/configs/)")
        merge(config, yaml.safe_load(path.read_text()) or {}, source=str(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=5e-4")
        set_key(config, key.strip(), yaml.safe_load(raw))
    return config


def merge(base: dict, update: dict, source: str, prefix: tuple[str, ...] = ()) -> None:
    for key, value in update.items():
        where = prefix + (key,)
        if prefix in FREE_FORM:
            base[key] = value
            continue
        if key not in base:
            raise ConfigError(f"{source}: unknown config key {'.'.join(where)!r}; valid keys here: {', '.join(base)}")
        if isinstance(base[key], dict) and where not in FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {'.'.join(where)} must be a mapping")
            merge(base[key], value, source, where)
        else:
            base[key] = _coerce(base[key], _renamed(value, where, source), where, source)


def _renamed(value: Any, where: tuple[str, ...], source: str) -> Any:
    new = RENAMED_VALUES.get(where, {}).get(value) if isinstance(value, str) else None
    if new is None:
        return value
    warnings.warn(f"{source}: {'.'.join(where)}={value} is now spelled {new}", FutureWarning, stacklevel=4)
    return new


def _coerce(default: Any, value: Any, where: tuple[str, ...], source: str) -> Any:
    """Keep the default's type: YAML reads '1e-3' as a string and 5 as an int where floats are meant."""
    if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{source}: {'.'.join(where)} must be a number, got {value!r}") from None
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, str):
        raise ConfigError(f"{source}: {'.'.join(where)} must be an integer, got {value!r}")
    return copy.deepcopy(value)


def set_key(config: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    update: Any = value
    for part in reversed(parts):
        update = {part: update}
    merge(config, update, source=f"--set {dotted}")


def save_config(config: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))


OBJECTIVE_OPTIONS = {"routing": ("objective", "routing"), "top_k": ("model", "top_k"), "gate_noise": ("model", "gate_noise"),
                     "teacher_train_mode": ("model", "teacher_train_mode"), "clip_mode": ("optim", "clip_mode"),
                     "sinkhorn_iters": ("objective", "sinkhorn_iters"), "init": ("model", "init"), "balance": ("data", "balance"),
                     "batch_norm": ("model", "batch_norm"), "layer_decay": ("optim", "layer_decay"),
                     "freeze_backbone_epochs": ("optim", "freeze_backbone_epochs"),
                     "head_norm_momentum": ("model", "head_norm_momentum"), "koleo_weight": ("objective", "koleo_weight"),
                     "preserve_start_weight": ("objective", "preserve_start_weight")}
"""The options in which a run may differ from the official M-IDoL objective, and where they live."""


def objective_options(config: dict[str, Any]) -> dict[str, Any]:
    """A run's values of :data:`OBJECTIVE_OPTIONS` (``init`` as the model's name, not a path; an
    option a run predates reads as its default)."""
    defaults = yaml.safe_load(DEFAULTS.read_text())
    values = {}
    for name, (section, key) in OBJECTIVE_OPTIONS.items():
        value = config[section].get(key, defaults[section][key])
        values[name] = RENAMED_VALUES.get((section, key), {}).get(value, value)  # old spellings read as today's
    values["init"] = Path(values["init"]).name if values["init"] else None
    return values


def official_options() -> dict[str, Any]:
    """The official code's values: those of ``defaults.yaml``, the one place they are written."""
    return objective_options(yaml.safe_load(DEFAULTS.read_text()))


def deviations_from_official(config: dict[str, Any]) -> dict[str, Any]:
    """The options of a run that differ from the official objective, with the run's values."""
    official = official_options()
    return {name: value for name, value in objective_options(config).items() if value != official[name]}
