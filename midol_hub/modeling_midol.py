"""M-IDoL network: a timm backbone (the paper's Swin, or any with pooled features and a feature
pyramid) and the mixture-of-experts projection head.

Reads top to bottom: the MoE head, the model output, the model (forward, encode, save),
and the Auto-class registration.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as hf_init
from transformers.utils import ModelOutput

from . import backbones  # noqa: F401  (registers the micro Swin with timm)
from .configuration_midol import MIDoLConfig
from .encoding import Encoding, encode
from .errors import NonFiniteError, WeightsMismatchError
from .image_processing_midol import MIDoLImageProcessor
from .model_card import render_model_card
from .preprocessing import Preprocessor
from .provenance import Provenance, resolve_weights_file


class MoEProjector(nn.Module):
    """M-IDoL's projection head: router -> expert FFNs -> L2-normalise -> prototypes.

    The experts' weights live in stacked tensors laid out like Tutel's MoE layer
    (``fc1_weight`` [E, H, D], ``fc2_weight`` [E, H, D] used transposed, biases [E, H] and
    [E, D]), so every expert runs in one batched matmul and official checkpoints map 1:1.
    With E experts of a few MFLOPs each against a backbone of GFLOPs, computing all experts
    densely is cheaper than dispatching samples.
    """

    def __init__(self, dim: int, num_experts: int, hidden_dim: int, top_k: int, num_prototypes: int = 0,
                 gate_noise: float = 0.0) -> None:
        super().__init__()
        self.dim, self.num_experts, self.hidden_dim, self.top_k = dim, num_experts, hidden_dim, top_k
        self.gate_noise = gate_noise
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, dim))
        self.prototypes = None
        if num_prototypes:
            layer = nn.Linear(dim, num_prototypes, bias=False)
            self.prototypes = nn.utils.parametrizations.weight_norm(layer)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DINO/Tutel initialisation: truncated normal (std 0.02), zero biases, unit prototype norms."""
        for weight in (self.router.weight, self.fc1_weight, self.fc2_weight):
            hf_init.trunc_normal_(weight, std=0.02)
        hf_init.zeros_(self.fc1_bias)
        hf_init.zeros_(self.fc2_bias)
        if self.prototypes is not None:
            weight_v = self.prototypes.parametrizations.weight.original1
            hf_init.trunc_normal_(weight_v, std=0.02)
            hf_init.ones_(self.prototypes.parametrizations.weight.original0)

    def route(self, features: torch.Tensor) -> torch.Tensor:
        """Routing logits (B, E), computed in fp32 as Tutel's ``fp32_gate`` does."""
        return F.linear(features.float(), self.router.weight.float())

    def expert_outputs(self, features: torch.Tensor) -> torch.Tensor:
        """Every expert's output for every sample: (B, D) -> (B, E, D)."""
        batch = features.shape[0]
        fc1 = self.fc1_weight.reshape(self.num_experts * self.hidden_dim, self.dim)
        hidden = F.linear(features, fc1).view(batch, self.num_experts, self.hidden_dim)
        hidden = F.gelu(hidden + self.fc1_bias)
        out = torch.bmm(hidden.transpose(0, 1), self.fc2_weight)  # (E, B, D)
        return out.transpose(0, 1) + self.fc2_bias

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns routing logits (B, E), all expert outputs (B, E, D) and prototype logits (B, K) or None.

        The prototype logits use the top-k experts weighted by their softmax gate
        probabilities (not renormalised), as the official Tutel head does; in training mode
        the gates see noise N(0, 1) * gate_noise / E. The returned routing logits are clean.
        """
        logits = self.route(features)
        outputs = self.expert_outputs(features)
        prototype_logits = None
        if self.prototypes is not None:
            noisy = logits
            if self.training and self.gate_noise > 0:
                noisy = logits + torch.randn_like(logits) * (self.gate_noise / self.num_experts)
            probs = noisy.softmax(dim=-1)
            top_p, top_i = probs.topk(self.top_k, dim=-1)
            gates = torch.zeros_like(probs).scatter_(1, top_i, top_p).to(outputs.dtype)
            mixed = torch.einsum("be,bed->bd", gates, outputs)
            prototype_logits = self.prototypes(F.normalize(mixed, dim=-1))
        return logits, outputs, prototype_logits


@dataclass
class MIDoLOutput(ModelOutput):
    """Output of :meth:`MIDoLModel.forward`.

    Attributes:
        embedding: (B, D) output of the selected expert (un-normalised).
        pooled: (B, D) globally pooled backbone feature, shared by all experts.
        routing_logits: (B, E) router logits.
        expert_index: (B,) the expert that produced ``embedding``.
        prototype_logits: (B, K) prototype logits when the model keeps prototypes.
        patch_tokens: (B, D, h, w) final-stage tokens after the last norm, NCHW.
        pyramid: the backbone's feature levels (a Swin's four stages), NCHW, from high to low resolution.
        pooler_output: ``pooled`` under transformers' name (what ``pipeline(..., pool=True)`` reads).
    """

    embedding: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    routing_logits: torch.Tensor | None = None
    expert_index: torch.Tensor | None = None
    prototype_logits: torch.Tensor | None = None
    patch_tokens: torch.Tensor | None = None
    pyramid: tuple[torch.Tensor, ...] | None = None
    pooler_output: torch.Tensor | None = None


class MIDoLModel(PreTrainedModel):
    """M-IDoL encoder: timm backbone + MoE projector, with modality-aware ``encode``.

    Load one with :func:`midol_hub.load_model`, which also attaches provenance.
    """

    config_class = MIDoLConfig
    base_model_prefix = "midol"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["SwinTransformerBlock"]

    def __init__(self, config: MIDoLConfig) -> None:
        super().__init__(config)
        self.backbone = timm.create_model(config.backbone, pretrained=False, num_classes=0,
                                          drop_path_rate=config.drop_path_rate, **_swin_arguments(config))
        if self.backbone.num_features != config.num_features:
            raise ValueError(f"backbone {config.backbone} gives {self.backbone.num_features}-d pooled features, "
                             f"the config says {config.num_features}: fix feature_dim")
        for module in self.backbone.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = config.fused_attention
        self.head = MoEProjector(
            dim=self.backbone.num_features,
            num_experts=config.num_experts,
            hidden_dim=config.hidden_dim,
            top_k=config.top_k,
            num_prototypes=config.num_prototypes if config.keep_prototypes else 0,
            gate_noise=config.gate_noise,
        )
        self.provenance = None
        self.post_init()

    @property
    def provenance(self) -> Provenance | None:
        """Where the weights came from (see :class:`~midol_hub.provenance.Provenance`); once they
        change in memory (training, ``load_state_dict``) the source reads ``"modified"``."""
        recorded = self.__dict__.get("_provenance")
        if recorded is None:
            return None
        if self._weights_signature() != self.__dict__["_provenance_signature"]:
            return recorded.modified(self.config.preprocessing_hash())
        return dataclasses.replace(recorded, preprocessing_sha256=self.config.preprocessing_hash())

    @provenance.setter
    def provenance(self, value: Provenance | None) -> None:
        self.__dict__["_provenance"] = value
        self.__dict__["_provenance_signature"] = self._weights_signature() if value is not None else None

    def _weights_signature(self) -> tuple:
        # every in-place change of a parameter (optimizer step, load_state_dict) bumps its version
        return tuple((id(p), p._version) for p in self.parameters())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args: Any,
                        **kwargs: Any) -> MIDoLModel:
        """transformers' loader with M-IDoL's guarantees, for ``load_model`` and ``AutoModel`` alike:
        float32 unless ``dtype`` names another precision, every tensor of the file must fit the config (never
        silently random weights), eval mode, and the provenance of the weights file attached."""
        # weights may be stored in fp16 to halve the file; compute in fp32 unless a dtype is named
        # ("auto", which pipelines pass, means the storage precision: not a compute choice here)
        for key in ("dtype", "torch_dtype"):
            if kwargs.get(key) == "auto":
                kwargs.pop(key)
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            kwargs["dtype"] = torch.float32
        return_info = kwargs.pop("output_loading_info", False)
        found = None
        if pretrained_model_name_or_path is not None:
            found = resolve_weights_file(pretrained_model_name_or_path, kwargs.get("revision"), kwargs.get("cache_dir"),
                                         kwargs.get("subfolder") or "")
        if found is not None:  # name every missing, unexpected or mis-shaped tensor before transformers sees them
            config = kwargs.get("config")
            if not isinstance(config, MIDoLConfig):
                config = MIDoLConfig.from_pretrained(found[1].parent)
            check_weights_file(config, found[1])
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                                  **kwargs)
        except SafetensorError as error:
            raise WeightsMismatchError(
                f"{pretrained_model_name_or_path}: the weights are not a readable safetensors file ({error}); "
                "it may be truncated: delete it and download or save it again"
            ) from None
        problems = {label: sorted(map(str, info.get(key) or [])) for key, label in
                    (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "wrong shape"))}
        if any(problems.values()):
            raise WeightsMismatchError(_mismatch_message(str(pretrained_model_name_or_path), problems))
        damaged = nonfinite_tensors(model.state_dict())
        if damaged:
            raise NonFiniteError(f"{pretrained_model_name_or_path}: {len(damaged)} weight tensor(s) hold NaN or Inf, first: "
                                 f"{damaged[0]}; the weights are damaged: download, convert or train them again")
        if found is not None:
            source, path, commit = found
            location = str(pretrained_model_name_or_path)
            model.provenance = Provenance.of_file(source, location, model.config.preprocessing_hash(), path,
                                                  kwargs.get("revision") if source == "hub" else None, commit)
        model.eval()
        return (model, info) if return_info else model

    def _init_weights(self, module: nn.Module) -> None:
        # timm initialises the backbone in its constructor; after a meta-device load only its
        # non-persistent buffers (relative position index, shift masks) need recomputing.
        if hasattr(module, "_init_buffers"):
            module._init_buffers()
        elif isinstance(module, MoEProjector):
            module.reset_parameters()

    def forward(
        self,
        pixel_values: torch.Tensor,
        expert_index: torch.Tensor | None = None,
        output_patch_tokens: bool = False,
        output_pyramid: bool = False,
        return_dict: bool = True,
    ) -> MIDoLOutput | tuple:
        """Run the network on normalised images (B, 3, S, S).

        ``expert_index`` (B,) picks the expert whose output becomes ``embedding``; by default,
        and for negative entries, the router's most probable expert is used.
        """
        pixel_values = self._backbone_layout(pixel_values)
        if output_pyramid:
            final, pyramid = self.backbone.forward_intermediates(pixel_values, output_fmt="NCHW")
            pyramid = tuple(pyramid)
        else:
            final, pyramid = self.backbone.forward_features(pixel_values), None
        pooled = self.backbone.forward_head(final, pre_logits=True)
        routing_logits, expert_outputs, prototype_logits = self.head(pooled)
        if expert_index is None:
            expert_index = routing_logits.argmax(dim=-1)
        else:
            expert_index = torch.where(expert_index < 0, routing_logits.argmax(dim=-1), expert_index)
        rows = torch.arange(pooled.shape[0], device=pooled.device)
        embedding = expert_outputs[rows, expert_index]
        output = MIDoLOutput(
            embedding=embedding,
            pooled=pooled,
            routing_logits=routing_logits,
            expert_index=expert_index,
            prototype_logits=prototype_logits,
            patch_tokens=to_nchw(self.backbone, final) if output_patch_tokens else None,
            pyramid=pyramid,
            pooler_output=pooled,
        )
        return output if return_dict else output.to_tuple()

    def forward_pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled feature (B, D) alone, as ``forward(...).pooled`` gives it, without
        running the head: for a frozen reference copy that only needs the feature."""
        pixel_values = self._backbone_layout(pixel_values)
        return self.backbone.forward_head(self.backbone.forward_features(pixel_values), pre_logits=True)

    def _backbone_layout(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # channels_last activations for a CNN: timm's EfficientNet-Lite0 1.28x faster on CPU (benchmarks.encode)
        return pixel_values if self.config.is_swin else pixel_values.contiguous(memory_format=torch.channels_last)

    def encode(self, images: Any, modality: str = "auto", **kwargs: Any) -> Encoding:
        """Embed images of one modality; see :func:`midol_hub.encoding.encode` for the contract."""
        return encode(self, images, modality=modality, **kwargs)

    def preprocess(self, images: Any, modality: str, channels_first: bool | None = None) -> torch.Tensor:
        """Turn images (as ``encode`` accepts them) into the normalised batch (B, 3, S, S) that ``forward`` expects."""
        return Preprocessor(self.config.profile(modality)).batch(images, channels_first=channels_first)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *args: Any,
        results: dict | str | os.PathLike | None = None,
        base_model: str | None = None,
        card_notes: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write ``config.json``, ``model.safetensors``, ``preprocessor_config.json`` and a model card ``README.md``.

        ``results`` (``{dataset: {protocol: {metric: value}}}`` or a JSON file) fills the card's
        evaluation table; ``base_model`` records what a derived model started from; ``card_notes``
        is markdown added to the card.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        MIDoLImageProcessor.from_config(self.config).save_pretrained(save_directory)
        name = getattr(self.config, "name_or_path", None) or None
        card = render_model_card(self.config, name=name, results=results, base_model=base_model, notes=card_notes)
        card.save(Path(save_directory) / "README.md")


def _swin_arguments(config: MIDoLConfig) -> dict[str, Any]:
    """The architecture overrides a Swin backbone is built with (other backbones take timm's own)."""
    if not config.is_swin:
        return {}
    return dict(img_size=config.img_size, patch_size=config.patch_size, window_size=config.window_size,
                embed_dim=config.embed_dim, depths=tuple(config.depths), num_heads=tuple(config.num_heads))


def backbone_stages(backbone: nn.Module) -> nn.ModuleList:
    """A timm backbone's stages in order: a Swin's ``layers``, a CNN's ``blocks`` (each a stage of blocks)."""
    return backbone.layers if hasattr(backbone, "layers") else backbone.blocks


def to_nchw(backbone: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """A backbone's final feature map as (B, C, h, w): timm's Swin gives (B, h, w, C), CNNs NCHW already."""
    return features.permute(0, 3, 1, 2) if getattr(backbone, "output_fmt", "NCHW") == "NHWC" else features


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold NaN or Inf. A tensor's sum is
    finite when all of it is (it allocates nothing, so loading keeps its one copy of the
    weights); only a non-finite sum is checked element by element."""
    return [name for name, tensor in state.items()
            if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor.sum()))
            and not bool(torch.isfinite(tensor).all())]


def check_weights_file(config: MIDoLConfig, weights_path: Path) -> None:
    """Raise WeightsMismatchError naming every tensor of ``weights_path`` that does not fit ``config``
    (reads the safetensors header only)."""
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in MIDoLModel(config).state_dict().items()}
    try:
        with safe_open(weights_path, "pt") as handle:
            found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise WeightsMismatchError(
            f"{weights_path} is not a readable safetensors file ({error}); it may be truncated: "
            "delete it and download or save it again"
        ) from None
    problems = {
        "missing": sorted(set(expected) - set(found)),
        "unexpected": sorted(set(found) - set(expected)),
        "wrong shape": [f"{key}: file {found[key]} vs config {expected[key]}"
                        for key in sorted(set(expected) & set(found)) if found[key] != expected[key]],
    }
    if any(problems.values()):
        raise WeightsMismatchError(_mismatch_message(str(weights_path), problems))


def _mismatch_message(where: str, problems: dict[str, list[str]]) -> str:
    parts = [f"{label}: " + ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
             for label, keys in problems.items() if keys]
    return (f"{where} does not match its config ({'; '.join(parts)}). Check that config.json belongs to these "
            "weights; official checkpoints need `midol convert` first.")


AutoConfig.register(MIDoLConfig.model_type, MIDoLConfig, exist_ok=True)
AutoModel.register(MIDoLConfig, MIDoLModel, exist_ok=True)
