"""`midol encode` on archives: decoding workers, parts written as it goes, resume after a kill,
and two ranks under torchrun giving what one process gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from .helpers import kill_after_parts, midol, torchrun



@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_root) -> Path:
    out = tmp_path_factory.mktemp("straight") / "feats.npz"
    result = midol("encode", str(data_root / "oct"), "--out", str(out), "--output", "embedding,pooled,routing",
                   "--batch-size", "4", "--part-size", "8", "--workers", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def same_outputs(a: Path, b: Path) -> None:
    first, second = np.load(a), np.load(b)
    assert first.files == second.files
    for name in first.files:
        if first[name].dtype.kind == "f":
            np.testing.assert_allclose(first[name], second[name], atol=1e-5)
        else:
            assert (first[name] == second[name]).all(), name
    manifests = [json.loads(Path(str(p) + ".manifest.json").read_text()) for p in (a, b)]
    assert [(r["path"], r["modality"]) for r in manifests[0]["rows"]] == [(r["path"], r["modality"]) for r in manifests[1]["rows"]]


def test_straight_run_keeps_input_order_and_leaves_no_parts(straight, data_root):
    data = np.load(straight)
    expected = sorted(str(p) for p in (data_root / "oct").rglob("*.jpeg"))
    assert data["paths"].tolist() == expected and data["embedding"].shape == (100, 256)
    assert not straight.with_name(straight.name + ".parts").exists()


def test_a_killed_encode_resumes_where_it_stopped(straight, data_root, tmp_path):
    out = tmp_path / "feats.npz"
    parts = tmp_path / "feats.npz.parts"
    written = kill_after_parts(["encode", str(data_root / "oct"), "--out", str(out), "--output", "embedding,pooled,routing",
                                "--batch-size", "4", "--part-size", "8", "--workers", "1"], parts, 3)
    assert 3 <= written < 13 and not out.exists()  # killed half-way: some parts, no output
    again = midol("encode", str(data_root / "oct"), "--out", str(out), "--output", "embedding,pooled,routing")
    assert again.returncode == 1 and "pass --resume" in again.stderr
    resumed = midol("encode", str(data_root / "oct"), "--out", str(out), "--output", "embedding,pooled,routing",
                    "--batch-size", "4", "--part-size", "8", "--workers", "1", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed: {written * 8} file(s) were already encoded" in resumed.stderr
    same_outputs(out, straight)


@pytest.mark.distributed
def test_two_ranks_give_what_one_process_gives(straight, data_root, tmp_path):
    out = tmp_path / "feats.npz"
    torchrun("-m", "midol_hub.cli", "encode", str(data_root / "oct"), "--out", str(out), "--output", "embedding,pooled,routing",
             "--batch-size", "4", "--part-size", "8", "--workers", "0")
    same_outputs(out, straight)


def test_forward_batches_hold_batch_size_rows_across_files_and_frames(micro, data_root, tmp_path, monkeypatch):
    """Every file also sends a closing item; batches counted in items halved the forward's batch
    (``--batch-size 4`` gave forwards of 2 images). A multi-frame file's rows may span batches."""
    from PIL import Image

    from midol_hub import bulk

    files = sorted(str(p) for p in (data_root / "oct").rglob("*.jpeg"))[:10]
    stack = tmp_path / "stack.tif"
    pages = [Image.open(path).convert("L") for path in files[:6]]
    pages[0].save(stack, save_all=True, append_images=pages[1:])
    sizes = []
    encode_planned = bulk.encode_planned
    monkeypatch.setattr(bulk, "encode_planned", lambda model, pixels, *rest, **kw: sizes.append(len(pixels)) or encode_planned(model, pixels, *rest, **kw))
    out = tmp_path / "feats.npz"
    bulk.encode_files(micro, [*files, str(stack)], out, modality="oct", outputs=("embedding",), batch_size=4,
                      workers=0, frames="all", progress=False)
    merged = bulk.merge_parts(out, [*files, str(stack)], ("embedding",))
    assert sizes == [4, 4, 4, 4]  # 10 files + 6 frames
    assert [(r["path"], r["frame"]) for r in merged.rows] == [(f, None) for f in files] + [(str(stack), i) for i in range(6)]
    one_by_one = micro.encode([*files, stack], modality="oct", frames="all", batch_size=1).embedding
    np.testing.assert_allclose(merged.arrays["embedding"], one_by_one.numpy(), atol=1e-5)


def test_forward_streams_give_what_one_forward_gives(micro, data_root, tmp_path, monkeypatch):
    """Forwards run in ``streams`` threads, each with its share of torch's threads; results are
    taken in the loader's order, so rows match one forward at a time, and torch's thread count
    is restored afterwards."""
    import torch

    from midol_hub import bulk

    files = sorted(str(p) for p in (data_root / "oct").rglob("*.jpeg"))[:22]
    threads_seen = []
    encode_planned = bulk.encode_planned
    monkeypatch.setattr(bulk, "encode_planned", lambda *args, **kw: threads_seen.append(torch.get_num_threads()) or encode_planned(*args, **kw))
    threads = torch.get_num_threads()
    merged = {}
    for streams in (1, 3):
        out = tmp_path / f"streams-{streams}.npz"
        bulk.encode_files(micro, files, out, modality="auto", outputs=("embedding", "routing"), batch_size=4, workers=0,
                          part_size=8, progress=False, streams=streams)
        assert [p.name.split("-")[3] for p in sorted(bulk.parts_dir(out).iterdir()) if p.suffix == ".npz"] == ["000000", "000001", "000002"]
        merged[streams] = bulk.merge_parts(out, files, ("embedding", "routing"))
        assert torch.get_num_threads() == threads
    assert threads_seen == [threads] * 6 + [max(1, threads // 3)] * 6  # 22 files in batches of 4
    assert merged[1].rows == merged[3].rows and len(merged[1].rows) == 22
    for name in ("embedding", "routing"):
        np.testing.assert_allclose(merged[3].arrays[name], merged[1].arrays[name], atol=1e-5)
