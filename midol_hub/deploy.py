"""Deploy through ONNX: :func:`export_onnx` writes a verified ``.onnx`` file and a sidecar JSON
(config with preprocessing profiles and calibration, provenance, output names), and
:class:`OnnxEncoder` runs it with onnxruntime behind the same ``encode`` as the torch model.

The graph has one input, ``pixel_values`` (B, 3, S, S) float32 with a dynamic batch, and the
outputs ``pooled`` (B, D), ``routing_logits`` (B, E), ``stage_pooled`` (B, 15C: what the
out-of-scope detector reads) and either ``expert_embeddings`` (B, E, D) or, for a modality fixed
at export, ``embedding`` (B, D); embeddings are un-normalised, as ``encode(normalize=False)``.

Export uses the dynamo exporter. timm's Swin calls ``scaled_dot_product_attention``, whose
decomposition leaves a strided output that the window-attention reshape cannot view; the
exported copy therefore runs timm's explicit attention (the same arithmetic, the path
``fused_attention=False`` selects), which exports cleanly. The user's model is never changed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .configuration_midol import MIDoLConfig
from .detection import stage_pooled
from .encoding import Encoding, NetworkOutput, check_encode_args, encode_rows
from .modalities import canonical_modality
from .modeling_midol import MIDoLModel
from .provenance import Provenance
from .utils import atomic_write, file_sha256, read_json_file

SIDECAR_FORMAT = "midol-onnx"
SIDECAR_VERSION = 1
ONNX_OUTPUTS = ("embedding", "pooled", "stage_pooled")
"""The ``encode`` outputs an :class:`OnnxEncoder` gives (the graph has no patch tokens or pyramid)."""
PARITY_TOLERANCE = 1e-4


def sidecar_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.midol.json``: where the export's metadata lives."""
    return Path(onnx_path).with_suffix(".midol.json")


class _ExportGraph(nn.Module):
    """The traced computation: backbone stages -> pooled, routing logits, stage_pooled, expert output(s)."""

    def __init__(self, model: MIDoLModel, expert: int | None) -> None:
        super().__init__()
        self.model, self.expert = model, expert

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        final, pyramid = self.model.backbone.forward_intermediates(pixel_values, output_fmt="NCHW")
        pooled = self.model.backbone.forward_head(final, pre_logits=True)
        outputs = (pooled, self.model.head.route(pooled), stage_pooled(pyramid))
        if self.model.config.backbone_only:
            return outputs
        experts = self.model.head.expert_outputs(pooled)
        return (*outputs, experts if self.expert is None else experts[:, self.expert])


def _output_names(config: MIDoLConfig, expert: int | None) -> list[str]:
    names = ["pooled", "routing_logits", "stage_pooled"]
    if not config.backbone_only:
        names.append("expert_embeddings" if expert is None else "embedding")
    return names


def export_onnx(model: MIDoLModel, path: str | Path, modality: str | None = None, opset: int | None = None) -> Path:
    """Export ``model`` to ``path`` (``.onnx``) with its sidecar ``.midol.json``, and check the file
    under onnxruntime against torch on a batch of 3 (every output within 1e-4), so a file that
    would give other numbers is never left behind.

    Args:
        modality: fix one modality's expert at export: the graph outputs ``embedding`` instead
            of every expert's, and the :class:`OnnxEncoder` of it encodes only that modality.
        opset: ONNX opset (default: the exporter's).
    """
    if not isinstance(model, MIDoLModel):
        raise TypeError(f"export_onnx needs a MIDoLModel (from load_model), got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: the export file must end in .onnx")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such folder for the export")
    config = model.config
    expert = None
    if modality is not None:
        if config.backbone_only:
            raise ValueError("a backbone-only model has no trained experts to fix a modality to; export without modality")
        modality = canonical_modality(modality)
        expert = config.expert_for(modality)
    # a float32 CPU copy in eval mode with timm's explicit attention: the user's model stays as it was
    exported = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    for module in exported.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    graph = _ExportGraph(exported, expert).eval()
    example = torch.randn(3, 3, config.img_size, config.img_size, generator=torch.Generator().manual_seed(0))
    names = _output_names(config, expert)
    with atomic_write(path) as tmp:
        torch.onnx.export(graph, (example,), tmp, dynamo=True, external_data=False, opset_version=opset, verbose=False,
                          input_names=["pixel_values"], output_names=names,
                          dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1)}})
        _check_parity(tmp, graph, example, names)
        sidecar = {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "onnx_file": path.name,
            "onnx_sha256": file_sha256(tmp),
            "input": {"name": "pixel_values", "shape": ["batch", 3, config.img_size, config.img_size],
                      "dtype": "float32", "preprocessing": "config.preprocessing[modality], see midol_hub.preprocessing"},
            "outputs": names,
            "modality": modality,
            "expert": expert,
            "exporter": {"torch": torch.__version__, "dynamo": True, "opset": opset},
            "provenance": model.provenance.to_dict() if model.provenance is not None else None,
            "config": config.to_dict(),
        }
        with atomic_write(sidecar_path(path)) as side:
            Path(side).write_text(json.dumps(sidecar))
    return path


def _check_parity(onnx_file: str, graph: nn.Module, example: torch.Tensor, names: list[str]) -> None:
    session = _session(onnx_file, None)
    got = session.run(names, {"pixel_values": example.numpy()})
    with torch.inference_mode():
        want = graph(example)
    for name, a, b in zip(names, got, want):
        error = float(np.abs(a - b.numpy()).max())
        if not error <= PARITY_TOLERANCE:
            raise RuntimeError(f"the exported {name} differs from torch by {error:.2e} (> {PARITY_TOLERANCE}); "
                               "the export was not written. Please report this with your torch and onnx versions")


def _session(onnx_file: str | Path, providers: Sequence[str] | None) -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("running ONNX exports needs onnxruntime: pip install 'midol-hub[onnx]'") from None
    return onnxruntime.InferenceSession(str(onnx_file), providers=list(providers or ["CPUExecutionProvider"]))


class OnnxEncoder:
    """An exported model under onnxruntime, with the package's reading, preprocessing, DICOM
    handling and modality detection: ``encode`` returns the same :class:`~midol_hub.Encoding`
    (modality, confidence, unknown) as :meth:`MIDoLModel.encode`, for the outputs ``embedding``,
    ``pooled`` and ``stage_pooled``.

    Args:
        path: the ``.onnx`` file written by :func:`export_onnx`; its ``.midol.json`` must lie beside it.
        providers: onnxruntime execution providers (default: CPU).
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        side = sidecar_path(path)
        if not side.is_file():
            raise FileNotFoundError(f"{path}: its metadata {side.name} is not beside it; an OnnxEncoder needs the "
                                    "sidecar that export_onnx (or `midol export onnx`) writes with the .onnx")
        meta = read_json_file(side, "ONNX sidecar", ("format", "version", "onnx_sha256", "config", "modality", "expert",
                                                     "outputs"), "export the model again with `midol export onnx`")
        if meta.get("format") != SIDECAR_FORMAT or meta.get("version") != SIDECAR_VERSION:
            raise ValueError(f"{side}: not a midol-onnx sidecar of version {SIDECAR_VERSION}")
        digest = file_sha256(path)
        if digest != meta["onnx_sha256"]:
            raise ValueError(f"{path}: the file is not the one its sidecar {side.name} describes (sha256 {digest[:12]}, "
                             f"recorded {meta['onnx_sha256'][:12]}); export it again")
        self.path = path
        self.config = MIDoLConfig.from_dict(meta["config"])
        self.modality: str | None = meta["modality"]
        self.expert: int | None = meta["expert"]
        self.output_names: list[str] = meta["outputs"]
        self.provenance = Provenance(**meta["provenance"]) if meta.get("provenance") else None
        self.session = _session(path, providers)

    def __repr__(self) -> str:
        fixed = f", modality={self.modality!r}" if self.modality else ""
        return f"OnnxEncoder({str(self.path)!r}{fixed})"

    def encode(self, images: Any, modality: str | None = None, *, output: str | Sequence[str] | None = None,
               batch_size: int = 32, normalize: bool = True, progress: bool = False, errors: str = "raise",
               strict_modality: bool = False, preprocessed: bool = False, channels_first: bool | None = None,
               frames: str | int | None = None) -> Encoding:
        """As :func:`midol_hub.encoding.encode`. ``modality`` defaults to ``"auto"``, or to the
        modality fixed at export (which is then the only one this file can encode)."""
        if self.modality is not None:
            asked = self.modality if modality is None else canonical_modality(modality, allow_auto=True)
            if asked != self.modality:
                raise ValueError(f"{self.path.name} was exported for modality {self.modality!r} only, so it cannot "
                                 f"encode {asked!r}; export without a modality for auto and every expert")
            modality = asked
        forced, requested = check_encode_args(self.config, modality or "auto", output, errors, batch_size)
        unsupported = [name for name in requested if name not in ONNX_OUTPUTS]
        if unsupported:
            raise ValueError(f"an ONNX export gives {', '.join(ONNX_OUTPUTS)}, not {', '.join(unsupported)}; "
                             "use the torch model (load_model) for patch tokens and the pyramid")
        return encode_rows(self.config, self.provenance, self._forward, images, forced, requested,
                           batch_size=batch_size, normalize=normalize, progress=progress, errors=errors,
                           strict_modality=strict_modality, preprocessed=preprocessed,
                           channels_first=channels_first, frames=frames)

    def _forward(self, pixels: torch.Tensor, experts: torch.Tensor, requested: frozenset, stages: bool) -> NetworkOutput:
        values = self.session.run(self.output_names, {"pixel_values": pixels.float().contiguous().numpy()})
        out = {name: torch.from_numpy(value) for name, value in zip(self.output_names, values)}
        routing_logits = out["routing_logits"]
        chosen = torch.where(experts < 0, routing_logits.argmax(dim=-1), experts)
        rows = torch.arange(len(chosen))
        if "expert_embeddings" in out:
            every = out["expert_embeddings"]
            embedding = every[rows, chosen]

            def expert_embeddings(moved: list[int], picked: torch.Tensor) -> torch.Tensor:
                return every[moved, picked]
        else:  # fixed at export: every row is forced to that modality, so no row moves
            embedding = out.get("embedding", out["pooled"])

            def expert_embeddings(moved: list[int], picked: torch.Tensor) -> torch.Tensor:
                raise RuntimeError("an export fixed to one modality has no other expert's embedding")
        return NetworkOutput(out["pooled"], routing_logits, embedding, chosen, expert_embeddings, out["stage_pooled"])
