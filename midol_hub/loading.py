"""``load_model``: one call from a registry name, a directory, a file or a Hub id to a model.

Every path ends in :meth:`MIDoLModel.from_pretrained` (transformers' loader, which builds the
model on the meta device and reads safetensors into it, so loading holds about one copy of
the weights), with the same checks and provenance whichever way the model was named.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from .dtypes import parse_dtype
from .errors import ModelNotFoundError, WeightsMismatchError, WeightsNotAvailableError
from .modeling_midol import MIDoLModel
from .provenance import Provenance
from .registry import get_entry, list_models

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, "preprocessor_config.json", "README.md"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' per-tensor loading bar: ``load_model`` is one quick call."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


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
    the storage precision; ``"auto"``: bf16 where ``device`` computes it natively, else float32)
    are applied while loading.
    """
    spec = os.fspath(name_or_path).strip()
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = parse_dtype(dtype, device)
    hub_kwargs = dict(cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    with _quiet_transformers():
        return _resolve_and_load(spec, pretrained, revision, device, dtype, hub_kwargs)


def _resolve_and_load(spec: str, pretrained: bool, revision: str | None, device: torch.device, dtype: torch.dtype | None,
                      hub_kwargs: dict) -> MIDoLModel:

    if spec.startswith("hf-hub:"):
        repo_id, at_revision = _split_revision(spec[len("hf-hub:") :])
        return _load_hub(repo_id, revision or at_revision, pretrained, device, dtype, **hub_kwargs)

    entry = get_entry(spec)
    path = Path(spec).expanduser()
    if path.exists():  # a local path wins, as in transformers
        if entry is not None:
            warnings.warn(
                f"{spec!r} is both a local path ({path.resolve()}) and a registry model; loading the local path "
                f"(to load the registry model, run from another directory or rename the local copy)",
                UserWarning,
                stacklevel=3,
            )
        return _load_local(path, pretrained, device, dtype)
    if entry is not None:
        if not pretrained:
            return _random(entry.make_config(), entry.name, device, dtype)
        if entry.embedded is not None:
            model = _load_local(entry.embedded_path(), pretrained, device, dtype)
            model.provenance = dataclasses.replace(model.provenance, source="embedded", location=entry.name)
            return model
        if entry.hub_id is None:
            raise WeightsNotAvailableError(f"{entry.name!r} has no published weights yet. To get a model: "
                                           f"{entry.how_to_get_weights()}.")
        return _load_hub(entry.hub_id, revision, pretrained, device, dtype, **hub_kwargs)

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
    if weights_path.name == WEIGHTS_NAME:
        return MIDoLModel.from_pretrained(weights_path.parent, dtype=dtype).to(device)
    # a safetensors file of another name: the same loader, given the tensors
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise WeightsMismatchError(
            f"{weights_path} is not a readable safetensors file ({error}); it may be truncated: "
            "delete it and download or save it again"
        ) from None
    model = MIDoLModel.from_pretrained(None, config=config, state_dict=state, dtype=dtype).to(device)
    model.provenance = Provenance.of_file("local", str(path), config.preprocessing_hash(), weights_path)
    return model


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
    model = MIDoLModel.from_pretrained(snapshot, dtype=dtype).to(device)
    model.provenance = Provenance.of_file("hub", repo_id, config.preprocessing_hash(), weights_path, revision, snapshot.name)
    return model


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
        stacklevel=4,
    )
    model = MIDoLModel(config).to(device=device, dtype=dtype).eval()
    model.provenance = Provenance("random", location, config.preprocessing_hash())
    return model


def _split_revision(spec: str) -> tuple[str, str | None]:
    repo_id, _, revision = spec.partition("@")
    return repo_id, revision or None
