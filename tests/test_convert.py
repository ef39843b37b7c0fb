"""Converting official checkpoints, checked against an independent Swin and Tutel head."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from midol_hub import MIDoLModel, load_model
from midol_hub.convert import CheckpointError, convert_checkpoint

from .helpers import ARCH, HIDDEN, E, K, microsoft_backbone, prefixed, tutel_state
from .reference_swin import swin_pooled, tutel_head


def reference_pooled(backbone: dict, images: torch.Tensor) -> torch.Tensor:
    return swin_pooled(backbone, images, patch=2, window=4, depths=ARCH["depths"], heads=ARCH["num_heads"])


def strip(prefix: str, state: dict) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def test_training_checkpoint_matches_the_official_swin_and_head(official, tmp_path):
    path, teacher, _ = official
    model = convert_checkpoint(path, tmp_path / "converted")
    assert model.config.embed_dim == 32 and model.config.depths == [2, 2, 2, 2]
    assert model.config.num_heads == [1, 2, 4, 8] and model.config.window_size == 4
    assert model.config.img_size == 64 and model.config.patch_size == 2
    assert (model.config.num_experts, model.config.hidden_dim, model.config.num_prototypes) == (E, HIDDEN, K)
    torch.manual_seed(5)
    images = torch.randn(3, 3, 64, 64)
    expected = reference_pooled(strip("backbone.", teacher), images)
    enc = model.encode(images, modality="oct", preprocessed=True, output=("pooled",))
    assert (enc.pooled - expected).abs().max() <= 1e-5

    logits, outputs, prototype_logits = tutel_head(strip("head.", teacher), expected, top_k=4)
    with torch.no_grad():
        ours = model.head(expected)
    torch.testing.assert_close(ours[0], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], outputs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[2], prototype_logits, rtol=1e-5, atol=1e-5)

    reloaded = load_model(tmp_path / "converted")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


def test_student_is_taken_on_request(official):
    path, _, student = official
    model = convert_checkpoint(path, use="student")
    images = torch.randn(2, 3, 64, 64)
    expected = reference_pooled(strip("module.backbone.", student), images)
    with torch.no_grad():
        assert (model(images).pooled - expected).abs().max() <= 1e-5


def test_released_flat_checkpoint_and_safetensors_convert_alike(official, tmp_path):
    _, teacher, _ = official
    torch.save(teacher, tmp_path / "M-IDoL.pth")
    save_file({k: v.contiguous() for k, v in teacher.items()}, tmp_path / "M-IDoL.safetensors")
    a = convert_checkpoint(tmp_path / "M-IDoL.pth")
    b = convert_checkpoint(tmp_path / "M-IDoL.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("layout", ["microsoft", "timm"])
def test_bare_swin_state_dicts_convert_the_backbone(tmp_path, layout):
    backbone = microsoft_backbone(4)
    images = torch.randn(2, 3, 64, 64)
    expected = reference_pooled(backbone, images)
    if layout == "microsoft":
        checkpoint = {"model": {**backbone, "head.weight": torch.zeros(10, 256), "head.bias": torch.zeros(10)}}
    else:
        timm_model = convert_checkpoint_quietly({"model": backbone}, tmp_path).backbone
        checkpoint = timm_model.state_dict()
    torch.save(checkpoint, tmp_path / "swin.pth")
    with pytest.raises(CheckpointError, match="holds no MoE head"):
        convert_checkpoint(tmp_path / "swin.pth", img_size=64)
    model = convert_checkpoint(tmp_path / "swin.pth", img_size=64, backbone_only=True)
    with torch.no_grad():
        assert (model(images).pooled - expected).abs().max() <= 1e-5


def convert_checkpoint_quietly(checkpoint: dict, tmp_path) -> MIDoLModel:
    torch.save(checkpoint, tmp_path / "tmp.pth")
    return convert_checkpoint(tmp_path / "tmp.pth", backbone_only=True)


def test_per_rank_tutel_head_converts_the_backbone_only_when_asked(tmp_path):
    backbone = microsoft_backbone(0)
    checkpoint = {**prefixed("backbone.", backbone), **prefixed("head.", tutel_state(1, local_experts=2))}
    torch.save(checkpoint, tmp_path / "rank0.pth")
    with pytest.raises(CheckpointError, match="holds 2 of 5 experts.*backbone_only=True"):
        convert_checkpoint(tmp_path / "rank0.pth")
    model = convert_checkpoint(tmp_path / "rank0.pth", backbone_only=True)
    assert model.config.backbone_only
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model(images).pooled - reference_pooled(backbone, images)).abs().max() <= 1e-5


class Payload:
    """Unpickling this would create a directory: code execution in miniature."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.makedirs, (str(self.marker),))


def test_pickles_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"x": torch.zeros(1)}, "trap": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused to unpickle.*could run code.*Nothing was executed"):
        convert_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_unreadable_and_empty_checkpoints_are_named(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"junk\.pth: not a readable PyTorch checkpoint"):
        convert_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        convert_checkpoint(tmp_path / "absent.pth")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no tensors"):
        convert_checkpoint(tmp_path / "empty.pth")


def test_parametrized_weight_norm_keys_convert_like_weight_g_and_v(official, tmp_path):
    _, teacher, _ = official
    renamed = {
        k.replace("last_layer.weight_g", "last_layer.parametrizations.weight.original0").replace(
            "last_layer.weight_v", "last_layer.parametrizations.weight.original1"
        ): v
        for k, v in teacher.items()
    }
    torch.save(teacher, tmp_path / "a.pth")
    torch.save(renamed, tmp_path / "b.pth")
    a, b = convert_checkpoint(tmp_path / "a.pth"), convert_checkpoint(tmp_path / "b.pth")
    torch.testing.assert_close(a.head.prototypes.weight, b.head.prototypes.weight)
    assert a.config.keep_prototypes and a.config.num_prototypes == K
