"""midol-lite's start: ImageNet EfficientNet-Lite0 weights from the package index, converted onto
timm, an M-IDoL model on a non-Swin backbone, and a pretraining run that starts from them."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data as skimage_data

from benchmarks import head_channels
from midol_hub import MIDoLConfig, MIDoLModel, load_model
from midol_hub.errors import DatasetError
from training import export, pretrain
from training.head_norm import HeadNormTracking, refit_head_norm_statistics
from training.augment import MultiCrop
from training.config import ConfigError, load_config
from training.imagenet import (
    IMAGENET_SOURCE,
    ImageNetWeightsError,
    imagenet_state_dict,
    imagenet_weights_file,
    load_imagenet_backbone,
)
from training.learner import Learner, MultiCropForward, TrainingError

from .helpers import REPO

LITE = str(REPO / "training" / "configs" / "midol_lite.yaml")
EGYPTIAN_CAT, CAT_CLASSES = 285, range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_converted_weights_load_strictly_and_see_a_cat():
    network = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    network.load_state_dict(imagenet_state_dict("tf_efficientnet_lite0", network), strict=True)
    photo = Image.fromarray(skimage_data.chelsea()).resize((224, 224), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(photo)).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        probs = network(((pixels - 0.5) / 0.5)[None]).softmax(-1)[0]
    assert int(probs.argmax()) == EGYPTIAN_CAT and float(probs[list(CAT_CLASSES)].sum()) > 0.9  # measured: 0.77 / 0.96


def test_midol_lite_backbone_takes_every_imagenet_tensor_and_keeps_its_head():
    model = load_model("midol-lite", pretrained=False)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    load_imagenet_backbone(model)
    reference = imagenet_state_dict("tf_efficientnet_lite0", model.backbone)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert all(torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())


def test_an_architecture_without_installable_imagenet_weights_is_named():
    with pytest.raises(ImageNetWeightsError, match="swin_micro_patch2_window4_64.*tf_efficientnet_lite0"):
        imagenet_weights_file("swin_micro_patch2_window4_64")


def test_a_non_swin_backbone_gives_pooled_features_a_pyramid_and_nchw_tokens(tmp_path):
    model = load_model("midol-lite", pretrained=False)
    assert model.config.num_features == 1280 and model.config.profile("xray").mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 160, 160), output_pyramid=True, output_patch_tokens=True)
    assert out.embedding.shape == out.pooled.shape == (2, 1280)
    assert [tuple(level.shape[1:]) for level in out.pyramid] == [(16, 80, 80), (24, 40, 40), (40, 20, 20), (112, 10, 10),
                                                                  (320, 5, 5)]
    assert out.patch_tokens.shape == (2, 1280, 5, 5)
    # a CNN runs on channels_last activations (faster on CPU), with what the contiguous layout gives
    assert out.patch_tokens.is_contiguous(memory_format=torch.channels_last) and not out.patch_tokens.is_contiguous()
    images = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        contiguous = model.backbone.forward_head(model.backbone.forward_features(images.contiguous()), pre_logits=True)
        torch.testing.assert_close(model(images).pooled, contiguous, atol=1e-4, rtol=1e-4)
        assert torch.equal(model.forward_pooled(images), model(images).pooled)  # the feature alone, without the head
    model.save_pretrained(tmp_path)
    again = load_model(tmp_path)
    batch = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(again(batch).embedding, model(batch).embedding, atol=1e-5, rtol=0)  # same weights


def test_a_non_swin_config_needs_its_feature_width():
    with pytest.raises(ValueError, match="feature_dim"):
        MIDoLConfig(backbone="tf_efficientnet_lite0")
    with pytest.raises(ValueError, match="1280-d pooled features, the config says 1024"):
        MIDoLModel(MIDoLConfig(backbone="tf_efficientnet_lite0", feature_dim=1024, hidden_dim=32, num_prototypes=16))


def test_small_local_crops_stay_small_and_the_student_sees_each_size_once():
    crops = MultiCrop(96, local_number=3, local_size=40, local_upsample=False)(torch.rand(3, 120, 100))
    assert [tuple(c.shape) for c in crops] == [(3, 96, 96)] * 2 + [(3, 40, 40)] * 3
    assert [c.shape[-1] for c in MultiCrop(96, local_number=1, local_size=40)(torch.rand(3, 120, 100))] == [96, 96, 96]
    config = MIDoLConfig(backbone="tf_efficientnet_lite0", feature_dim=1280, hidden_dim=32, num_prototypes=64,
                         keep_prototypes=True)
    student = MIDoLModel(config).eval()
    batch = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    with torch.no_grad():
        prototypes, routing, pooled = MultiCropForward(student)(batch)
        globals_, locals_ = student(torch.cat(batch[:2])), student(torch.cat(batch[2:]))
    assert torch.equal(prototypes, torch.cat([globals_.prototype_logits, locals_.prototype_logits]))
    assert torch.equal(routing, torch.cat([globals_.routing_logits, locals_.routing_logits]))
    assert torch.equal(pooled, torch.cat([globals_.pooled, locals_.pooled]))


def test_precision_auto_follows_the_machine(monkeypatch):
    config = load_config(LITE, ["model.init=null", "model.num_prototypes=64", "optim.precision=auto"])
    student, teacher = pretrain.build_models(config, torch.device("cpu"))
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr("training.learner.native_bf16", lambda device, native=native: native)
        assert Learner(config, student, teacher, torch.device("cpu")).precision == expected



def test_pretraining_layer_decay_keeps_the_imagenet_layers_slow_and_the_head_at_full_lr():
    config = load_config(LITE, ["model.init=null", "model.num_prototypes=64", "optim.layer_decay=0.5", "model.batch_norm=train"])
    student, teacher = pretrain.build_models(config, torch.device("cpu"))
    learner = Learner(config, student, teacher, torch.device("cpu"))
    learner.set_schedules(2.0, 0.1)
    group_of = {id(p): g for g in learner.optimizer.param_groups for p in g["params"]}
    trained = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    lr = {name: group_of[id(p)]["lr"] for name, p in trained}
    blocks = 16
    assert lr["backbone.conv_stem.weight"] == 2.0 * 0.5 ** (blocks + 2)
    assert lr["backbone.blocks.6.0.conv_pwl.weight"] == 2.0 * 0.5 ** 2
    assert lr["backbone.conv_head.weight"] == 2.0 * 0.5
    assert {lr[name] for name in lr if name.startswith("head.")} == {2.0}
    decays = {name: group_of[id(p)]["weight_decay"] for name, p in trained}
    assert decays["backbone.bn1.weight"] == 0.0 and decays["backbone.conv_stem.weight"] == 0.1  # the schedule reaches decayed groups only
    assert load_config(None)["optim"]["layer_decay"] == 1.0  # the official default: one lr
    official = load_config(LITE, ["model.init=null", "model.num_prototypes=64", "optim.layer_decay=1.0", "model.batch_norm=train"])
    plain = Learner(official, student, teacher, torch.device("cpu"))
    plain.set_schedules(2.0, 0.1)
    assert {g["lr"] for g in plain.optimizer.param_groups} == {2.0} and len(plain.optimizer.param_groups) == 2
    with pytest.raises(TrainingError, match="optim.layer_decay must be in"):
        Learner(load_config(LITE, ["model.num_prototypes=64", "optim.layer_decay=0"]), student, teacher, torch.device("cpu"))

def test_a_swin_cannot_train_at_another_global_size(tmp_path, data_root):
    retina = f"fundus={data_root / 'fundus/retinamnist/retinamnist.npz'}"
    args = ["--config", str(REPO / "training/configs/midol_micro.yaml"), "--data", retina, "--output-dir",
            str(tmp_path / "run"), "--max-steps", "1", "--set", "crops.global_size=48"]
    config = pretrain.resolve_config(pretrain.parse_args(args))
    assert config["crops"]["global_size"] == 48
    assert pretrain.main(args) != 0 and not (tmp_path / "run" / "log.jsonl").exists()
    with pytest.raises(ConfigError, match="global_size 48: a Swin backbone trains at its input size 64"):
        pretrain.run(pretrain.parse_args(args))


@pytest.mark.slow
def test_a_run_from_imagenet_records_the_start_and_exports(tmp_path, data_root):
    data = [f"oct={data_root / 'oct/kermany_oct2017_samples_c'}",
            f"dermoscopy={data_root / 'dermoscopy/isic_uda1_250px'}"]
    run = tmp_path / "run"
    code = pretrain.main(["--config", LITE, "--data", *data, "--output-dir", str(run), "--batch-size", "4",
                          "--max-steps", "2", "--set", "crops.global_size=64", "--set", "crops.local_size=32",
                          "--set", "model.num_prototypes=256", "--set", "run.routing_every=0", "--set", "optim.lr=0.5",
                          "--set", "optim.warmup_epochs=0", "--set", "optim.layer_decay=1.0", "--set",
                          "optim.freeze_backbone_epochs=0", "--set", "optim.momentum_teacher=0.9"])
    assert code == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    model = export.export(run, tmp_path / "model").model
    record = model.config.pretraining
    assert record["init"] == "imagenet" and record["init_pretraining"] == {"weights": IMAGENET_SOURCE}
    imagenet = load_model("midol-lite", pretrained=False)
    load_imagenet_backbone(imagenet)
    stem = "backbone.conv_stem.weight"
    moved = (model.state_dict()[stem] - imagenet.state_dict()[stem]).abs().max()
    assert 1e-4 < moved < 1e-2  # two small steps (EMA of the student) away from ImageNet, not random (rounding: 2e-7)
    images = {"oct": [str(p) for p in sorted((data_root / "oct/kermany_oct2017_samples_c").rglob("*.jpeg"))[:12]],
              "dermoscopy": [str(p) for p in sorted((data_root / "dermoscopy/isic_uda1_250px").glob("*.jpg"))[:12]]}
    refit = export.export(run, tmp_path / "refit", calibrate=images, refit_head_norm=True).model
    assert refit.config.pretraining["deviations_from_official"]["head_norm_refit_images"] == 24
    plain, refitted = model.state_dict(), refit.state_dict()
    assert not torch.equal(plain["backbone.bn2.running_mean"], refitted["backbone.bn2.running_mean"])
    assert torch.equal(plain["backbone.conv_head.weight"], refitted["backbone.conv_head.weight"])
    with pytest.raises(DatasetError, match=r"needs training images: pass them with calibrate= \(--calibrate\)"):
        export.export(run, tmp_path / "refit-no-images", refit_head_norm=True)


@pytest.mark.slow
def test_frozen_batch_norm_and_a_head_first_phase_keep_the_imagenet_backbone(tmp_path, data_root):
    data = [f"oct={data_root / 'oct/kermany_oct2017_samples_c'}", f"dermoscopy={data_root / 'dermoscopy/isic_uda1_250px'}"]
    imagenet = load_model("midol-lite", pretrained=False)
    load_imagenet_backbone(imagenet)
    start = {k: v for k, v in imagenet.state_dict().items() if k.startswith("backbone.")}
    is_norm = lambda key: key.rsplit(".", 1)[-1] in ("running_mean", "running_var") or ".bn" in key or key.startswith("backbone.bn")

    def run(name: str, *overrides: str):
        settings = [item for option in ("crops.global_size=64", "crops.local_size=32", "model.num_prototypes=256",
                                        "run.routing_every=0", "model.batch_norm=frozen", "optim.lr=0.5",
                                        "optim.warmup_epochs=0", "optim.momentum_teacher=0", *overrides)
                    for item in ("--set", option)]
        code = pretrain.main(["--config", LITE, "--data", *data, "--output-dir", str(tmp_path / name), "--batch-size", "4",
                              "--max-steps", "2", *settings])
        assert code == 0
        return export.export(tmp_path / name, tmp_path / f"{name}-model").model

    head_first = run("head-first", "optim.freeze_backbone_epochs=1")  # both steps inside the head-only phase
    exported = head_first.state_dict()
    assert all(torch.allclose(exported[k], v, rtol=0, atol=1e-6)  # the teacher EMA of equal weights rounds
               for k, v in start.items() if not k.endswith("num_batches_tracked"))
    assert not torch.equal(exported["head.router.weight"], imagenet.state_dict()["head.router.weight"])
    assert head_first.config.pretraining["deviations_from_official"] == {
        "routing": "balanced", "balance": "tags_per_batch", "init": "imagenet", "batch_norm": "frozen",
        "layer_decay": 0.75, "freeze_backbone_epochs": 1}
    assert not any("Frozen" in type(m).__name__ for m in head_first.modules())  # plain batch norm again
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in head_first.backbone.modules())

    frozen_norm = run("frozen-norm", "optim.freeze_backbone_epochs=0").state_dict()  # the backbone learns, its batch norms stay ImageNet's
    norms = [k for k in start if is_norm(k) and not k.endswith("num_batches_tracked")]
    assert len(norms) > 150 and all(torch.equal(frozen_norm[k], start[k]) for k in norms)
    assert (frozen_norm["backbone.conv_stem.weight"] - start["backbone.conv_stem.weight"]).abs().max() > 1e-5  # rounding: 2e-7
    tracked = run("tracked", "optim.freeze_backbone_epochs=0", "model.head_norm_momentum=0.5",  # the head norm follows the crops
                  "objective.koleo_weight=0.1", "objective.preserve_start_weight=1.0")
    deviations = tracked.config.pretraining["deviations_from_official"]
    assert (deviations["head_norm_momentum"], deviations["koleo_weight"], deviations["preserve_start_weight"]) == (0.5, 0.1, 1.0)
    tracked_state, head_norm = tracked.state_dict(), ("backbone.bn2.running_mean", "backbone.bn2.running_var")
    assert all(torch.equal(tracked_state[k], start[k]) for k in norms if k not in head_norm)
    assert all((tracked_state[k] - start[k]).abs().max() > 1e-2 for k in head_norm)
    checkpoint = torch.load(sorted((tmp_path / "tracked").glob("checkpoint-*.pt"))[-1], weights_only=True)
    assert all(torch.equal(checkpoint["student"][k], checkpoint["teacher"][k]) for k in head_norm)  # the student takes the teacher's
    with pytest.raises(ConfigError, match="model.batch_norm must be 'train' or 'frozen', got 'fixed'"):
        pretrain.build_models(load_config(LITE, ["model.init=null", "model.batch_norm=fixed"]), torch.device("cpu"))


def test_refitting_the_head_norm_revives_channels_that_drifted_below_zero(data_root):
    # the symptom measured on midol-lite's tenth run, made here by shifting the input of conv_head
    # (the last block's frozen batch-norm bias) until about half the pooled channels never fire
    model = load_model("midol-lite", pretrained=False)
    load_imagenet_backbone(model)
    model.eval()
    octs = sorted((data_root / "oct/kermany_oct2017_samples_c").rglob("*.jpeg"))[:28]
    derm = sorted((data_root / "dermoscopy/isic_uda1_250px").glob("*.jpg"))[:32]
    images = {"oct": [str(p) for p in octs], "dermoscopy": [str(p) for p in derm]}
    batch = torch.cat([model.preprocess(images["oct"], "oct"), model.preprocess(images["dermoscopy"], "dermoscopy")])
    last_block_norm = model.backbone.blocks[-1][0].bn3
    row_sum = model.backbone.conv_head.weight[:, :, 0, 0].sum(0)
    last_block_norm.bias.data -= 40 * torch.nn.functional.normalize(row_sum, dim=0)

    def never_firing() -> float:
        with torch.no_grad():
            return head_channels.silent_share(model.backbone(batch))

    assert never_firing() > 0.3  # the ImageNet start as it is: 0.006
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert refit_head_norm_statistics(model, images, batch_size=30) == 60
    assert never_firing() < 0.03
    head_norm = model.backbone.bn2
    assert not head_norm.training and head_norm.momentum == 0.1  # back as it was, in eval mode
    grabbed = []
    hook = model.backbone.conv_head.register_forward_hook(lambda module, args, out: grabbed.append(out))
    with torch.no_grad():
        model.backbone(batch)
    hook.remove()
    channels = grabbed[0].transpose(0, 1).flatten(1)  # (1280, images x positions)
    assert torch.allclose(head_norm.running_mean, channels.mean(1), rtol=1e-4, atol=1e-4)  # equal batches: the exact mean
    assert torch.allclose(head_norm.running_var, channels.var(1), rtol=0.1)  # the mean within-batch variance
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"backbone.bn2.running_mean", "backbone.bn2.running_var", "backbone.bn2.num_batches_tracked"}
    with pytest.raises(DatasetError, match="swin_micro.* has no batch norm"):
        refit_head_norm_statistics(load_model("midol-micro"), images)
    with pytest.raises(DatasetError, match="no images to refit"):
        refit_head_norm_statistics(model, {"oct": []})
    pretrain.freeze_batch_norm(model)
    with pytest.raises(DatasetError, match=r"is frozen \(FrozenBatchNormAct2d\); refit an exported model"):
        refit_head_norm_statistics(model, images)


def test_head_channels_counts_silent_channels_and_effective_rank(data_root, tmp_path, capsys):
    directions = torch.linalg.qr(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)))[0].T  # 3 orthonormal rows
    signs = torch.tensor([[1.0, 1, 1], [-1, 1, 1], [1, -1, 1], [1, 1, -1], [-1, -1, 1], [-1, 1, -1], [1, -1, -1], [-1, -1, -1]])
    assert head_channels.effective_rank(signs @ directions) == pytest.approx(3.0, abs=1e-9)  # 3 equal independent directions
    assert head_channels.effective_rank(torch.cat([signs[:, :1], 0 * signs[:, 1:]], 1)) == pytest.approx(1.0)
    assert head_channels.silent_share(torch.tensor([[0.0, 1, 0, 2], [0, 3, 0, 0]])) == 0.5
    model = load_model("midol-lite", pretrained=False)
    load_imagenet_backbone(model)
    model.eval()
    isic = ("ISIC nevus vs melanoma",)
    start = head_channels.measure(model, isic, images=40)[isic[0]]
    assert start["silent"] < 0.02 and start["effective rank"] > 10  # the ImageNet start: 0.003 and 36 over 120 images
    with torch.no_grad():  # the drift of the refit test below silences channels and narrows the feature
        model.backbone.blocks[-1][0].bn3.bias -= 40 * torch.nn.functional.normalize(model.backbone.conv_head.weight[:, :, 0, 0].sum(0), dim=0)
    drifted = head_channels.measure(model, isic, images=40)[isic[0]]
    assert drifted["silent"] > 0.3 and drifted["effective rank"] < start["effective rank"]
    saved = tmp_path / "start"
    load_imagenet_backbone(model)  # undo the drift: a model directory holding the ImageNet start
    model.save_pretrained(saved)
    assert head_channels.main(["--model", str(saved), "--datasets", *isic, "--images", "40"]) == 0
    header, _, row = capsys.readouterr().out.splitlines()[-3:]
    assert header.startswith(f"| set | {saved} (trained): channels that never fire") and "| ImageNet start: " in header
    cell = f"{start['silent']:.3f} / {start['effective rank']:.0f}"
    assert row == f"| {isic[0]} | {cell} | {cell} |"  # the model and its baseline, side by side
    assert head_channels.main(["--model", "midol-lite", "--init", "imagenet", "--datasets", "Nope"]) == 1
    assert "no labelled set 'Nope'; choose from: PneumoniaMNIST" in capsys.readouterr().err


def test_tracking_the_head_norm_in_training_follows_the_teachers_input_and_revives_drifted_channels(data_root):
    # the drift of the refit test above, on frozen batch norms as pretraining has them
    student = load_model("midol-lite", pretrained=False)
    load_imagenet_backbone(student)
    pretrain.freeze_batch_norm(student)
    with torch.no_grad():
        student.backbone.blocks[-1][0].bn3.bias -= 40 * torch.nn.functional.normalize(student.backbone.conv_head.weight[:, :, 0, 0].sum(0), dim=0)
    teacher = copy.deepcopy(student)
    octs = sorted((data_root / "oct/kermany_oct2017_samples_c").rglob("*.jpeg"))[:12]
    derm = sorted((data_root / "dermoscopy/isic_uda1_250px").glob("*.jpg"))[:12]
    batch = torch.cat([teacher.preprocess([str(p) for p in octs], "oct"), teacher.preprocess([str(p) for p in derm], "dermoscopy")])
    grabbed = []
    teacher.backbone.conv_head.register_forward_hook(lambda module, args, out: grabbed.append(out.transpose(0, 1).flatten(1)))

    def never_firing() -> float:
        with torch.no_grad():
            return float((teacher.backbone(batch).abs().amax(0) == 0).float().mean())

    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert never_firing() > 0.3 and all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # untracked: unchanged
    tracking = HeadNormTracking(student, teacher, momentum=0.25)
    norm = teacher.backbone.bn2
    with tracking.tracking(), torch.no_grad():
        teacher(batch)
    channels = grabbed[-1]  # (1280, images x positions)
    assert torch.allclose(norm.running_mean, 0.75 * before["backbone.bn2.running_mean"] + 0.25 * channels.mean(1), atol=1e-5)
    assert torch.allclose(norm.running_var, 0.75 * before["backbone.bn2.running_var"] + 0.25 * channels.var(1), rtol=1e-4)
    changed = {k for k, v in teacher.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"backbone.bn2.running_mean", "backbone.bn2.running_var"}
    assert not norm._forward_pre_hooks and torch.equal(student.backbone.bn2.running_mean, before["backbone.bn2.running_mean"])
    tracking.share()
    assert torch.equal(student.backbone.bn2.running_mean, norm.running_mean) and torch.equal(student.backbone.bn2.running_var, norm.running_var)
    with tracking.tracking(), torch.no_grad():
        for _ in range(12):  # 0.75^12: 3% of the drifted statistics left
            teacher(batch)
    assert never_firing() < 0.03


def test_lora_and_class_heatmaps_work_on_a_cnn_backbone(data_root):
    from midol_hub import MIDoLForImageClassification, class_heatmap, lora_classifier

    encoder = load_model("midol-lite", pretrained=False)
    load_imagenet_backbone(encoder)
    wrapped = lora_classifier(encoder, ["a", "b"], "dermoscopy", rank=4)
    adapted = {name.split(".lora_A")[0] for name, _ in wrapped.named_parameters() if ".lora_A" in name}
    assert len(adapted) == 2 * 15 + 1 and all(name.endswith(("conv_pw", "conv_pwl")) for name in adapted)  # 16 blocks
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert all("lora_" in name or ".norm." in name or ".classifier." in name for name in trainable)
    images = sorted((data_root / "dermoscopy/isic_uda1_250px").glob("*.jpg"))[:2]
    classifier = MIDoLForImageClassification.from_encoder(encoder, ["a", "b"], "dermoscopy")
    maps = class_heatmap(classifier, [str(p) for p in images])
    assert maps.heat.shape == (2, 224, 224) and float(maps.heat.min()) >= 0 and float(maps.heat.max()) <= 1
    assert float(maps.heat.std()) > 0.01  # a map, not a constant


def test_segmentation_and_layer_decay_follow_a_cnn_backbone():
    from midol_hub import MIDoLForSemanticSegmentation
    from midol_hub.tasks import layerwise_lr_groups

    config = MIDoLConfig(**{**load_model("midol-lite", pretrained=False).config.to_dict(), "num_labels": 3})
    model = MIDoLForSemanticSegmentation(config).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).logits.shape == (1, 3, 96, 96)
    assert [layer.in_channels for layer in model.lateral] == [16, 24, 40, 112, 320]
    groups = layerwise_lr_groups(model, lr=1.0, decay=0.5, weight_decay=0.05)
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    lr = {name: by_param[id(p)] for name, p in model.named_parameters()}
    blocks = 16
    assert lr["midol.backbone.conv_stem.weight"] == 0.5 ** (blocks + 2)  # the stem decays most
    assert lr["midol.backbone.blocks.0.0.conv_dw.weight"] == 0.5 ** (blocks + 1)
    assert lr["midol.backbone.blocks.6.0.conv_pwl.weight"] == 0.5 ** 2
    assert lr["midol.backbone.conv_head.weight"] == 0.5 and lr["classifier.weight"] == 1.0
