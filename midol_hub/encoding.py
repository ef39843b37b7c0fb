"""``model.encode``: images of one modality -> embeddings in that modality's expert subspace."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from .calibration import detect_modalities
from .errors import ImageReadError, ModalityMismatchError, ModalityMismatchWarning
from .image_io import describe, read_any, split_images
from .dtypes import parse_dtype
from .modalities import AUTO, canonical_modality
from .preprocessing import Preprocessor, WarningCollector, check_preprocessed, iter_chunks

if TYPE_CHECKING:
    from .modeling_midol import MIDoLModel

OUTPUTS = ("embedding", "pooled", "patch_tokens", "pyramid")


@dataclass
class Failure:
    """An input that ``errors="skip"`` left out."""

    index: int
    source: str
    error: str


@dataclass
class Encoding:
    """Result of :meth:`MIDoLModel.encode`; tensors are float32 on the CPU.

    Attributes:
        embedding: (B, D) embedding in the expert subspace of each image's modality
            (L2-normalised unless ``normalize=False``).
        pooled: (B, D) the shared backbone feature.
        routing: (B, E) router probabilities; ``experts[e]`` names expert ``e``'s modality.
        expert_index: (B,) the expert whose subspace ``embedding`` is in.
        modality: per image, the modality used (forced) or detected (``"auto"``); a calibrated
            model detects ``"unknown"`` for images outside all of its modalities.
        patch_tokens: (B, D, h, w) final-stage tokens, NCHW (h = w = S / 32 for Swin).
        pyramid: the four Swin stages, NCHW: (B, C, S/4, S/4) ... (B, 8C, S/32, S/32).
        indices: position in the input of each row (differs from range(B) after skipped failures).
        failures: inputs skipped with ``errors="skip"``.
        provenance: where the model's weights came from, as a dict.

    Outputs that were not requested through ``output=`` raise AttributeError with the fix.
    """

    routing: torch.Tensor
    expert_index: torch.Tensor
    experts: tuple[str, ...]
    modality: list[str]
    indices: list[int]
    provenance: dict[str, Any]
    failures: list[Failure] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getattr__(self, name: str) -> Any:
        if name in OUTPUTS:
            outputs = self.__dict__.get("outputs", {})
            if name in outputs:
                return outputs[name]
            raise AttributeError(
                f"'{name}' was not requested; call encode(..., output=({', '.join(repr(o) for o in (*outputs, name))}))"
            )
        raise AttributeError(name)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def confidence(self) -> torch.Tensor:
        """(B,) router probability of the chosen modality's expert."""
        return self.routing.gather(1, self.expert_index.view(-1, 1)).squeeze(1)


def encode(
    model: MIDoLModel,
    images: Any,
    modality: str = AUTO,
    *,
    output: str | Sequence[str] | None = None,
    batch_size: int = 32,
    normalize: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = False,
    errors: str = "raise",
    strict_modality: bool = False,
    preprocessed: bool = False,
    channels_first: bool | None = None,
) -> Encoding:
    """Embed images with an M-IDoL model.

    Args:
        images: one image or a list: file paths (PNG, JPEG, TIFF, BMP, DICOM), PIL images,
            numpy arrays (uint8, uint16, float in [0, 1]) or torch tensors (CHW, or BCHW for
            a batch). A numpy array is read by its layout (see
            :func:`midol_hub.image_io.split_images`): 4-D is a batch, (N, H, W) a stack of
            grayscale images, (H, W, C) one image; (C, H, W) with C of 1, 3 or 4 raises as
            ambiguous. With ``preprocessed=True``: normalised tensors (B, 3, S, S) fed to the
            network as they are.
        modality: a modality name or alias, or ``"auto"`` to let the router choose.
            A forced modality uses that expert and its preprocessing profile; ``"auto"``
            preprocesses with the generic profile and takes the router's most probable expert.
        output: any of ``"embedding"``, ``"pooled"``, ``"patch_tokens"``, ``"pyramid"``
            (default: the config's ``default_output``). Routing and modality always come back.
        batch_size: images per forward pass; results do not depend on it.
        normalize: L2-normalise ``embedding``.
        device, dtype: where and in which precision to run. ``encode`` never changes the model
            (others may share it): ``device`` must be where the model is (move it first with
            ``model.to``), and ``dtype`` may lower an fp32 model's precision through autocast
            (``"bf16"``, ``"fp16"``) but cannot raise a bf16/fp16 model's.
        errors: ``"raise"`` stops at the first unreadable input, naming it; ``"skip"`` leaves
            it out and lists it in ``Encoding.failures``.
        strict_modality: raise instead of warning when a calibrated router is confident that
            an image belongs to another modality than the one requested.
        channels_first: the layout of numpy arrays when their shape does not tell it: True for
            (C, H, W) / (N, C, H, W), False for (H, W, C) / (N, H, W, C).
    """
    config, device_arg = model.config, device
    requested = _requested_outputs(output, config.default_output)
    if config.backbone_only and "embedding" in requested:
        raise ValueError(
            "this model was converted backbone-only: its experts are untrained, so it has no expert embeddings; "
            "use output='pooled' (the default for it)"
        )
    modality = canonical_modality(modality, allow_auto=True)
    forced_expert = None if modality == AUTO else config.expert_for(modality)
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    compute_dtype = parse_dtype(dtype)
    device = _device_of(model)
    model_dtype = next(model.parameters()).dtype
    _check_placement(model, device, model_dtype, device_arg, compute_dtype)

    items = _as_items(images, preprocessed, config.img_size, channels_first)
    preprocessor = Preprocessor(config.profile(modality))
    collector = WarningCollector()
    failures: list[Failure] = []
    kept: list[int] = []
    chunks: dict[str, list] = {"routing": [], "expert": [], "modality": [], **{name: [] for name in requested}}

    with _progress(len(items), progress) as progress_bar, torch.inference_mode(), _autocast(
        device, compute_dtype, model_dtype
    ):
        for start, chunk in iter_chunks(items, batch_size):
            batch, ok = _prepare(chunk, start, preprocessor, preprocessed, errors, collector, failures, config.img_size)
            progress_bar.update(len(chunk))
            if not ok:
                continue
            kept.extend(ok)
            pixels = batch.to(device=device, dtype=model_dtype, non_blocking=True)
            expert_index = None
            if forced_expert is not None:
                expert_index = torch.full((pixels.shape[0],), forced_expert, dtype=torch.long, device=device)
            out = model(
                pixels,
                expert_index=expert_index,
                output_patch_tokens="patch_tokens" in requested,
                output_pyramid="pyramid" in requested,
            )
            chunks["routing"].append(out.routing_logits.float().softmax(dim=-1).cpu())
            chunks["expert"].append(out.expert_index.cpu())
            if forced_expert is None:
                chunks["modality"] += detect_modalities(config, out.expert_index, out.pooled)
            if "embedding" in requested:
                embedding = out.embedding.float()
                chunks["embedding"].append((F.normalize(embedding, dim=-1) if normalize else embedding).cpu())
            if "pooled" in requested:
                chunks["pooled"].append(out.pooled.float().cpu())
            if "patch_tokens" in requested:
                chunks["patch_tokens"].append(out.patch_tokens.float().cpu())
            if "pyramid" in requested:
                chunks["pyramid"].append([stage.float().cpu() for stage in out.pyramid])
    collector.emit(stacklevel=4)

    if failures:
        warnings.warn(
            f"skipped {len(failures)} of {len(items)} input(s) that could not be read, first: "
            f"{failures[0].source}: {failures[0].error}",
            UserWarning,
            stacklevel=3,
        )
    num_experts = config.num_experts
    routing = torch.cat(chunks["routing"]) if kept else torch.empty(0, num_experts)
    if config.backbone_only:
        routing = torch.full_like(routing, float("nan"))  # an untrained router has no opinion to report
    expert_index = torch.cat(chunks["expert"]) if kept else torch.empty(0, dtype=torch.long)
    experts = tuple(config.expert_modalities)
    if forced_expert is not None:
        _guard_modality(routing, forced_expert, experts, kept, items, config, strict_modality)
    outputs = {name: _concat(chunks[name], name, config, kept) for name in requested}
    provenance = model.provenance.to_dict() if model.provenance is not None else {}
    return Encoding(
        routing=routing,
        expert_index=expert_index,
        experts=experts,
        modality=[modality] * len(kept) if forced_expert is not None else chunks["modality"],
        indices=kept,
        provenance=provenance,
        failures=failures,
        outputs=outputs,
    )


def _requested_outputs(output: str | Sequence[str] | None, default: Sequence[str]) -> tuple[str, ...]:
    names = (output,) if isinstance(output, str) else tuple(output or default)
    unknown = [name for name in names if name not in OUTPUTS]
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; choose from {', '.join(OUTPUTS)}")
    return names


def _as_items(images: Any, preprocessed: bool, size: int, channels_first: bool | None) -> list:
    """Flatten the input into a list of single images (or single preprocessed tensors)."""
    if preprocessed and isinstance(images, torch.Tensor) and images.ndim not in (3, 4):
        check_preprocessed(images, size)
    return split_images(images, channels_first)


def _prepare(
    chunk: list,
    start: int,
    preprocessor: Preprocessor,
    preprocessed: bool,
    errors: str,
    collector: WarningCollector,
    failures: list[Failure],
    size: int,
) -> tuple[torch.Tensor | None, list[int]]:
    """Read and preprocess one chunk; with errors='skip', bad inputs are recorded and left out."""
    tensors, raws, ok = [], [], []
    for offset, item in enumerate(chunk):
        index = start + offset
        try:
            if preprocessed:
                tensors.append(check_preprocessed(item, size, describe(item, index))[0])
            else:
                raws.append(read_any(item, index, collector))
            ok.append(index)
        except ImageReadError as error:
            if errors == "raise":
                raise
            failures.append(Failure(index, error.source, error.reason))
    if not ok:
        return None, ok
    batch = torch.stack(tensors) if preprocessed else preprocessor.from_raw(raws, collector)
    return batch, ok


def _guard_modality(
    routing: torch.Tensor,
    forced_expert: int,
    experts: tuple[str, ...],
    kept: list[int],
    items: list,
    config: Any,
    strict: bool,
) -> None:
    """Warn (or raise) when a calibrated router is confident the images are another modality."""
    if config.modality_calibration is None or routing.numel() == 0:
        return
    top_p, top_i = routing.max(dim=-1)
    confident_other = (top_i != forced_expert) & (top_p >= config.mismatch_threshold)
    if not bool(confident_other.any()):
        return
    rows = confident_other.nonzero().flatten().tolist()
    first = rows[0]
    message = (
        f"{len(rows)} image(s) encoded as {experts[forced_expert]!r} look like another modality to the router, "
        f"first: {describe(items[kept[first]], kept[first])} -> {experts[int(top_i[first])]!r} "
        f"(p={float(top_p[first]):.2f}); check the modality, or use modality='auto'"
    )
    if strict:
        raise ModalityMismatchError(message)
    warnings.warn(message, ModalityMismatchWarning, stacklevel=4)


def _concat(parts: list, name: str, config: Any, kept: list[int]) -> Any:
    if name == "pyramid":
        if not kept:
            return tuple()
        return tuple(torch.cat(stage) for stage in zip(*parts))
    if not kept:
        return torch.empty(0, config.num_features)
    return torch.cat(parts)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


_WARNED_TRAIN_MODE: weakref.WeakSet = weakref.WeakSet()


def _check_placement(model: torch.nn.Module, device: torch.device, model_dtype: torch.dtype,
                     device_arg: str | torch.device | None, compute: torch.dtype | None) -> None:
    """Refuse what encode cannot do without changing the model; warn once about train mode."""
    if device_arg is not None:
        wanted = torch.device(device_arg)
        if wanted.type != device.type or (wanted.index is not None and wanted.index != (device.index or 0)):
            raise ValueError(
                f"the model is on {device} but encode(device={str(device_arg)!r}) was asked; encode never moves a model "
                f"(other code may share it): move it first with model.to({str(device_arg)!r}), or load it there with "
                f"load_model(..., device={str(device_arg)!r})"
            )
    if compute is not None and model_dtype != torch.float32 and compute != model_dtype:
        raise ValueError(
            f"the model holds {str(model_dtype).removeprefix('torch.')} weights, so encode(dtype={str(compute).removeprefix('torch.')!r}) "
            "cannot run in that precision; load the model in float32 (load_model(..., dtype='fp32')) or leave dtype unset"
        )
    if model.training and model not in _WARNED_TRAIN_MODE:
        _WARNED_TRAIN_MODE.add(model)
        warnings.warn(
            "the model is in training mode (stochastic depth and gate noise are on), so embeddings vary from call to "
            "call; call model.eval() before encoding",
            UserWarning,
            stacklevel=4,
        )


def _autocast(device: torch.device, compute: torch.dtype | None, model_dtype: torch.dtype):
    if compute is None or compute == model_dtype or compute == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="img", desc="encode")
