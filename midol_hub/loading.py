"""``load_model``: one call from a registry name, a directory, a file or a Hub id to a model.

Weights are read from safetensors straight into a model built on the meta device, so
loading holds one copy of the weights, already on the requested device and dtype.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file

from .configuration_midol import MIDoLConfig
from .errors import ModelNotFoundError, WeightsMismatchError, WeightsNotAvailableError
from .modeling_midol import MIDoLModel
from .provenance import Provenance
from .registry import get_entry, list_models

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, "README.md"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_model(
    name_or_path: str | os.PathLike,
    *,
    pretrained: bool = True,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> MIDoLModel:
    """Load an M-IDoL model in eval mode.

    ``name_or_path`` is one of:
      * a registry name (``midol_hub.list_models()``), e.g. ``"midol-swin-base"``;
      * a directory holding ``config.json`` and ``model.safetensors`` (``save_pretrained`` output);
      * a ``.safetensors`` file with ``config.json`` beside it;
      * a Hub repo, ``"org/name"`` or ``"hf-hub:org/name@revision"``, fetched through the
        Hugging Face cache (``HF_HUB_OFFLINE=1`` and ``local_files_only=True`` read only the cache).

    ``pretrained=False`` builds the architecture with random weights (no download).
    ``device`` and ``dtype`` (e.g. ``torch.bfloat16`` or ``"bf16"``; default float32, whatever
    the storage precision) are applied while loading.
    """
    spec = os.fspath(name_or_path).strip()
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = parse_dtype(dtype)
    hub_kwargs = dict(cache_dir=cache_dir, local_files_only=local_files_only, token=token)

    if spec.startswith("hf-hub:"):
        repo_id, at_revision = _split_revision(spec[len("hf-hub:") :])
        return _load_hub(repo_id, revision or at_revision, pretrained, device, dtype, **hub_kwargs)

    entry = get_entry(spec)
    if entry is not None:
        if not pretrained:
            return _random(entry.make_config(), entry.name, device, dtype)
        if entry.embedded is not None:
            model = _load_local(entry.embedded_path(), pretrained, device, dtype)
            model.provenance.source, model.provenance.location = "embedded", entry.name
            return model
        if entry.hub_id is None:
            raise WeightsNotAvailableError(
                f"{entry.name!r} has no published weights yet. To get a model: convert an official "
                f"checkpoint (midol convert CHECKPOINT DIR), train one (python -m training.pretrain), or "
                f"use load_model({entry.name!r}, pretrained=False) for random weights."
            )
        return _load_hub(entry.hub_id, revision, pretrained, device, dtype, **hub_kwargs)

    path = Path(spec).expanduser()
    if path.exists():
        return _load_local(path, pretrained, device, dtype)
    if _REPO_ID.match(spec):
        return _load_hub(spec, revision, pretrained, device, dtype, **hub_kwargs)
    raise ModelNotFoundError(
        f"cannot find model {spec!r}: it is not a registry name ({', '.join(list_models())}), "
        f"not an existing file or directory, and not a Hub id of the form 'org/name'"
    )


def _load_local(path: Path, pretrained: bool, device: torch.device, dtype: torch.dtype | None) -> MIDoLModel:
    if path.is_dir():
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    elif path.suffix == ".safetensors":
        config_path, weights_path = path.parent / CONFIG_NAME, path
    else:
        raise ModelNotFoundError(
            f"{path} is neither a model directory nor a .safetensors file; to load an official .pth "
            "checkpoint, convert it first with: midol convert CHECKPOINT OUT_DIR"
        )
    config = _read_config(config_path, what=f"model at {path}")
    if not pretrained:
        return _random(config, str(path), device, dtype)
    if not weights_path.is_file():
        raise ModelNotFoundError(f"{path} has a config but no weights: expected {weights_path}")
    provenance = Provenance("local", str(path), config.preprocessing_hash(), weights_path=str(weights_path))
    return _build(config, weights_path, device, dtype, provenance)


def _load_hub(
    repo_id: str,
    revision: str | None,
    pretrained: bool,
    device: torch.device,
    dtype: torch.dtype | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool | None,
    token: str | bool | None,
) -> MIDoLModel:
    offline = bool(local_files_only) or hf_constants.HF_HUB_OFFLINE
    try:
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=bool(local_files_only),
                token=token,
                allow_patterns=HUB_FILES if pretrained else [CONFIG_NAME],
            )
        )
    except LocalEntryNotFoundError:
        where = cache_dir or hf_constants.HF_HUB_CACHE
        at = f"@{revision}" if revision else ""
        hint = (
            "it is not in the cache and downloads are off (HF_HUB_OFFLINE or local_files_only); "
            "fetch it once while online with `midol cache prefetch` or `hf download`"
            if offline
            else "it is not in the cache and the Hub could not be reached; check the network or HF_ENDPOINT"
        )
        raise ModelNotFoundError(f"cannot load {repo_id}{at} from the Hub cache at {where}: {hint}") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r} (a branch, tag or commit hash)") from None
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo_id} is gated: accept its terms on the Hub and pass token=...") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"Hub repo {repo_id!r} does not exist or is private (pass token=... for private repos)"
        ) from None
    except HFValidationError as error:
        raise ModelNotFoundError(f"{repo_id!r} is not a valid Hub repo id: {error}") from None
    config = _read_config(snapshot / CONFIG_NAME, what=f"Hub repo {repo_id}")
    if not pretrained:
        return _random(config, repo_id, device, dtype)
    weights_path = snapshot / WEIGHTS_NAME
    if not weights_path.is_file():
        raise ModelNotFoundError(f"Hub repo {repo_id} (commit {snapshot.name}) has no {WEIGHTS_NAME}")
    provenance = Provenance(
        "hub",
        repo_id,
        config.preprocessing_hash(),
        revision=revision,
        commit=snapshot.name,
        weights_path=str(weights_path),
    )
    return _build(config, weights_path, device, dtype, provenance)


def _read_config(config_path: Path, what: str) -> MIDoLConfig:
    if not config_path.is_file():
        raise ModelNotFoundError(f"{what} has no {CONFIG_NAME} (looked for {config_path})")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelNotFoundError(f"{config_path} is not valid JSON: {error}") from None
    if data.get("model_type") != MIDoLConfig.model_type:
        raise ModelNotFoundError(
            f"{config_path} describes a {data.get('model_type')!r} model, not an M-IDoL model (model_type 'midol')"
        )
    return MIDoLConfig.from_dict(data)


def _random(config: MIDoLConfig, location: str, device: torch.device, dtype: torch.dtype | None) -> MIDoLModel:
    warnings.warn(
        f"{location}: random weights (pretrained=False); embeddings and routing carry no meaning yet",
        UserWarning,
        stacklevel=3,
    )
    model = MIDoLModel(config).to(device=device, dtype=dtype).eval()
    model.provenance = Provenance("random", location, config.preprocessing_hash())
    return model


def _build(
    config: MIDoLConfig, weights_path: Path, device: torch.device, dtype: torch.dtype | None, provenance: Provenance
) -> MIDoLModel:
    """Build on the meta device and assign the weights: one copy in memory, no random init."""
    with torch.device("meta"):
        model = MIDoLModel(config)
    try:
        state = load_file(weights_path, device=str(device))
    except (SafetensorError, OSError) as error:
        raise WeightsMismatchError(
            f"{weights_path} is not a readable safetensors file ({error}); it may be truncated: "
            "delete it and download or save it again"
        ) from None
    _check_state(model, state, weights_path)
    target = dtype or torch.float32  # whatever the storage (fp16 ships smaller), compute in fp32 by default
    for key, tensor in state.items():
        if tensor.is_floating_point() and tensor.dtype != target:
            state[key] = tensor.to(target)
    model.load_state_dict(state, strict=True, assign=True)
    _materialise_buffers(model, device)
    model.provenance = provenance
    return model.eval()


def _check_state(model: MIDoLModel, state: dict[str, torch.Tensor], weights_path: Path) -> None:
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [
        f"{key}: file {tuple(state[key].shape)} vs config {expected[key]}"
        for key in sorted(set(expected) & set(state))
        if tuple(state[key].shape) != expected[key]
    ]
    if missing or unexpected or mis_shaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise WeightsMismatchError(
            f"{weights_path} does not match its config ({'; '.join(parts)}). Check that config.json "
            "belongs to these weights; official checkpoints need `midol convert` first."
        )


def _materialise_buffers(model: MIDoLModel, device: torch.device) -> None:
    """Give the non-persistent buffers left on the meta device real storage, then recompute them."""
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)
        if hasattr(module, "_init_buffers"):
            module._init_buffers()


def _split_revision(spec: str) -> tuple[str, str | None]:
    repo_id, _, revision = spec.partition("@")
    return repo_id, revision or None


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)} or a torch.dtype")
    return _DTYPES[key]
