"""The bad-input matrix: every case fails fast with its exception type and a message that names
the input and the fix, or takes its documented recovery; none hangs, none silently succeeds."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000MC, JPEGLSLossless

from midol_hub import (
    CheckpointError,
    ImageReadError,
    MIDoLInputWarning,
    ModelNotFoundError,
    WeightsMismatchError,
    WeightsNotAvailableError,
    calibrate,
    convert_checkpoint,
    load_model,
)
from midol_hub.cli import main as cli_main
from midol_hub.errors import DatasetError
from training.config import ConfigError, load_config
from training.data import open_source
from training.learner import Learner, TrainingError
from training.pretrain import build_models

from .helpers import add_snapshot, make_micro, microsoft_backbone, prefixed, tutel_state


@pytest.fixture
def env(tmp_path, micro, micro_dir, data_root):
    return {"tmp": tmp_path, "micro": micro, "dir": micro_dir, "data": data_root}


def encode(env, item, **kwargs):
    return env["micro"].encode(item, modality=kwargs.pop("modality", "oct"), **kwargs)


def truncated_cache(env):
    directory = env["tmp"] / "model"
    shutil.copytree(env["dir"], directory)
    blob = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(blob[:1000])
    add_snapshot(env["tmp"] / "cache", "org/broken", "c" * 40, directory, ("main",))
    return load_model("org/broken", cache_dir=env["tmp"] / "cache")


def mismatched(env):
    from safetensors.torch import load_file, save_file

    directory = env["tmp"] / "model"
    shutil.copytree(env["dir"], directory)
    state = load_file(directory / "model.safetensors")
    state["head.fc1_weight"] = state["head.fc1_weight"][:, :, :100].contiguous()
    save_file(state, directory / "model.safetensors")
    return load_model(directory)


def bomb(env, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("L", (100, 100)).save(env["tmp"] / "bomb.png")  # 10,000 pixels: over twice the limit
    return encode(env, env["tmp"] / "bomb.png")


def dicom_variant(env, name, change):
    ds = pydicom.dcmread(env["data"] / "other/pydicom_test_files/CT_small.dcm")
    change(ds)
    ds.save_as(env["tmp"] / name)
    return encode(env, env["tmp"] / name, modality="xray")


def no_pixels(ds):
    del ds.PixelData


def halve_pixels(ds):
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def compressed(syntax):
    def change(ds):
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(32)])
        ds["PixelData"].VR = "OB"
    return change


def save(env, name: str, head: dict) -> Path:
    torch.save({**prefixed("backbone.", microsoft_backbone(0)), **prefixed("head.", head)}, env["tmp"] / name)
    return env["tmp"] / name


DINO_HEAD = {"mlp.0.weight": torch.zeros(8, 256), "last_layer.weight_g": torch.ones(16, 1), "last_layer.weight_v": torch.zeros(16, 256)}


def unassigned(env):
    model = make_micro()
    model.config.expert_modalities = ["xray", "unassigned", "oct", "dermoscopy", "pathology"]
    return model


def backbone_only(env):
    return convert_checkpoint(save(env, "bb.pth", {}), backbone_only=True)


def learner(overrides):
    config = load_config(None, ["model.arch=midol-micro", "model.num_prototypes=64", *overrides])
    student, teacher = build_models(config, torch.device("cpu"))
    return Learner(config, student, teacher, torch.device("cpu"))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class CLIFailed(Exception):
    """The CLI exited non-zero; the message is its one-line error."""


def cli(args):
    import contextlib
    import io

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = cli_main(args)
    if code != 0:
        lines = stderr.getvalue().strip().splitlines()
        raise CLIFailed(f"exit {code}: {lines[-1]}")


CASES = [
    # encode: inputs
    ("unknown modality", lambda e, m: encode(e, np.zeros((8, 8)), modality="mri"), ValueError, "unknown modality 'mri'"),
    ("NaN tensor", lambda e, m: encode(e, torch.full((3, 8, 8), float("nan"))), ImageReadError, r"input\[0\].*NaN or Inf"),
    ("Inf array", lambda e, m: encode(e, np.full((8, 8), np.inf, dtype=np.float32)), ImageReadError, "NaN or Inf"),
    ("five channels", lambda e, m: encode(e, [np.zeros((8, 8, 5), dtype=np.uint8)]), ImageReadError, "no channel axis of size 1, 3 or 4"),
    ("numpy (3, H, W): one image or three?", lambda e, m: encode(e, np.zeros((3, 28, 28), dtype=np.uint8)), ImageReadError,
     r"either one channels-first image or a stack of 3 grayscale images; pass list\(x\).*transpose"),
    ("numpy (1, H, W)", lambda e, m: encode(e, np.zeros((1, 28, 28), dtype=np.uint8)), ImageReadError, r"stack of 1 grayscale"),
    ("numpy (4, H, W)", lambda e, m: encode(e, np.zeros((4, 28, 28), dtype=np.uint8)), ImageReadError,
     r"list\(x\) for a stack.*x\.transpose\(1, 2, 0\)"),
    ("numpy 4-D without a channel axis", lambda e, m: encode(e, np.zeros((2, 5, 7, 9), dtype=np.uint8)), ImageReadError,
     r"4-D array of shape \(2, 5, 7, 9\) has no channel axis"),
    ("non-string modality", lambda e, m: encode(e, np.zeros((8, 8)), modality=3), TypeError, "modality must be a string"),
    ("unknown dtype", lambda e, m: encode(e, np.zeros((8, 8)), dtype="float8"), ValueError, "unknown dtype 'float8'"),
    ("unknown errors mode", lambda e, m: encode(e, np.zeros((8, 8)), errors="ignore"), ValueError, "errors must be 'raise' or 'skip'"),
    ("encode on another device", lambda e, m: encode(e, np.zeros((8, 8)), device="cuda"), ValueError,
     r"encode never moves a model.*model\.to\('cuda'\)"),
    ("fp32 from a bf16 model", lambda e, m: load_model(e["dir"], dtype="bf16").encode(np.zeros((8, 8)), dtype="fp32"),
     ValueError, r"holds bfloat16 weights.*load_model\(\.\.\., dtype='fp32'\)"),
    ("modality without an expert", lambda e, m: unassigned(e).encode(np.zeros((8, 8)), modality="fundus"), ValueError,
     r"no expert for 'fundus'.*modality='auto'"),
    ("embedding of a backbone-only model", lambda e, m: backbone_only(e).encode(np.zeros((8, 8)), output="embedding"),
     ValueError, "converted backbone-only.*output='pooled'"),
    ("5-D array", lambda e, m: encode(e, np.zeros((1, 1, 8, 8, 3))), ImageReadError, "got 5-D"),
    ("0-sized image", lambda e, m: encode(e, np.zeros((0, 8), dtype=np.uint8)), ImageReadError, "image is empty"),
    ("empty list", lambda e, m: encode(e, []), ValueError, "empty list"),
    ("non-image file", lambda e, m: encode(e, write(e["tmp"] / "a.png", b"hello")), ImageReadError, r"a\.png: not an image"),
    ("truncated JPEG", lambda e, m: encode(e, write(e["tmp"] / "t.jpg", (e["data"] / "oct/kermany_oct2017_samples_b/test_cnv.jpeg").read_bytes()[:3000])),
     ImageReadError, r"t\.jpg: could not decode"),
    ("empty file", lambda e, m: encode(e, write(e["tmp"] / "e.png", b"")), ImageReadError, r"e\.png: file is empty"),
    ("missing file", lambda e, m: encode(e, e["tmp"] / "nope.png"), ImageReadError, r"nope\.png: no such file"),
    ("decompression bomb", lambda e, m: bomb(e, m), ImageReadError, r"bomb\.png: image is larger than Pillow's decompression-bomb limit"),
    ("DICOM without pixel data", lambda e, m: dicom_variant(e, "np.dcm", no_pixels), ImageReadError, r"np\.dcm: DICOM file has no pixel data"),
    ("compressed DICOM with damaged data", lambda e, m: dicom_variant(e, "ls.dcm", compressed(JPEGLSLossless)), ImageReadError,
     r"ls\.dcm: DICOM pixel data is damaged or truncated"),
    ("compressed DICOM no decoder handles", lambda e, m: dicom_variant(e, "mc.dcm", compressed(JPEG2000MC)), ImageReadError,
     r"mc\.dcm: cannot decode compressed DICOM pixel data \(JPEG 2000 Part 2.*no decoder"),
    ("truncated uncompressed DICOM", lambda e, m: dicom_variant(e, "half.dcm", halve_pixels), ImageReadError,
     r"half\.dcm: DICOM pixel data is damaged or truncated"),
    ("preprocessed wrong size", lambda e, m: encode(e, torch.zeros(2, 3, 32, 32), preprocessed=True), ImageReadError, r"\(B, 3, 64, 64\)"),
    ("unknown output", lambda e, m: encode(e, np.zeros((8, 8)), output="logits"), ValueError, "unknown output"),
    ("batch size 0", lambda e, m: encode(e, np.zeros((8, 8)), batch_size=0), ValueError, "batch_size must be a positive integer"),
    # load_model
    ("truncated model.safetensors in the Hub cache", lambda e, m: truncated_cache(e), WeightsMismatchError, "truncated"),
    ("config/weights mismatch", lambda e, m: mismatched(e), WeightsMismatchError, r"head\.fc1_weight: file \(5, 512, 100\) vs config \(5, 512, 256\)"),
    ("unknown name offline", lambda e, m: load_model("not-a-model"), ModelNotFoundError, "not a registry name"),
    ("Hub repo not cached offline", lambda e, m: load_model("org/none", cache_dir=e["tmp"]), ModelNotFoundError, "not in the cache"),
    ("registry model without weights", lambda e, m: load_model("midol-swin-tiny"), WeightsNotAvailableError, "pretrained=False"),
    ("missing config", lambda e, m: load_model(e["tmp"]), ModelNotFoundError, r"has no config\.json"),
    # convert
    ("pickle that runs code", lambda e, m: convert_checkpoint(write(e["tmp"] / "x.pth", EVIL)), CheckpointError, "refused to unpickle"),
    ("junk checkpoint", lambda e, m: convert_checkpoint(write(e["tmp"] / "j.pth", b"junk")), CheckpointError, "not a readable PyTorch checkpoint"),
    ("checkpoint without a head", lambda e, m: convert_checkpoint(save(e, "b.pth", {})), CheckpointError,
     r"b\.pth: the checkpoint holds no MoE head.*backbone_only=True"),
    ("checkpoint with a plain DINO head", lambda e, m: convert_checkpoint(save(e, "d.pth", DINO_HEAD)), CheckpointError,
     r"not a Tutel MoE head.*backbone_only=True"),
    ("checkpoint with one rank's experts", lambda e, m: convert_checkpoint(save(e, "r.pth", tutel_state(1, local_experts=2))),
     CheckpointError, r"holds 2 of 5 experts.*backbone_only=True"),
    # calibration
    ("calibrate a one-expert model", lambda e, m: calibrate(make_micro(num_experts=1, top_k=1, expert_modalities=["shared"]),
                                                            {"oct": [np.zeros((8, 8))]}), ValueError, "no experts to calibrate"),
    ("calibrate an unknown modality", lambda e, m: calibrate(make_micro(), {"ultrasound": [np.zeros((8, 8))]}), ValueError,
     "unknown modality 'ultrasound'"),
    ("calibrate with a group per image missing", lambda e, m: calibrate(make_micro(), {"oct": [np.zeros((8, 8))] * 3},
                                                                       {"oct": ["patient 1", "patient 1"]}), ValueError,
     r"groups\['oct'\] has 2 ids for 3 images; give one group per image"),
    # CLI (one-line errors, exit 1)
    ("CLI folder with no images", lambda e, m: cli(["encode", str(e["tmp"]), "--out", str(e["tmp"] / "x.npz")]),
     CLIFailed, r"exit 1: midol: error: .*folder holds no images"),
    ("CLI unwritable output", lambda e, m: cli(["encode", str(e["data"] / "oct"), "--out", "/proc/x.npz", "--random-weights"]),
     CLIFailed, r"exit 1: midol: error: /proc/x\.npz: not writable"),
    ("CLI unknown format", lambda e, m: cli(["encode", str(e["data"] / "oct"), "--out", str(e["tmp"] / "x.csv")]),
     CLIFailed, r"exit 1: midol: error: .*unknown output format \.csv"),
    ("CLI unknown model", lambda e, m: cli(["info", "midol-giant"]), CLIFailed, r"exit 1: midol: error: cannot find model 'midol-giant'"),
    # training data and config
    ("training: data path missing", lambda e, m: open_source(str(e["tmp"] / "absent")), DatasetError, "does not exist"),
    ("training: folder with no images", lambda e, m: open_source(str(e["tmp"])), DatasetError, "holds no images"),
    ("training: npz without arrays", lambda e, m: open_source(str(e["data"] / "pathology/pathmnist_test_subset/pathmnist.npz")),
     DatasetError, "no 'train_images'"),
    ("training: unknown --set key", lambda e, m: load_config(None, ["optim.momentum=0.9"]), ConfigError, "unknown config key 'optim.momentum'"),
    ("training: unknown routing form", lambda e, m: learner(["objective.routing=soft"]), ValueError,
     "routing form must be one of official, balanced"),
    ("training: unknown clip mode", lambda e, m: learner(["optim.clip_mode=layerwise"]), TrainingError,
     "optim.clip_mode must be one of per_param, global"),
    ("training: init of another architecture", lambda e, m: learner(["model.arch=midol-swin-tiny", f"model.init={e['dir']}"]),
     TrainingError, "does not match model.arch"),
]


def _evil_pickle() -> bytes:
    import io
    import os

    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    buffer = io.BytesIO()
    torch.save({"trap": Payload()}, buffer)
    return buffer.getvalue()


EVIL = _evil_pickle()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, action, error, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(env, monkeypatch, name, action, error, message):
    with pytest.raises(error, match=message):
        action(env, monkeypatch)


@pytest.mark.parametrize("shape", [(1, 1), (10, 10000), (10000, 10)])
def test_extreme_sizes_encode_with_an_upscaling_warning(micro, shape):
    """Documented recovery: a 1x1 or a 10000x10 image is encoded, with a MIDoLInputWarning."""
    with pytest.warns(MIDoLInputWarning, match="upscaled"):
        enc = micro.encode(np.full(shape, 128, dtype=np.uint8), modality="dermoscopy")
    assert enc.embedding.shape == (1, 256) and torch.isfinite(enc.embedding).all()


def test_skip_mode_reports_every_bad_input_and_keeps_the_good_ones(micro, tmp_path):
    good = np.zeros((16, 16), dtype=np.uint8)
    bad = [np.full((8, 8), np.nan, dtype=np.float32), tmp_path / "missing.png", np.zeros((8, 8, 5), dtype=np.uint8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = micro.encode([good, *bad, good], modality="oct", errors="skip")
    assert enc.indices == [0, 4] and [f.index for f in enc.failures] == [1, 2, 3]
