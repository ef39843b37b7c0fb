"""``model.encode``: images of one modality -> embeddings in that modality's expert subspace."""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .detection import DICOM, FORCED, ROUTER, detect_modalities, stage_pooled
from .dtypes import parse_dtype
from .errors import ImageReadError, ModalityMismatchError, ModalityMismatchWarning, NonFiniteError
from .image_io import (
    RawImage,
    describe,
    frame_count,
    is_dicom_file,
    file_frames,
    read_any,
    select_frames,
    split_images,
)
from .modalities import AUTO, UNKNOWN, canonical_modality, dicom_modality
from .preprocessing import (
    Preprocessor,
    WarningCollector,
    check_preprocessed,
    iter_chunks,
)

if TYPE_CHECKING:
    from .modeling_midol import MIDoLModel

OUTPUTS = ("embedding", "pooled", "patch_tokens", "pyramid", "stage_pooled")
FRAME_CHOICES = ("all", "middle")


@dataclass
class Failure:
    """An input that ``errors="skip"`` left out."""

    index: int
    source: str
    error: str


@dataclass
class Encoding:
    """Result of :meth:`MIDoLModel.encode`, one row per image (per frame of a multi-frame input
    encoded with ``frames=``); tensors are float32 on the CPU.

    Attributes:
        embedding: (B, D) embedding in the expert subspace of each row's modality
            (L2-normalised unless ``normalize=False``).
        pooled: (B, D) the shared backbone feature.
        stage_pooled: (B, 15C) the backbone's stages (a Swin's four, EfficientNet-Lite0's five: 512)
            averaged over space, L2-normalised and concatenated (what the out-of-scope detector reads).
        routing: (B, E) router probabilities; ``experts[e]`` names expert ``e``'s modality.
        expert_index: (B,) the expert whose subspace ``embedding`` is in.
        modality: per row, the modality used: forced, stated by the DICOM header, or detected
            by the router (``"unknown"`` for images outside every calibrated modality).
        confidence: (B,) the probability that ``modality`` is right. From the router, a
            calibrated probability (see :mod:`midol_hub.detection`; for an uncalibrated model,
            the router's probability of its expert); 1 where a DICOM header decided; for a
            forced modality, the router's probability of that modality's expert.
        modality_source: per row, ``"forced"``, ``"dicom"`` or ``"router"``.
        unknown_reason: per row, why it is ``"unknown"`` (``None`` otherwise).
        indices: the input each row came from (differs from range(B) after skipped failures
            or expanded frames).
        frames: per row, the frame of its input (``None`` for a single-frame input).
        patch_tokens: (B, D, h, w) final-stage tokens, NCHW (h = w = S / 32 for Swin).
        pyramid: the backbone's stages, NCHW (a Swin's four: (B, C, S/4, S/4) ... (B, 8C, S/32, S/32)).
        failures: inputs skipped with ``errors="skip"``.
        provenance: where the model's weights came from, as a dict.

    Outputs that were not requested through ``output=`` raise AttributeError with the fix.
    """

    routing: torch.Tensor
    expert_index: torch.Tensor
    experts: tuple[str, ...]
    modality: list[str]
    confidence: torch.Tensor
    modality_source: list[str]
    unknown_reason: list[str | None]
    indices: list[int]
    frames: list[int | None]
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


@dataclass
class Plan:
    """How one row is encoded: the profile it is preprocessed with, its expert (-1: the router's
    choice) and, when not the router's, its modality, where that came from and why unknown."""

    profile: str
    expert: int
    source: str
    modality: str | None = None
    reason: str | None = None
    conflict: str | None = None  # a forced modality that the DICOM header contradicts


def plan_row(config: Any, forced: str | None, dicom_code: str | None) -> Plan:
    """The plan of a row: a forced modality wins (noting a contradicting header), then a DICOM
    header that names a modality or an out-of-scope code, then the router."""
    header = dicom_modality(dicom_code) if dicom_code else None
    if forced is not None:
        conflict = None
        if dicom_code and header is not None and header != forced:
            conflict = f"its DICOM header says Modality {dicom_code} ({header})"
        return Plan(forced, config.expert_for(forced), FORCED, forced, conflict=conflict)
    if header == UNKNOWN:
        return Plan(AUTO, -1, DICOM, UNKNOWN, f"DICOM Modality {dicom_code} is not one of the five")
    if header is not None and not config.backbone_only and (header in config.expert_modalities
                                                            or header in config.shared_experts):
        return Plan(header, config.expert_for(header), DICOM, header)
    return Plan(AUTO, -1, ROUTER)


def preprocess_planned(config: Any, raws: list[RawImage], plans: list[Plan], warn: WarningCollector) -> torch.Tensor:
    """The normalised batch of ``raws``, each with its plan's profile."""
    batch = torch.empty(len(raws), 3, config.img_size, config.img_size)
    for profile in dict.fromkeys(plan.profile for plan in plans):
        rows = [i for i, plan in enumerate(plans) if plan.profile == profile]
        batch[rows] = Preprocessor(config.profile(profile)).from_raw([raws[i] for i in rows], warn)
    return batch


def expand_frames(items: list, frames: str | int | None, errors: str, failures: list[Failure],
                  preprocessed: bool = False) -> list[tuple[Any, int, int | None]]:
    """(item, input index, frame) per row: multi-frame inputs expand as ``frames`` says; without
    ``frames`` they fail (naming ``frames=``) instead of being encoded by their first page."""
    check_frames(frames)
    rows = []
    for index, item in enumerate(items):
        try:
            source = describe(item, index)
            count = 1 if preprocessed else frame_count(item, source)
            rows += [(item, index, frame) for frame in select_frames(count, frames, source, is_dicom_file(item))]
        except ImageReadError as error:
            if errors == "raise":
                raise
            failures.append(Failure(index, error.source, error.reason))
    return rows


def check_frames(frames: str | int | None) -> None:
    if frames is not None and not (frames in FRAME_CHOICES or (isinstance(frames, int) and not isinstance(frames, bool))):
        raise ValueError(f"frames must be 'all', 'middle' or a frame index, got {frames!r}")


class _FrameReader:
    """Reads rows in order; the frames of one file come from one open file (see
    :func:`midol_hub.image_io.file_frames`), never by re-opening it for each frame."""

    def __init__(self, frames: str | int | None, warn: WarningCollector, input_size: int) -> None:
        self.frames, self.warn, self.input_size = frames, warn, input_size
        self.index: int | None = None
        self.pages: Iterator[RawImage] | None = None
        self.error: ImageReadError | None = None

    def read(self, item: Any, index: int, frame: int | None) -> RawImage:
        if frame is None or not isinstance(item, (str, os.PathLike)):
            return read_any(item, index, self.warn, frame, self.input_size)
        if index != self.index:
            self.index, self.pages, self.error = index, file_frames(Path(item), self.frames, input_size=self.input_size), None
        if self.error is not None:
            raise self.error
        try:
            return next(self.pages)
        except ImageReadError as error:
            self.error = error
            raise


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
    frames: str | int | None = None,
) -> Encoding:
    """Embed images with an M-IDoL model.

    Args:
        images: one image or a list: file paths (PNG, JPEG, TIFF, BMP, GIF, DICOM), PIL images,
            numpy arrays (uint8, uint16, float in [0, 1]) or torch tensors (CHW, or BCHW for
            a batch). A numpy array is read by its layout (see
            :func:`midol_hub.image_io.split_images`): 4-D is a batch, (N, H, W) a stack of
            grayscale images, (H, W, C) one image; (C, H, W) with C of 1, 3 or 4 raises as
            ambiguous. With ``preprocessed=True``: normalised tensors (B, 3, S, S) fed to the
            network as they are.
        modality: a modality name or alias, or ``"auto"``. A forced modality uses that expert
            and its preprocessing profile. ``"auto"`` follows a DICOM file's Modality tag where
            it names one of the five or an out-of-scope modality (see
            :data:`midol_hub.modalities.DICOM_MODALITIES`); elsewhere it preprocesses with the
            generic profile and takes the router's most probable expert, or ``"unknown"``.
        output: any of ``"embedding"``, ``"pooled"``, ``"patch_tokens"``, ``"pyramid"``,
            ``"stage_pooled"`` (default: the config's ``default_output``). Routing, modality and
            confidence always come back.
        batch_size: images per forward pass; results do not depend on it.
        normalize: L2-normalise ``embedding``.
        device, dtype: where and in which precision to run. ``encode`` never changes the model
            (others may share it): ``device`` must be where the model is (move it first with
            ``model.to``), and ``dtype`` may lower an fp32 model's precision through autocast
            (``"bf16"``, ``"fp16"``) but cannot raise a bf16/fp16 model's. ``"auto"`` is bf16
            where the device computes it natively, else the model's own precision.
        errors: ``"raise"`` stops at the first unreadable input, naming it; ``"skip"`` leaves
            it out and lists it in ``Encoding.failures``.
        strict_modality: raise instead of warning when a forced modality is contradicted by a
            DICOM header or by a calibrated router that is confident of another modality.
        channels_first: the layout of numpy arrays when their shape does not tell it: True for
            (C, H, W) / (N, C, H, W), False for (H, W, C) / (N, H, W, C).
        frames: for multi-frame DICOM, multi-page TIFF and animated images: ``"all"`` (one row
            per frame), ``"middle"`` or a frame index. Without it such an input is an error
            (never silently its first page); ``Encoding.indices`` and ``frames`` map rows back.
    """
    config, device_arg = model.config, device
    forced, requested = check_encode_args(config, modality, output, errors, batch_size)
    device = device_of(model)
    model_dtype = next(model.parameters()).dtype
    auto = isinstance(dtype, str) and dtype.strip().lower() == "auto"
    compute_dtype = model_dtype if auto and model_dtype != torch.float32 else parse_dtype(dtype, device)
    _check_placement(model, device, model_dtype, device_arg, compute_dtype)

    forward = torch_forward(model, device, model_dtype, compute_dtype)
    return encode_rows(config, model.provenance, forward, images, forced, requested, batch_size=batch_size,
                       normalize=normalize, progress=progress, errors=errors, strict_modality=strict_modality,
                       preprocessed=preprocessed, channels_first=channels_first, frames=frames)


@dataclass
class NetworkOutput:
    """What one forward pass of a backend (torch, onnxruntime) gives :func:`encode_rows`.

    ``embedding`` is each row's output in expert ``expert_index`` (the planned expert, or the
    router's argmax for -1); ``expert_embeddings(rows, experts)`` gives other experts' outputs
    for the rows that ``auto`` moves to the nearest calibrated modality."""

    pooled: torch.Tensor
    routing_logits: torch.Tensor
    embedding: torch.Tensor
    expert_index: torch.Tensor
    expert_embeddings: Callable[[list[int], torch.Tensor], torch.Tensor]
    stages: torch.Tensor | None = None
    patch_tokens: torch.Tensor | None = None
    pyramid: tuple[torch.Tensor, ...] | None = None


Forward = Callable[[torch.Tensor, torch.Tensor, frozenset, bool], NetworkOutput]
"""(pixels, planned experts, requested outputs, needs stage_pooled) -> :class:`NetworkOutput`."""


def torch_forward(model: MIDoLModel, device: torch.device, model_dtype: torch.dtype,
                  compute_dtype: torch.dtype | None) -> Forward:
    """The :data:`Forward` of a torch model: inference mode, autocast to ``compute_dtype``."""

    def forward(pixels: torch.Tensor, experts: torch.Tensor, requested: frozenset, stages: bool) -> NetworkOutput:
        with torch.inference_mode(), _autocast(device, compute_dtype, model_dtype):
            out = model(pixels.to(device=device, dtype=model_dtype, non_blocking=True),
                        expert_index=experts.to(device), output_patch_tokens="patch_tokens" in requested,
                        output_pyramid="pyramid" in requested or stages)

            pooled_stages = stage_pooled(out.pyramid) if stages else None

        def expert_embeddings(rows: list[int], chosen: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), _autocast(device, compute_dtype, model_dtype):
                every = model.head.expert_outputs(out.pooled[rows])
            return every[torch.arange(len(rows)), chosen.to(every.device)]

        return NetworkOutput(out.pooled, out.routing_logits, out.embedding, out.expert_index, expert_embeddings,
                             pooled_stages, out.patch_tokens, out.pyramid)

    return forward


def check_encode_args(config: Any, modality: str, output: str | Sequence[str] | None, errors: str,
                      batch_size: int) -> tuple[str | None, tuple[str, ...]]:
    """The forced modality (None for auto) and the outputs of an encode call, or a clear error
    before any image is read."""
    requested = _requested_outputs(output, config.default_output)
    if config.backbone_only and "embedding" in requested:
        raise ValueError(
            "this model was converted backbone-only: its experts are untrained, so it has no expert embeddings; "
            "use output='pooled' (the default for it)"
        )
    modality = canonical_modality(modality, allow_auto=True)
    forced = None if modality == AUTO else modality
    if forced is not None:
        config.expert_for(forced)  # a model without that expert fails here
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return forced, requested


def encode_rows(config: Any, provenance: Any, forward: Forward, images: Any, forced: str | None,
                requested: Sequence[str], *, batch_size: int = 32, normalize: bool = True, progress: bool = False,
                errors: str = "raise", strict_modality: bool = False, preprocessed: bool = False,
                channels_first: bool | None = None, frames: str | int | None = None) -> Encoding:
    """The body of :func:`encode` for any backend: read, plan, preprocess and run ``images`` in
    chunks, then name each row's modality (arguments already checked by the caller)."""
    collector = WarningCollector()
    failures: list[Failure] = []
    items = _as_items(images, preprocessed, config.img_size, channels_first)
    rows = expand_frames(items, frames, errors, failures, preprocessed)
    reader = _FrameReader(frames, collector, config.img_size)
    parts: list[Encoding] = []
    names: list[str] = []
    conflicts: list[tuple[str, str]] = []
    with _progress(len(rows), progress) as progress_bar:
        for _, chunk in iter_chunks(rows, batch_size):
            batch, plans, kept = _prepare(chunk, config, forced, preprocessed, errors, reader, failures)
            progress_bar.update(len(chunk))
            if not kept:
                continue
            part = run_planned(config, forward, batch, plans, requested, normalize,
                               [index for _, index, _ in kept], [frame for _, _, frame in kept])
            bad = nonfinite_rows(part, requested, config)
            if bad:
                item, index, _ = kept[bad[0]]
                raise NonFiniteError(f"{describe(item, index)}: the model's output is not finite (NaN or Inf) for "
                                     f"{len(bad)} of {len(kept)} row(s) of this batch; the weights are damaged: "
                                     "download, convert or train them again")
            parts.append(part)
            names += [describe(item, index) for item, index, _ in kept]
            conflicts += [(describe(item, index), plan.conflict) for (item, index, _), plan in zip(kept, plans) if plan.conflict]
    collector.emit(stacklevel=5)
    if failures:
        warnings.warn(
            f"skipped {len(failures)} of {len(items)} input(s) that could not be read, first: "
            f"{failures[0].source}: {failures[0].error}",
            UserWarning,
            stacklevel=4,
        )
    result = concat_encodings(parts, config, requested, provenance)
    result.failures = failures
    if forced is not None:
        _guard_modality(result, names, conflicts, config, strict_modality)
    return result


def nonfinite_rows(encoding: Encoding, requested: Sequence[str], config: Any) -> list[int]:
    """Rows of ``encoding`` whose requested outputs or routing hold NaN or Inf (a backbone-only
    model reports NaN routing by design)."""
    finite = torch.ones(len(encoding), dtype=torch.bool)
    if not config.backbone_only:
        finite &= torch.isfinite(encoding.routing).all(dim=1)
    for name in requested:
        value = encoding.outputs[name]
        for tensor in (value if isinstance(value, (list, tuple)) else [value]):
            finite &= torch.isfinite(tensor.flatten(1)).all(dim=1)
    return (~finite).nonzero().flatten().tolist()


def encode_planned(model: MIDoLModel, batch: torch.Tensor, plans: list[Plan], requested: Sequence[str],
                   indices: list[int], frames: list[int | None], normalize: bool = True,
                   dtype: torch.dtype | None = None) -> Encoding:
    """Encode an already-preprocessed batch whose rows were planned with :func:`plan_row` (the
    path of ``midol encode``, whose workers read and preprocess)."""
    forward = torch_forward(model, device_of(model), next(model.parameters()).dtype, dtype)
    part = run_planned(model.config, forward, batch, plans, requested, normalize, indices, frames)
    return concat_encodings([part], model.config, requested, model.provenance)


@torch.inference_mode()
def run_planned(config: Any, forward: Forward, pixels: torch.Tensor, plans: list[Plan], requested: Sequence[str],
                normalize: bool, indices: list[int], frames: list[int | None]) -> Encoding:
    """One forward pass over planned rows, and each row's modality, confidence, source and reason."""
    routed = [i for i, plan in enumerate(plans) if plan.source == ROUTER]
    detect = bool(routed) and bool((config.modality_calibration or {}).get("out_of_scope"))
    out = forward(pixels, torch.tensor([plan.expert for plan in plans]), frozenset(requested),
                  detect or "stage_pooled" in requested)
    routing = out.routing_logits.float().softmax(dim=-1).cpu()
    expert_index = out.expert_index.cpu()
    stages = out.stages.cpu() if out.stages is not None else None
    modality = [plan.modality for plan in plans]
    source = [plan.source for plan in plans]
    reason = [plan.reason for plan in plans]
    confidence = torch.ones(len(plans))
    for row, plan in enumerate(plans):
        if plan.source == FORCED:
            confidence[row] = routing[row, plan.expert]
    embedding = out.embedding
    if routed:
        decided = detect_modalities(config, out.routing_logits[routed], stages[routed] if detect else None)
        for position, row in enumerate(routed):
            modality[row], reason[row] = decided.modality[position], decided.reason[position]
            confidence[row] = decided.confidence[position]
        moved = [(row, e) for row, e in zip(routed, decided.expert) if e >= 0 and e != int(expert_index[row])]
        if moved:  # auto named another modality than the router's argmax: that modality's expert subspace
            rows, experts = [r for r, _ in moved], torch.tensor([e for _, e in moved])
            embedding = embedding.clone()
            embedding[rows] = out.expert_embeddings(rows, experts).to(embedding.dtype)
            expert_index[rows] = experts
    outputs: dict[str, Any] = {}
    if "embedding" in requested:
        embedding = embedding.float()
        outputs["embedding"] = (F.normalize(embedding, dim=-1) if normalize else embedding).cpu()
    if "pooled" in requested:
        outputs["pooled"] = out.pooled.float().cpu()
    if "stage_pooled" in requested:
        outputs["stage_pooled"] = stages.cpu()
    if "patch_tokens" in requested:
        outputs["patch_tokens"] = out.patch_tokens.float().cpu()
    if "pyramid" in requested:
        outputs["pyramid"] = [stage.float().cpu() for stage in out.pyramid]
    return Encoding(routing, expert_index, tuple(config.expert_modalities), modality, confidence, source, reason,
                    list(indices), list(frames), {}, outputs=outputs)


def concat_encodings(parts: list[Encoding], config: Any, requested: Sequence[str], provenance: Any) -> Encoding:
    """One :class:`Encoding` of the rows of ``parts``, in order."""
    routing = torch.cat([p.routing for p in parts]) if parts else torch.empty(0, config.num_experts)
    if config.backbone_only:
        routing = torch.full_like(routing, float("nan"))  # an untrained router has no opinion to report
    outputs: dict[str, Any] = {}
    for name in requested:
        chunks = [p.outputs[name] for p in parts]
        if name == "pyramid":
            outputs[name] = tuple(torch.cat(stage) for stage in zip(*chunks)) if chunks else tuple()
        else:
            outputs[name] = torch.cat(chunks) if chunks else torch.empty(0, config.num_features)
    return Encoding(
        routing=routing,
        expert_index=torch.cat([p.expert_index for p in parts]) if parts else torch.empty(0, dtype=torch.long),
        experts=tuple(config.expert_modalities),
        modality=[m for p in parts for m in p.modality],
        confidence=torch.cat([p.confidence for p in parts]) if parts else torch.empty(0),
        modality_source=[s for p in parts for s in p.modality_source],
        unknown_reason=[r for p in parts for r in p.unknown_reason],
        indices=[i for p in parts for i in p.indices],
        frames=[f for p in parts for f in p.frames],
        provenance=provenance.to_dict() if provenance is not None else {},
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


def _prepare(chunk: list, config: Any, forced: str | None, preprocessed: bool, errors: str,
             reader: _FrameReader, failures: list[Failure]) -> tuple[torch.Tensor | None, list[Plan], list]:
    """Read, plan and preprocess one chunk of rows; with errors='skip', bad inputs are recorded and left out."""
    tensors, raws, kept = [], [], []
    for item, index, frame in chunk:
        try:
            if preprocessed:
                tensors.append(check_preprocessed(item, config.img_size, describe(item, index))[0])
            else:
                raws.append(reader.read(item, index, frame))
            kept.append((item, index, frame))
        except ImageReadError as error:
            if errors == "raise":
                raise
            failures.append(Failure(index, error.source, error.reason))
    if not kept:
        return None, [], kept
    if preprocessed:
        plans = [plan_row(config, forced, None) for _ in tensors]
        return torch.stack(tensors), plans, kept
    plans = [plan_row(config, forced, raw.dicom_modality) for raw in raws]
    return preprocess_planned(config, raws, plans, reader.warn), plans, kept


def _guard_modality(result: Encoding, names: list[str], conflicts: list[tuple[str, str]], config: Any,
                    strict: bool) -> None:
    """Warn (or raise) when a forced modality is contradicted by DICOM headers or by a calibrated
    router that is confident the images are another modality."""
    messages = []
    if conflicts:
        name, text = conflicts[0]
        messages.append(f"{len(conflicts)} image(s) encoded as {result.modality[0]!r} contradict their DICOM header, "
                        f"first: {name}: {text}; check the modality, or use modality='auto'")
    if config.modality_calibration is not None and len(result):
        top_p, top_i = result.routing.max(dim=-1)
        confident_other = (top_i != result.expert_index) & (top_p >= config.mismatch_threshold)
        if bool(confident_other.any()):
            rows = confident_other.nonzero().flatten().tolist()
            first = rows[0]
            messages.append(
                f"{len(rows)} image(s) encoded as {result.modality[first]!r} look like another modality to the router, "
                f"first: {names[first]} -> {result.experts[int(top_i[first])]!r} (p={float(top_p[first]):.2f}); "
                "check the modality, or use modality='auto'"
            )
    for message in messages:
        if strict:
            raise ModalityMismatchError(message)
        warnings.warn(message, ModalityMismatchWarning, stacklevel=5)


def device_of(model: torch.nn.Module) -> torch.device:
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
