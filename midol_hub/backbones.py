"""The Swin variant midol-micro is built on, registered with timm as timm registers its own, so
``timm.create_model("swin_micro_patch2_window4_64")`` builds it and its name says what it is."""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer

default_cfgs = generate_default_cfgs({"swin_micro_patch2_window4_64": {"input_size": (3, 64, 64), "num_classes": 0}})


@register_model
def swin_micro_patch2_window4_64(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin at 64 px: patch 2, window 4, embed 32, depths 2-2-6-2, heads 1-2-4-8 (no timm weights)."""
    args = dict(img_size=64, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8))
    return build_model_with_cfg(SwinTransformer, "swin_micro_patch2_window4_64", pretrained, **{**args, **kwargs})
