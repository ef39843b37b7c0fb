"""WebDataset shards: writing them deterministically, streaming them into training, exact resume
and two ranks."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from midol_hub import load_model
from training import export, make_shards, pretrain
from training.data import open_source
from training.shards import decode_sample

from .helpers import REPO, kill_tree, torchrun, torchrun_command

MICRO = str(REPO / "training" / "configs" / "midol_micro.yaml")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, data_root) -> Path:
    """Real OCT scans plus one broken file, as a user's folder would hold."""
    folder = tmp_path_factory.mktemp("oct")
    for path in sorted((data_root / "oct/kermany_oct2017_samples_c").rglob("*.jpeg"))[:10]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8 not a jpeg")
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory, data_root, image_folder) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    npz = data_root / "fundus/retinamnist/retinamnist.npz"
    assert make_shards.main([str(out), "--data", f"oct={image_folder}", f"fundus={npz}", "--shard-size", "200"]) == 0
    return out


def test_shards_hold_every_readable_image_losslessly_and_list_the_rest(shards, image_folder, data_root):
    index = json.loads((shards / "index.json").read_text())
    assert index["tags"] == {"oct": 10, "fundus": 1080} and index["samples"] == 1090
    assert [s["samples"] for s in index["shards"]] == [10, 200, 200, 200, 200, 200, 80]
    assert {s["tag"] for s in index["shards"][1:]} == {"fundus"}  # one tag per shard
    assert len(index["unreadable"]) == 1 and "broken.jpeg" in index["unreadable"][0]
    fundus = open_source(f"fundus={data_root / 'fundus/retinamnist/retinamnist.npz'}")
    oct_scans = open_source(f"oct={image_folder}")
    samples = list(wds.tarfile_to_samples()([{"url": str(shards / s["name"])} for s in index["shards"][:2]]))
    first_oct = samples[0]
    assert json.loads(first_oct["json"])["path"] == oct_scans.name(0)
    np.testing.assert_array_equal(decode_sample(first_oct), oct_scans.read(0))
    first_fundus = samples[10]
    assert json.loads(first_fundus["json"])["tag"] == "fundus"
    np.testing.assert_array_equal(decode_sample(first_fundus), fundus.read(0))


def test_writing_is_deterministic(tmp_path, shards, image_folder, data_root):
    npz = data_root / "fundus/retinamnist/retinamnist.npz"
    assert make_shards.main([str(tmp_path / "again"), "--data", f"oct={image_folder}", f"fundus={npz}",
                             "--shard-size", "200"]) == 0
    for path in sorted(shards.iterdir()):
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name
    assert make_shards.main([str(tmp_path / "again"), "--data", str(npz)]) == 1  # refuses to mix into old shards


def train(tmp_path: Path, name: str, data: list[str], *extra: str) -> list[dict]:
    out = tmp_path / name
    assert pretrain.main(["--config", MICRO, "--data", *data, "--output-dir", str(out), *extra]) == 0
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_streamed_training_resumes_exactly_and_ignores_the_worker_count(tmp_path, shards):
    common = ["--batch-size", "8", "--balance", "tags_per_batch", "--set", "optim.epochs=1", "--set", "optim.warmup_epochs=0",
              "--set", "run.checkpoint_every=3"]
    straight = train(tmp_path, "straight", [str(shards)], *common, "--max-steps", "6", "--set", "data.num_workers=2")
    assert [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]
    assert all(set(r["routing_accuracy"]) == {"oct", "fundus"} for r in straight)  # both tags in every batch
    train(tmp_path, "resumed", [str(shards)], *common, "--max-steps", "3", "--set", "data.num_workers=0")
    resumed = train(tmp_path, "resumed", [str(shards)], *common, "--max-steps", "6", "--resume",
                    "--set", "data.num_workers=2")
    assert [(r["loss"], r["route_loss"]) for r in resumed] == [(r["loss"], r["route_loss"]) for r in straight]
    model = export.export(tmp_path / "resumed", tmp_path / "model").model
    assert load_model(tmp_path / "model").config.num_features == model.config.num_features


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_stream_shards_resume_after_a_kill_and_export(tmp_path, shards):
    out = tmp_path / "ddp"
    args = ["-m", "training.pretrain", "--config", MICRO, "--data", f"{shards}/shard-{{000001..000006}}.tar",
            "--output-dir", str(out), "--batch-size", "8", "--set", "run.checkpoint_every=2"]
    run = subprocess.Popen(torchrun_command(*args, "--max-steps", "30"), cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("checkpoint-*.pt")):
        time.sleep(0.2)
    kill_tree(run.pid)  # the launcher and both ranks, mid-run
    run.wait()
    killed_at = int(sorted(out.glob("checkpoint-*.pt"))[-1].stem.split("-")[1])
    assert killed_at < 30
    torchrun(*args, "--max-steps", str(killed_at + 2), "--resume")
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps[-2:] == [killed_at + 1, killed_at + 2]
    assert json.loads((out / "ranks.json").read_text())["in_sync"]
    export.export(out, tmp_path / "model")
    assert load_model(tmp_path / "model").config.img_size == 64


def test_shards_and_folders_do_not_mix(tmp_path, shards, image_folder, capsys):
    code = pretrain.main(["--config", MICRO, "--data", str(shards), str(image_folder), "--output-dir", str(tmp_path / "x")])
    assert code == 1 and "mixes shards with folders" in capsys.readouterr().err
