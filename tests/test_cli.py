"""The `midol` command line: exit codes, one-line errors, outputs and manifests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from midol_hub import load_model
from midol_hub.cli import main
from midol_hub.dtypes import cpu_bf16_flags, cpu_name, native_bf16
from training import shared_data

from .helpers import COMMIT_NEW, add_snapshot


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "midol_hub.cli", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def image_dirs(data_root):
    return [str(data_root / "oct" / "kermany_oct2017_samples_b"), str(data_root / "pathology" / "crc_val_he_7k_examples")]


def test_every_subcommand_has_help(capsys):
    for command in ([], ["encode"], ["info"], ["list"], ["convert"], ["push"], ["cache"], ["cache", "prefetch"], ["cache", "ls"], ["plot"]):
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0
        assert "usage: midol" in capsys.readouterr().out


def test_list_and_info(capsys):
    code, out, _ = cli(capsys, "list")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["midol-swin-base", "midol-swin-tiny",
                                                                            "midol-lite", "midol-micro"]
    assert ["in the package" in line for line in out.splitlines()] == [False, False, True, True]
    code, out, _ = cli(capsys, "info", "midol-swin-base", "--json")
    info = json.loads(out)
    assert info["architecture"]["depths"] == [2, 2, 18, 2] and info["architecture"]["embedding_dim"] == 1024
    assert 86e6 < info["parameters"]["backbone"] < 88e6
    assert info["experts"] == {"0": "xray", "1": "fundus", "2": "oct", "3": "dermoscopy", "4": "pathology"}
    code, out, _ = cli(capsys, "info", "midol-micro")
    assert code == 0 and "4.39 M" in out and "oct          gray, whole, 64 px" in out
    code, out, _ = cli(capsys, "info", "midol-lite")  # a CNN backbone: no Swin fields
    assert code == 0 and "backbone     tf_efficientnet_lite0: 224 px" in out and "9.94 M" in out


def test_info_without_a_model_reports_this_machine(capsys):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where models run here
    native = native_bf16(device)
    auto = "bfloat16" if native else "float32"  # what dtype="auto" computes in there
    code, out, _ = cli(capsys, "info", "--json")
    assert code == 0 and json.loads(out) == {"this_machine": {"device": device, "cpu": cpu_name(), "cores": os.cpu_count(),
                                                              "native_bf16": native,
                                                              "cpu_bf16_features": list(cpu_bf16_flags()), "auto": auto}}
    code, out, _ = cli(capsys, "info")
    assert code == 0 and len(out.splitlines()) == 1
    assert out.startswith(f"this machine {device} ({cpu_name()}, {os.cpu_count()} cores): native bf16 "
                          f"{'yes' if native else 'no'}") and f"computes in {auto}" in out


def test_encode_folders_to_npz_with_a_manifest(capsys, tmp_path, image_dirs):
    out = tmp_path / "feats.npz"
    code, stdout, _ = cli(capsys, "encode", *image_dirs, "--out", str(out), "--random-weights", "--output", "embedding,pooled,routing")
    assert code == 0 and "wrote 19 row(s)" in stdout
    data = np.load(out)
    assert data["embedding"].shape == (19, 256) and data["pooled"].shape == (19, 256) and data["routing"].shape == (19, 5)
    manifest = json.loads((tmp_path / "feats.npz.manifest.json").read_text())
    assert [r["row"] for r in manifest["rows"]] == list(range(19))
    assert [r["path"] for r in manifest["rows"]] == list(data["paths"])
    assert manifest["rows"][0]["path"].endswith("test_cnv.jpeg") and manifest["failures"] == []
    assert manifest["provenance"]["source"] == "random"
    assert np.allclose(np.linalg.norm(data["embedding"], axis=1), 1, atol=1e-5)


def test_encode_npy_and_safetensors(capsys, tmp_path, image_dirs):
    code, _, _ = cli(capsys, "encode", image_dirs[0], "--out", str(tmp_path / "e.npy"), "--random-weights")
    assert code == 0 and np.load(tmp_path / "e.npy").shape == (4, 256)
    code, _, _ = cli(capsys, "encode", image_dirs[0], "--out", str(tmp_path / "e.safetensors"), "--random-weights", "--output", "embedding,routing", "--dtype", "bf16")
    tensors = load_file(tmp_path / "e.safetensors")
    assert code == 0 and tensors["embedding"].shape == (4, 256) and tensors["routing"].shape == (4, 5)
    code, _, err = cli(capsys, "encode", image_dirs[0], "--out", str(tmp_path / "x.npy"), "--random-weights", "--output", "embedding,pooled")
    assert code == 1 and ".npy holds one array" in err


def test_encode_writes_the_models_default_feature_unless_told(capsys, tmp_path, image_dirs):
    """``--output`` defaults to the model's ``default_feature``: the backbone's pooled feature for
    both midol-micro and midol-lite, the better of their two vectors on kNN and retrieval."""
    model = load_model("midol-micro")
    for output in ("embedding", None):
        target = tmp_path / f"{output}.npy"
        code, _, _ = cli(capsys, "encode", image_dirs[0], "--out", str(target), *(["--output", output] if output else []))
        paths = [row["path"] for row in json.loads((tmp_path / f"{output}.npy.manifest.json").read_text())["rows"]]
        expected = getattr(model.encode(paths, output=output or "pooled"), output or "pooled")
        cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(np.load(target)).float(), expected)
        assert code == 0 and len(paths) == 4 and cosine.min() > 0.99  # the CLI may run in bf16
    from midol_hub.registry import get_entry
    assert model.config.default_feature == "pooled" and get_entry("midol-lite").make_config().default_feature == "pooled"
    encoded = model.encode(paths)  # encode() still returns the expert embedding beside it
    assert encoded.pooled.shape == (4, 256) and encoded.embedding.shape == (4, 256)


def test_encode_skip_errors_lists_failures(capsys, tmp_path, data_root):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.open(data_root / "oct/kermany_oct2017_samples_b/test_cnv.jpeg").save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"\xff\xd8 broken")
    out = tmp_path / "f.npz"
    code, stdout, stderr = cli(capsys, "encode", str(folder), "--out", str(out), "--random-weights", "--skip-errors")
    assert code == 0 and "1 failure(s)" in stdout and "skipped" in stderr and "b.jpg" in stderr
    manifest = json.loads((tmp_path / "f.npz.manifest.json").read_text())
    assert [r["path"].endswith("a.png") for r in manifest["rows"]] == [True]
    assert manifest["failures"][0]["path"].endswith("b.jpg")


def test_encode_failure_leaves_no_partial_output(capsys, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "b.jpg").write_bytes(b"\xff\xd8 broken")
    code, _, err = cli(capsys, "encode", str(folder), "--out", str(tmp_path / "f.npz"), "--random-weights")
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("midol: error: ") and "b.jpg" in last and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["encode", "nothing-here", "--out", "x.npz"], "nothing-here: no such file or folder"),
        (["encode", ".", "--out", "x.csv"], "unknown output format .csv"),
        (["encode", ".", "--out", "missing-dir/x.npz"], "does not exist"),
        (["encode", ".", "--out", "."], "unknown output format"),
        (["encode", ".", "--out", "taken.npz"], "is a directory"),
        (["encode", ".", "--out", "x.npz", "--output", "logits"], "--output logits"),
        (["info", "midol-huge"], "cannot find model 'midol-huge'"),
        (["convert", "absent.pth", "out"], "no such checkpoint"),
        (["plot", "absent.npz", "--out", "m.png"], "absent.npz: no such file"),
        (["cache", "prefetch", "midol-swin-base"], "no published weights to prefetch; to get a model: convert"),
    ],
)
def test_bad_arguments_give_one_line_errors(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken.npz").mkdir()
    code, _, err = cli(capsys, *args)
    assert code == 1
    assert err.startswith("midol: error: ") and message in err and err.count("\n") == 1


def test_encode_without_weights_explains_and_debug_shows_the_traceback(tmp_path, image_dirs):
    result = run("encode", image_dirs[0], "--out", str(tmp_path / "x.npz"), "--model", "midol-swin-base")
    assert result.returncode == 1
    assert "no published weights" in result.stderr and "Traceback" not in result.stderr
    result = run("--debug", "encode", image_dirs[0], "--out", str(tmp_path / "x.npz"), "--model", "midol-swin-base")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_convert_command_writes_a_loadable_directory(capsys, tmp_path):
    from .helpers import microsoft_backbone, prefixed, tutel_state

    torch.save({**prefixed("backbone.", microsoft_backbone(0)), **prefixed("head.", tutel_state(1))}, tmp_path / "M-IDoL.pth")
    code, out, _ = cli(capsys, "convert", str(tmp_path / "M-IDoL.pth"), str(tmp_path / "model"))
    assert code == 0 and "256-d, 5 experts" in out
    assert load_model(tmp_path / "model").config.window_size == 4
    code, _, err = cli(capsys, "convert", str(tmp_path / "M-IDoL.pth"), str(tmp_path / "model"))
    assert code == 1 and "not an empty directory" in err
    (tmp_path / "junk.pth").write_bytes(b"junk")
    code, _, err = cli(capsys, "convert", str(tmp_path / "junk.pth"), str(tmp_path / "model2"))
    assert code == 1 and not (tmp_path / "model2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_push_validates_then_fails_cleanly_on_an_unreachable_hub(micro_dir, tmp_path):
    offline_hub = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}
    result = run("push", str(micro_dir), "org/midol-test", "--token", "hf_fake", env=offline_hub)
    assert result.returncode == 1
    assert result.stderr.startswith("midol: error: ") and result.stderr.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("push", str(empty), "org/midol-test", env=offline_hub)
    assert result.returncode == 1 and "has no config.json" in result.stderr


def test_push_refuses_a_card_without_front_matter(capsys, micro_dir, tmp_path):
    import shutil

    shutil.copytree(micro_dir, tmp_path / "model")
    (tmp_path / "model" / "README.md").write_text("# no metadata\n")
    code, _, err = cli(capsys, "push", str(tmp_path / "model"), "org/x")
    assert code == 1 and "lacks license or library_name" in err


def test_cache_prefetch_and_ls_offline(capsys, tmp_path, micro_dir):
    add_snapshot(tmp_path / "cache", "org/midol-test", COMMIT_NEW, micro_dir, ("main",))
    code, out, _ = cli(capsys, "cache", "prefetch", "org/midol-test", "--cache-dir", str(tmp_path / "cache"))
    assert code == 0 and COMMIT_NEW in out
    code, out, _ = cli(capsys, "cache", "ls", "--cache-dir", str(tmp_path / "cache"))
    assert code == 0 and out.startswith("org/midol-test") and "refs=main" in out
    code, _, err = cli(capsys, "cache", "prefetch", "org/absent", "--cache-dir", str(tmp_path / "cache"))
    assert code == 1 and err.count("\n") == 1


def test_plot_draws_a_map_by_modality(capsys, tmp_path, image_dirs):
    cli(capsys, "encode", *image_dirs, "--out", str(tmp_path / "f.npz"), "--random-weights")
    code, out, _ = cli(capsys, "plot", str(tmp_path / "f.npz"), "--out", str(tmp_path / "map.png"), "--method", "pca")
    assert code == 0 and "pca of pooled, 19 points" in out  # midol-micro's default feature
    with Image.open(tmp_path / "map.png") as image:
        assert image.size == (720, 600)
    code, _, err = cli(capsys, "plot", str(tmp_path / "f.npz"), "--out", str(tmp_path / "m.png"), "--by", "label")
    assert code == 1 and "has no 'labels' array" in err
    code, out, _ = cli(capsys, "plot", str(tmp_path / "f.npz"), "--out", str(tmp_path / "two.png"), "--method", "pca",
                       "--by", "folder,modality")
    assert code == 0 and "folder: oct (4), pathology (15); modality: " in out  # top folders below the common root
    with Image.open(tmp_path / "two.png") as image:
        assert image.size == (1440, 600)  # two panels side by side
    code, _, err = cli(capsys, "plot", str(tmp_path / "f.npz"), "--out", str(tmp_path / "x.png"), "--by", "colour")
    assert code == 1 and "--by colour: choose from modality, source, label, folder" in err
    code, _, err = cli(capsys, "plot", str(tmp_path / "f.npz"), "--out", str(tmp_path / "e.png"), "--output", "embedding")
    assert code == 1 and "has no 'embedding' array (it has " in err and "midol encode --output embedding" in err
    cli(capsys, "encode", *image_dirs, "--out", str(tmp_path / "both.npz"), "--random-weights", "--output",
        "embedding,pooled")
    both = np.load(tmp_path / "both.npz")
    for vector in ("embedding", None):  # the file's pooled feature unless told
        code, out, _ = cli(capsys, "plot", str(tmp_path / "both.npz"), "--out", str(tmp_path / f"{vector}.png"),
                           "--method", "pca", *(["--output", vector] if vector else []))
        assert code == 0 and f"pca of {vector or 'pooled'}, 19 points" in out
    assert not np.allclose(both["embedding"], both["pooled"])


def test_explain_writes_one_routing_map_per_image(tmp_path, data_root):
    files = [shared_data.fullres_parts(data_root, "test")[m][0] for m in ("xray", "oct", "pathology")]
    result = subprocess.run([sys.executable, "-m", "midol_hub.cli", "explain", *files, "--out", str(tmp_path / "maps")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    pngs = sorted((tmp_path / "maps").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(Path(f).stem for f in files) and result.stdout.startswith("wrote 3 routing map(s)")
    assert all(Image.open(p).size[0] > 600 for p in pngs)  # the image beside five expert maps and a colour bar
