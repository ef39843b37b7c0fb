"""Real archives: the DICOM header decides the modality, multi-frame files expand, nothing is
encoded by its first page, preamble-less DICOM reads. Every file is written here with pydicom
or PIL from real images in ``$MIDOL_DATA``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from midol_hub import ImageReadError, ModalityMismatchError, ModalityMismatchWarning
from midol_hub.modalities import DICOM_MODALITIES
from training.data import open_source

from .helpers import REPO, make_micro, write_dicom

CODES = {"CR": "xray", "DX": "xray", "OP": "fundus", "OPT": "oct", "SM": "pathology", "DMS": "dermoscopy",
         "MG": "unknown", "IO": "unknown", "CT": "unknown", "MR": "unknown", "US": "unknown", "NM": "unknown",
         "PT": "unknown", "XA": "unknown", "RF": "unknown", "ES": "unknown", "OT": "unknown"}
SOURCES = {"xray": "xray/nih_chestxray14_examples/00000001_000.png", "fundus": "fundus/idrid_segmentation_train_cropped/IDRiD_01.jpg",
           "oct": "oct/kermany_oct2017_samples_b/test_cnv.jpeg", "pathology": "pathology/crc_val_he_7k_examples/TUM-TCGA-AAHIDTWA.jpg",
           "dermoscopy": "dermoscopy/isic_uda1_fullres/ISIC_0000001.jpg"}


def real(data_root, modality: str, size: int = 256) -> np.ndarray:
    image = Image.open(data_root / SOURCES[modality])
    image.thumbnail((size, size))
    return np.asarray(image.convert("L" if modality in ("xray", "oct") else "RGB"))


@pytest.fixture(scope="module")
def archive(tmp_path_factory, data_root):
    """One DICOM per Modality code (real pixels of the modality it names, or of an X-ray for the
    others), an OPT volume of 6 real B-scans, a preamble-less CR file and a 3-page TIFF."""
    root = tmp_path_factory.mktemp("archive")
    for code, modality in CODES.items():
        pixels = real(data_root, modality if modality != "unknown" else "xray")
        if code == "DX":
            pixels = (pixels.astype(np.uint16) * 257)  # 16-bit
        write_dicom(root / f"{code}.dcm", pixels, code)
    scans = sorted((data_root / "oct/kermany_oct2017_samples").rglob("*.jpeg"))[:6]
    volume = np.stack([np.asarray(Image.open(p).convert("L").resize((256, 248))) for p in scans])
    write_dicom(root / "volume.dcm", volume, "OPT")
    write_dicom(root / "bare.dcm", real(data_root, "xray"), "CR", preamble=False)
    pages = [Image.open(data_root / SOURCES["pathology"]).rotate(angle) for angle in (0, 90, 180)]
    pages[0].save(root / "stack.tif", save_all=True, append_images=pages[1:])
    return root, volume


def test_every_header_code_routes_as_the_table_says(archive):
    root, _ = archive
    model = make_micro()
    paths = [root / f"{code}.dcm" for code in CODES]
    enc = model.encode(paths)
    assert enc.modality == list(CODES.values())
    assert enc.modality_source == ["dicom"] * len(CODES)
    for code, reason, confidence in zip(CODES, enc.unknown_reason, enc.confidence.tolist()):
        if CODES[code] == "unknown":
            assert reason == f"DICOM Modality {code} is not one of the five"
        else:
            assert reason is None and confidence == 1.0
            assert enc.expert_index[list(CODES).index(code)] == model.config.expert_for(CODES[code])
    assert {code: DICOM_MODALITIES.get(code, "unknown") for code in CODES} == CODES


def test_external_camera_photographs_are_left_to_the_router(archive, data_root, tmp_path):
    write_dicom(tmp_path / "xc.dcm", real(data_root, "dermoscopy"), "XC")
    enc = make_micro().encode(tmp_path / "xc.dcm")
    assert enc.modality_source == ["router"] and DICOM_MODALITIES["XC"] is None


def test_header_rows_use_their_modalitys_preprocessing(archive, data_root):
    root, _ = archive
    model = make_micro()
    from_header = model.encode(root / "OP.dcm", output="embedding").embedding
    forced = model.encode(real(data_root, "fundus"), modality="fundus").embedding
    torch.testing.assert_close(from_header, forced, atol=1e-5, rtol=0)


def test_a_forced_modality_that_the_header_contradicts_warns_or_raises(archive):
    root, _ = archive
    model = make_micro()
    with pytest.warns(ModalityMismatchWarning, match=r"contradict their DICOM header.*OP.dcm: its DICOM header says Modality OP \(fundus\)"):
        enc = model.encode([root / "OP.dcm", root / "CR.dcm"], modality="xray")
    assert enc.modality == ["xray", "xray"] and enc.modality_source == ["forced", "forced"]
    with pytest.raises(ModalityMismatchError, match="DICOM header says Modality OP"):
        model.encode(root / "OP.dcm", modality="xray", strict_modality=True)


def test_a_multi_frame_volume_expands_and_equals_its_frames_one_by_one(archive):
    root, volume = archive
    model = make_micro()
    with pytest.raises(ImageReadError, match=r"volume\.dcm: multi-frame DICOM with 6 frames; pass frames='all'"):
        model.encode(root / "volume.dcm")
    enc = model.encode([root / "CR.dcm", root / "volume.dcm"], frames="all", output=("embedding", "pooled"))
    assert enc.indices == [0, 1, 1, 1, 1, 1, 1] and enc.frames == [None, 0, 1, 2, 3, 4, 5]
    assert enc.modality[1:] == ["oct"] * 6 and enc.modality_source[1:] == ["dicom"] * 6
    one_by_one = model.encode(list(volume), modality="oct", output=("embedding", "pooled"))
    torch.testing.assert_close(enc.embedding[1:], one_by_one.embedding, atol=1e-5, rtol=0)
    torch.testing.assert_close(enc.pooled[1:], one_by_one.pooled, atol=1e-5, rtol=0)
    middle = model.encode(root / "volume.dcm", frames="middle")
    assert middle.frames == [3]
    torch.testing.assert_close(middle.embedding, enc.embedding[4:5], atol=1e-5, rtol=0)
    assert model.encode(root / "volume.dcm", frames=5).frames == [5]
    with pytest.raises(ImageReadError, match="has 6 frame\\(s\\); frame 9 does not exist"):
        model.encode(root / "volume.dcm", frames=9)


def test_multi_page_tiffs_and_animated_images_expand_too(archive, tmp_path):
    root, _ = archive
    model = make_micro()
    with pytest.raises(ImageReadError, match=r"stack\.tif: holds 3 frames .*frames='all'"):
        model.encode(root / "stack.tif", modality="pathology")
    enc = model.encode(root / "stack.tif", modality="pathology", frames="all")
    pages = [Image.open(root / "stack.tif") for _ in range(3)]
    for page, image in enumerate(pages):
        image.seek(page)
    expected = model.encode([np.asarray(image.convert("RGB")) for image in pages], modality="pathology").embedding
    torch.testing.assert_close(enc.embedding, expected, atol=1e-5, rtol=0)
    frames = [Image.fromarray(np.full((32, 32, 3), v, dtype=np.uint8)) for v in (20, 120, 220)]
    frames[0].save(tmp_path / "cine.gif", save_all=True, append_images=frames[1:])
    assert model.encode(tmp_path / "cine.gif", frames="all").frames == [0, 1, 2]
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        partial = model.encode([root / "stack.tif", root / "CR.dcm"], errors="skip")
    assert partial.indices == [1] and "frames='all'" in partial.failures[0].error


def test_preamble_less_dicom_reads_and_junk_stays_an_error(archive, tmp_path):
    root, _ = archive
    raw = (root / "bare.dcm").read_bytes()
    assert raw[128:132] != b"DICM" and raw[:4] != b"DICM"  # really written without the preamble
    model = make_micro()
    enc = model.encode([root / "bare.dcm", root / "CR.dcm"], output="pooled")
    assert enc.modality == ["xray", "xray"]
    torch.testing.assert_close(enc.pooled[0], enc.pooled[1])  # the same pixels as the file with a preamble
    (tmp_path / "bare").write_bytes(raw)  # no suffix either
    assert model.encode(tmp_path / "bare").modality == ["xray"]
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 300)
    with pytest.raises(ImageReadError, match=r"junk\.dcm: not a readable DICOM file"):
        model.encode(tmp_path / "junk.dcm")


def test_midol_encode_expands_frames_and_records_source_and_frame(archive, tmp_path):
    root, _ = archive
    out = tmp_path / "feats.npz"
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("CR.dcm", "US.dcm", "volume.dcm"):
        (folder / name).write_bytes((root / name).read_bytes())
    command = [sys.executable, "-m", "midol_hub.cli", "encode", str(folder), "--out", str(out), "--random-weights",
               "--workers", "0"]
    refused = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert refused.returncode == 1 and "volume.dcm: multi-frame DICOM with 6 frames; pass frames='all'" in refused.stderr
    done = subprocess.run([*command, "--frames", "all"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.with_name(out.name + ".manifest.json").read_text())["rows"]
    assert [(r["path"].rsplit("/", 1)[1], r["frame"]) for r in rows] == [("CR.dcm", None), ("US.dcm", None)] + [
        ("volume.dcm", f) for f in range(6)]
    assert [r["modality_source"] for r in rows] == ["dicom"] * 8
    assert rows[1]["modality"] == "unknown" and rows[1]["unknown_reason"] == "DICOM Modality US is not one of the five"
    data = np.load(out)
    assert data["pooled"].shape == (8, 256) and list(data["frames"]) == [-1, -1, 0, 1, 2, 3, 4, 5]
    assert list(data["source"]) == ["dicom"] * 8


def test_training_data_names_multi_frame_files_or_takes_every_frame(archive, tmp_path):
    root, _ = archive
    folder = tmp_path / "train"
    folder.mkdir()
    for name in ("stack.tif", "CR.dcm"):
        (folder / name).write_bytes((root / name).read_bytes())
    with pytest.raises(ValueError, match=r"stack\.tif holds 3 frames; train on every frame with --set data\.frames=all"):
        open_source(str(folder))
    source = open_source(str(folder), frames="all")
    assert len(source) == 4 and source.name(1) == f"{folder / 'stack.tif'}[frame 0]"
    pixels = [source.read(i) for i in range(1, 4)]
    assert not np.array_equal(pixels[0], pixels[1])  # three different pages, not the first one thrice


def test_midol_encode_warns_when_a_forced_modality_contradicts_the_header(archive, tmp_path):
    root, _ = archive
    out = tmp_path / "feats.npz"
    result = subprocess.run([sys.executable, "-m", "midol_hub.cli", "encode", str(root / "OP.dcm"), str(root / "CR.dcm"),
                             "--modality", "xray", "--out", str(out), "--random-weights", "--workers", "0"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "1 file(s) encoded as 'xray' contradict their DICOM header, first:" in result.stderr
    assert "OP.dcm: its DICOM header says Modality OP (fundus)" in result.stderr
