"""End-to-end pretraining on real images: resume, learning signal, DDP, export, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from midol_hub import load_model
from midol_hub.dtypes import cpu_name, native_bf16
from midol_hub.model_card import machines_summary
from training import export, pretrain
from training.checkpoint import list_checkpoints, load_checkpoint
from training.config import deviations_from_official, load_config, official_options
from training.imagenet import load_imagenet_backbone
from training.monitor import KNNMonitor

from .helpers import REPO, torchrun

MICRO = str(REPO / "training" / "configs" / "midol_micro.yaml")


def train(tmp_path: Path, name: str, data: list[str], *extra: str) -> tuple[int, list[dict]]:
    out = tmp_path / name
    code = pretrain.main(["--config", MICRO, "--data", *data, "--output-dir", str(out), *extra])
    log = out / "log.jsonl"
    return code, [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def retina(data_root) -> str:
    return f"fundus={data_root / 'fundus/retinamnist/retinamnist.npz'}"


@pytest.mark.slow
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path, retina):
    common = ["--batch-size", "8", "--set", "optim.epochs=1", "--set", "optim.warmup_epochs=0", "--set", "run.checkpoint_every=3"]
    code, straight = train(tmp_path, "straight", [retina], *common, "--max-steps", "6")
    assert code == 0 and [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]
    code, first = train(tmp_path, "resumed", [retina], *common, "--max-steps", "3")
    assert code == 0 and len(first) == 3
    code, resumed = train(tmp_path, "resumed", [retina], *common, "--max-steps", "6", "--resume")
    assert code == 0 and [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed):
        assert (a["loss"], a["route_loss"], a["distill_loss"], a["lr"]) == (b["loss"], b["route_loss"], b["distill_loss"], b["lr"])
    state = torch.load(sorted((tmp_path / "straight").glob("checkpoint-*.pt"))[0], weights_only=True)
    prototypes = "head.prototypes.parametrizations.weight.original1"
    frozen = (state["student"][prototypes] - state["teacher"][prototypes]).abs().max()
    trained = (state["student"]["head.fc1_weight"] - state["teacher"]["head.fc1_weight"]).abs().max()
    assert frozen < 1e-7 and trained > 1e-5  # prototypes stay fixed in the first epoch (EMA rounding only), experts move
    run_dir = tmp_path / "resumed"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*.pt")) == ["checkpoint-00000003.pt", "checkpoint-00000006.pt"]
    assert (run_dir / "config.yaml").read_text().count("batch_size: 8") == 1
    # the checkpoint says which machine computed which steps; a resume on the same machine adds no entry
    last = run_dir / "checkpoint-00000006.pt"
    state = torch.load(last, weights_only=True)
    machine = {"from_step": 0, "cpu": cpu_name(), "cores": os.cpu_count(), "native_bf16": native_bf16(),
               "ranks": 1, "precision": "fp32"}  # midol_micro.yaml trains in fp32
    assert state["machines"] == [machine]
    del state["machines"]  # a checkpoint from before machines were recorded
    torch.save(state, last)
    code, _ = train(tmp_path, "resumed", [retina], *common, "--max-steps", "7", "--resume")
    machines = torch.load(run_dir / "checkpoint-00000007.pt", weights_only=True)["machines"]
    assert code == 0 and machines == [{"from_step": 0}, {**machine, "from_step": 6}]
    assert machines_summary(machines, 7) == (f"steps 0-6 on a machine not recorded, 6-7 on {cpu_name()} "
                                            f"({os.cpu_count()} cores, {'native' if native_bf16() else 'no native'} "
                                            f"bf16), 1 rank, {machine['precision']}")
    # a session that resumed elsewhere and stopped before its first checkpoint computed no step: no span
    assert machines_summary([{"from_step": 0}, {**machine, "from_step": 7}], 7) == "steps 0-7 on a machine not recorded"


@pytest.mark.slow
def test_feature_preservation_resumes_exactly_and_a_run_without_it_does_not_resume_with_it(tmp_path, capsys, retina):
    common = ["--batch-size", "8", "--set", "optim.warmup_epochs=0", "--set", "run.checkpoint_every=2",
              "--set", "objective.preserve_start_weight=1.0"]
    code, straight = train(tmp_path, "straight", [retina], *common, "--max-steps", "4")
    assert code == 0 and len(straight) == 4
    code, first = train(tmp_path, "resumed", [retina], *common, "--max-steps", "2")
    assert code == 0 and len(first) == 2
    code, resumed = train(tmp_path, "resumed", [retina], *common, "--max-steps", "4", "--resume")
    assert code == 0 and [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [(r["loss"], r["preserve_loss"]) for r in straight] == [(r["loss"], r["preserve_loss"]) for r in resumed]
    assert straight[-1]["preserve_loss"] > straight[0]["preserve_loss"] >= 0  # the student leaves its start
    assert torch.load(sorted((tmp_path / "straight").glob("checkpoint-*.pt"))[-1],
                      weights_only=True)["config"]["objective"]["preserve_start_weight"] == 1.0
    code, _ = train(tmp_path, "plain", [retina], "--batch-size", "8", "--max-steps", "1")
    assert code == 0
    code, _ = train(tmp_path, "plain", [retina], "--batch-size", "8", "--max-steps", "2", "--resume",
                    "--set", "objective.preserve_start_weight=1.0")
    assert code == 1 and "trained without objective.preserve_start_weight" in capsys.readouterr().err
    code, _ = train(tmp_path, "straight", [retina], "--batch-size", "8", "--max-steps", "5", "--resume")
    assert code == 1 and "trained with objective.preserve_start_weight" in capsys.readouterr().err


@pytest.mark.slow
def test_loss_falls_on_real_images_of_three_modalities(tmp_path, data_root):
    data = [f"oct={data_root / 'oct'}", f"pathology={data_root / 'pathology/crc_val_he_7k_examples'}",
            f"dermoscopy={data_root / 'dermoscopy/isic_uda1_250px'}"]
    code, log = train(tmp_path, "smoke", data, "--batch-size", "16", "--max-steps", "24",
                      "--set", "optim.epochs=2", "--set", "optim.warmup_epochs=0", "--balance", "tags",
                      "--set", "optim.lr=5e-3")
    assert code == 0 and len(log) == 24
    early = sum(r["loss"] for r in log[:5]) / 5
    late = sum(r["loss"] for r in log[-5:]) / 5
    assert late < early - 1.0, (early, late)  # measured: 16.1 -> 10.7, mostly the routing term sharpening
    last = log[-1]
    assert set(last["routing_accuracy"]) == {"oct", "pathology", "dermoscopy"}
    assert len(last["expert_usage"]) == 5 and sum(last["expert_usage"]) == pytest.approx(1.0)
    for key in ("route_loss", "distill_loss", "lr", "wd", "momentum", "images_per_s"):
        assert key in last


def test_export_calibrates_experts_on_labelled_roots(tmp_path, data_root, retina):
    code, _ = train(tmp_path, "run", [retina, f"oct={data_root / 'oct'}"], "--batch-size", "8", "--max-steps", "2")
    assert code == 0
    model = export.export(tmp_path / "run", tmp_path / "model",
                          calibrate=[f"oct={data_root / 'oct'}", retina], max_per_modality=40).model
    calibration = model.config.modality_calibration
    counts = np.array(calibration["confusion"])
    assert calibration["modalities_order"] == ["oct", "fundus"] and counts.sum() == 80
    for row, modality in enumerate(calibration["modalities_order"]):  # accuracy is the assigned expert's share
        if modality in model.config.expert_modalities:
            expert = model.config.expert_modalities.index(modality)
            assert calibration["accuracy"][modality] == pytest.approx(counts[row, expert] / 40)
        else:
            assert calibration["accuracy"][modality] == 0.0
    assert sum(m == "unassigned" for m in model.config.expert_modalities) >= 3  # two modalities, five experts
    assert model.config.pretraining["objective"] == "midol" and model.config.pretraining["steps"] == 2
    assert model.config.pretraining["deviations_from_official"] == {}  # midol_micro.yaml: the official objective
    assert f"trained on steps 0-2 on {cpu_name()} ({os.cpu_count()} cores" in (tmp_path / "model" / "README.md").read_text()
    state = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    state["config"]["objective"]["routing"], state["config"]["data"]["balance"] = "balanced", "tags_per_batch"
    state["config"]["model"]["init"] = str(tmp_path / "runs" / "dino-e1")
    record = export.pretraining_record(state)
    assert record["deviations_from_official"] == {"routing": "balanced", "balance": "tags_per_batch", "init": "dino-e1"}
    assert record["init"] == "dino-e1"  # the model's name, not this machine's path
    loaded = load_model(tmp_path / "model")
    assert loaded.config.modality_calibration == calibration and loaded.head.prototypes is None
    half = export.export(tmp_path / "run", tmp_path / "model_fp16", calibrate=[retina], storage="fp16", max_per_modality=16,
                         calibration_settings={"quantile": 0.9, "components": 8, "slope": 2.0})
    assert half.fp16_error <= 1e-3
    detector = load_model(tmp_path / "model_fp16").config.modality_calibration["out_of_scope"]
    assert (detector["quantile"], detector["components"], detector["slope"]) == (0.9, 8, 2.0)  # a model's own settings
    from safetensors import safe_open

    with safe_open(tmp_path / "model_fp16" / "model.safetensors", "pt") as stored:
        assert stored.get_tensor("head.fc1_weight").dtype == torch.float16
        # the first stages and 1-D tensors stay fp32 (rounding them moves midol-lite's embeddings by 0.1)
        assert stored.get_tensor("backbone.patch_embed.proj.weight").dtype == torch.float32
        assert stored.get_tensor("backbone.layers.2.blocks.0.norm1.weight").dtype == torch.float32
        assert stored.get_tensor("backbone.layers.2.blocks.0.attn.qkv.weight").dtype == torch.float16
    assert load_model(tmp_path / "model_fp16").head.fc1_weight.dtype == torch.float32  # computed in fp32
    kept = export.export(tmp_path / "run", tmp_path / "model2", keep_prototypes=True).model
    assert kept.head.prototypes.weight.shape == (4096, 256)
    code, _ = train(tmp_path, "from_export", [retina], "--batch-size", "8", "--max-steps", "1",
                    "--set", f"model.init={tmp_path / 'model'}")
    assert code == 0
    continued = export.export(tmp_path / "from_export", tmp_path / "model3").model.config.pretraining
    assert continued["init"] == "model" and continued["steps"] == 1
    assert continued["init_pretraining"] == loaded.config.pretraining  # the init's own record: the lineage
    card = (tmp_path / "model3" / "README.md").read_text()
    assert "1 steps of batch 8, started from model (2 steps from random initialisation)" in card


def test_dino_objective_in_bf16_with_accumulation_and_knn_monitoring(tmp_path, data_root, retina):
    npz = data_root / "fundus/retinamnist/retinamnist.npz"
    code, log = train(tmp_path, "dino", [retina], "--batch-size", "8", "--max-steps", "2", "--objective", "dino",
                      "--set", "optim.precision=bf16", "--set", "optim.accumulate=2",
                      "--set", f"run.knn_data={npz}", "--set", "run.knn_every=2")
    assert code == 0 and all(r["route_loss"] == 0.0 for r in log)
    assert "knn_accuracy" not in log[0]
    model = export.export(tmp_path / "dino", tmp_path / "dino_model").model
    assert log[1]["knn_accuracy"] == KNNMonitor(str(npz), 64).accuracy(model)  # the logged value is the teacher's
    assert model.config.num_experts == 1 and model.config.expert_modalities == ["shared"]
    enc = load_model(tmp_path / "dino_model").encode(torch.rand(3, 64, 64), modality="oct")
    assert enc.modality == ["oct"] and enc.embedding.shape == (1, 256)


@pytest.mark.distributed
def test_two_cpu_ranks_stay_in_sync(tmp_path, retina):
    torchrun("-m", "training.pretrain", "--config", MICRO, "--data", retina, "--output-dir", str(tmp_path / "ddp"),
             "--batch-size", "8", "--max-steps", "3")
    ranks = json.loads((tmp_path / "ddp" / "ranks.json").read_text())
    assert len(ranks["teacher_sha256"]) == 2 and ranks["in_sync"]
    assert len((tmp_path / "ddp" / "log.jsonl").read_text().splitlines()) == 3  # only rank 0 writes


@pytest.mark.distributed
def test_ranks_that_fail_leave_with_the_one_line_error(tmp_path, retina):
    result = torchrun("-m", "training.pretrain", "--config", MICRO, "--data", retina, "--output-dir", str(tmp_path / "none"),
                      "--resume", check=False, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("training.pretrain: error: --resume:") == 2  # each rank, and no abort or traceback of its own
    assert "Fatal Python error" not in result.stderr and "terminate called" not in result.stderr


@pytest.mark.distributed
def test_two_ranks_tracking_the_head_norm_stay_in_sync(tmp_path, data_root):
    # each rank sees other crops; their batch moments are averaged, so the teachers stay equal
    torchrun("-m", "training.pretrain", "--config", str(REPO / "training" / "configs" / "midol_lite.yaml"),
             "--data", f"oct={data_root / 'oct/kermany_oct2017_samples_c'}", "--output-dir", str(tmp_path / "ddp"),
             "--batch-size", "4", "--max-steps", "2", "--set", "crops.global_size=64", "--set", "crops.local_size=32",
             "--set", "model.num_prototypes=256", "--set", "run.routing_every=0", "--set", "model.head_norm_momentum=0.5")
    assert json.loads((tmp_path / "ddp" / "ranks.json").read_text())["in_sync"]
    state = torch.load(sorted((tmp_path / "ddp").glob("checkpoint-*.pt"))[-1], weights_only=True)
    start = load_model("midol-lite", pretrained=False)
    load_imagenet_backbone(start)
    assert (state["teacher"]["backbone.bn2.running_mean"] - start.state_dict()["backbone.bn2.running_mean"]).abs().max() > 1e-2


def pretrain_ranks(tmp_path: Path, name: str, data: list[str], *extra: str) -> list[dict]:
    torchrun("-m", "training.pretrain", "--config", MICRO, "--data", *data, "--output-dir", str(tmp_path / name),
             "--batch-size", "8", "--set", "run.checkpoint_every=2", *extra)
    return [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_matches_ddp_and_its_checkpoints_resume_under_ddp_and_export(tmp_path, retina):
    ddp = pretrain_ranks(tmp_path, "ddp", [retina], "--max-steps", "4")
    fsdp = pretrain_ranks(tmp_path, "fsdp", [retina], "--max-steps", "2", "--set", "dist.strategy=fsdp")
    resumed = pretrain_ranks(tmp_path, "fsdp", [retina], "--max-steps", "4", "--resume")  # the default strategy: ddp
    # measured: FSDP and DDP losses agree to 1e-5 on CPU/gloo (the sharded reductions sum in another order)
    for a, b in zip(ddp, fsdp + resumed[2:]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4) and a["route_loss"] == pytest.approx(b["route_loss"], abs=1e-4)
    state = torch.load(sorted((tmp_path / "fsdp").glob("checkpoint-*.pt"))[0], weights_only=True)
    assert all(isinstance(key, str) for key in state["learner"]["optimizer"]["state"])  # full, named: loadable anywhere
    model = export.export(tmp_path / "fsdp", tmp_path / "model").model
    assert load_model(tmp_path / "model").config.num_experts == model.config.num_experts == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/images"], "data path /nonexistent/images does not exist"),
        (["--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["--batch-size", "7", "--set", "optim.accumulate=2"], "must be a multiple of ranks x accumulate"),
        (["--resume"], "has no checkpoint to resume from"),
        (["--set", "optim.precision=fp16"], "fp16 needs CUDA"),
        (["--set", "model.arch=midol-huge"], "not a registry name"),
        (["--set", "crops.ihc_patterns=[membrane]"], "crops: IHC re-staining patterns (ihc_patterns) must be a non-empty subset"),
        (["--set", "crops.colour_jitter={hew: 0}"], "crops: colour_jitter takes brightness, contrast, saturation, hue, got hew"),
        (["--set", "model.head_norm_momentum=0.1"], "model.head_norm_momentum needs model.batch_norm: frozen"),
        (["--set", "model.batch_norm=frozen", "--set", "model.head_norm_momentum=1.5"], "must be in [0, 1], got 1.5"),
    ],
)
def test_bad_runs_fail_with_one_line(tmp_path, capsys, retina, args, message):
    argv = ["--config", MICRO, "--output-dir", str(tmp_path / "bad"), "--max-steps", "1"]
    if "--data" not in args:
        argv += ["--data", retina]
    assert pretrain.main(argv + args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("training.pretrain: error: ") and message in err[-1]


def test_old_balance_spellings_still_load_with_a_warning():
    with pytest.warns(FutureWarning, match="data.balance=roots is now spelled tags"):
        assert load_config(None, ["data.balance=roots"])["data"]["balance"] == "tags"
    with pytest.warns(FutureWarning, match="now spelled tags_per_batch"):
        config = load_config(REPO / "training" / "configs" / "midol_micro.yaml", ["data.balance=batches"])
    assert config["data"]["balance"] == "tags_per_batch"


def test_official_options_are_read_from_the_defaults_and_deviations_derive_from_them():
    defaults = yaml.safe_load((REPO / "training" / "configs" / "defaults.yaml").read_text())
    assert official_options() == {"routing": defaults["objective"]["routing"], "top_k": defaults["model"]["top_k"],
                                  "gate_noise": defaults["model"]["gate_noise"], "clip_mode": defaults["optim"]["clip_mode"],
                                  "teacher_train_mode": defaults["model"]["teacher_train_mode"], "init": None,
                                  "sinkhorn_iters": defaults["objective"]["sinkhorn_iters"], "balance": "none",
                                  "batch_norm": "train", "layer_decay": 1.0, "freeze_backbone_epochs": 0,
                                  "head_norm_momentum": 0.0, "koleo_weight": 0.0,
                                  "preserve_start_weight": 0.0}
    assert deviations_from_official(load_config(None)) == {}
    v3 = load_config(REPO / "training" / "configs" / "midol_micro_v3.yaml", ["model.init=/somewhere/midol-micro"])
    assert deviations_from_official(v3) == {"routing": "balanced", "balance": "tags_per_batch", "init": "midol-micro"}


def test_npz_without_the_split_is_named(tmp_path, capsys, data_root):
    path = data_root / "pathology/pathmnist_test_subset/pathmnist.npz"
    assert pretrain.main(["--config", MICRO, "--data", str(path), "--output-dir", str(tmp_path / "x")]) == 1
    assert "has no 'train_images' array (it has test_images, test_labels)" in capsys.readouterr().err


def test_resume_with_another_architecture_is_refused(tmp_path, capsys, retina):
    code, _ = train(tmp_path, "run", [retina], "--batch-size", "8", "--max-steps", "1")
    assert code == 0
    code, _ = train(tmp_path, "run", [retina], "--batch-size", "8", "--max-steps", "2", "--resume",
                    "--set", "model.overrides={hidden_dim: 256}")
    assert code == 1 and "trained with another architecture" in capsys.readouterr().err
    code, _ = train(tmp_path, "run", [retina], "--batch-size", "8", "--max-steps", "2")
    assert code == 1 and "pass --resume" in capsys.readouterr().err
