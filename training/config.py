"""Run configuration: ``configs/defaults.yaml``, a small per-run YAML over it, then ``--set`` overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

DEFAULTS = Path(__file__).parent / "configs" / "defaults.yaml"
FREE_FORM = {("model", "overrides")}  # dicts whose keys are not fixed by the defaults


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
            base[key] = _coerce(base[key], value, where, source)


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
