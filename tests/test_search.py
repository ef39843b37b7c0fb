"""Similar-case search: `midol index` and `midol search` on a real folder of mixed modalities."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from midol_hub import ImageIndex, IndexDamagedError, IndexMismatchError, load_model
from midol_hub.search import RECALL_TARGET, build_faiss_index
from midol_hub.utils import image_files

from .helpers import REPO, kill_after_parts, midol, torchrun

FOLDERS = {"xray/nih_chestxray14_examples": 2, "fundus/idrid_segmentation_train_cropped": 6,
           "oct/kermany_oct2017_samples": 8, "dermoscopy/isic_uda1_fullres": 6, "pathology/crc_val_he_7k_examples": 6,
           "other/skimage_natural_photos": 3}



@pytest.fixture(scope="module")
def archive(tmp_path_factory, data_root) -> Path:
    """28 real files of all five modalities and three photos, copied into one folder, with a labels CSV."""
    root = tmp_path_factory.mktemp("archive")
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "source"])
        for folder, count in FOLDERS.items():
            for path in image_files(data_root / folder)[:count]:
                target = root / "images" / f"{folder.split('/')[0]}-{path.name}"
                target.parent.mkdir(exist_ok=True)
                shutil.copy(path, target)
                writer.writerow([f"images/{target.name}", folder.split("/")[1]])
    return root


def build(archive: Path, index: Path, *backend: str) -> Path:
    result = midol("index", "build", str(archive / "images"), "--index", str(index), "--labels",
                   str(archive / "labels.csv"), "--part-size", "8", "--workers", "1", *backend)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "indexed 31 new row(s)" in result.stdout
    return index


@pytest.fixture(scope="module")
def faiss_index(archive, tmp_path_factory) -> Path:
    return build(archive, tmp_path_factory.mktemp("faiss") / "idx")


@pytest.fixture(scope="module", params=["faiss", "milvus"])
def built(request, archive, faiss_index, tmp_path_factory) -> Path:
    """The same archive indexed with FAISS and with Milvus (milvus-lite, the embedded Milvus with the client API of a cluster)."""
    if request.param == "faiss":
        return faiss_index
    root = tmp_path_factory.mktemp("milvus")
    return build(archive, root / "idx", "--backend", "milvus", "--uri", str(root / "cases.db"), "--collection", "cases")


def test_a_query_finds_itself_first_and_only_its_modality(built, archive, tmp_path):
    images = archive / "images"
    queries = [str(images / "dermoscopy-ISIC_0000001.jpg"), str(sorted(images.glob("oct-*"))[0]),
               str(images / "pathology-BACK-TCGA-ACTQDGTI.jpg")]
    result = midol("search", *queries, "--index", str(built), "-k", "5", "--json", "--show", str(tmp_path / "hits.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    answers = json.loads(result.stdout)
    rows = ImageIndex(built).counts()
    for query, answer in zip(queries, answers):
        first = answer["neighbours"][0]
        assert first["path"] == query and abs(first["score"] - 1) < 1e-5 and first["rank"] == 1
        assert {n["modality"] for n in answer["neighbours"]} == {answer["modality"]}
        assert len(answer["neighbours"]) == min(5, rows[answer["modality"]])
        assert [n["rank"] for n in answer["neighbours"]] == list(range(1, len(answer["neighbours"]) + 1))
        assert all(a["score"] >= b["score"] for a, b in zip(answer["neighbours"], answer["neighbours"][1:]))
        assert set(first) == {"path", "score", "modality", "rank", "source"}
    assert [a["modality"] for a in answers] == ["dermoscopy", "oct", "pathology"]
    assert Image.open(tmp_path / "hits.png").size[0] > 1000


def test_unknown_images_are_stored_but_searched_only_when_asked(built, archive):
    index, model = ImageIndex(built), load_model("midol-micro")
    photo = str(archive / "images" / "other-astronaut.png")
    hits, modalities = index.search(model, [photo])
    assert modalities == ["unknown"] and hits == [[]]
    assert index.counts().get("unknown", 0) >= 1
    hits, _ = index.search(model, [photo], include_unknown=True)
    assert hits[0][0].path == photo and abs(hits[0][0].score - 1) < 1e-5


def test_an_index_of_expert_embeddings_scores_by_their_cosine(faiss_index, archive, tmp_path):
    """``--output embedding`` indexes the expert embedding instead of the default (midol-micro's
    pooled backbone feature): the scores are the embeddings' cosines, and search encodes queries
    the same way."""
    images = sorted((archive / "images").glob("oct-*")) + sorted((archive / "images").glob("fundus-*"))
    result = midol("index", "build", *map(str, images), "--index", str(tmp_path / "embedded"), "--output", "embedding",
                   "--workers", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    index, model = ImageIndex(tmp_path / "embedded"), load_model("midol-micro")
    assert index.output == "embedding" and ImageIndex(faiss_index).output == model.config.default_feature == "pooled"
    shown = midol("index", "info", str(tmp_path / "embedded"))
    assert "embedding vectors of dimension 256" in shown.stdout
    query = str(images[0])
    hits, modalities = index.search(model, [query], k=4)
    embedded = model.encode([query] + [hit.path for hit in hits[0]], output="embedding").embedding
    cosines = torch.nn.functional.normalize(embedded, dim=-1) @ torch.nn.functional.normalize(embedded[0], dim=0)
    assert hits[0][0].path == query and modalities == ["oct"]
    np.testing.assert_allclose([hit.score for hit in hits[0]], cosines[1:].numpy(), atol=1e-5)
    pooled = ImageIndex(faiss_index).search(model, [query], k=4)[0][0]
    assert [hit.score for hit in pooled] != pytest.approx([hit.score for hit in hits[0]], abs=1e-4)
    with pytest.raises(ValueError, match="output must be one of embedding, pooled"):
        ImageIndex.create(tmp_path / "bad", model, output="patch_tokens")


def test_search_says_why_an_unknown_query_has_no_neighbours(faiss_index, archive):
    shown = midol("search", str(archive / "images" / "other-astronaut.png"), "--index", str(faiss_index))
    assert shown.returncode == 0 and "(unknown): not searched" in shown.stdout and "--include-unknown" in shown.stdout


def test_add_skips_files_already_indexed_by_content(built, archive, tmp_path, data_root):
    backend = ImageIndex(built).manifest["backend"]
    options = ["--backend", "milvus", "--uri", str(tmp_path / "cases.db")] if backend == "milvus" else []
    first = tmp_path / "first"
    first.mkdir()
    for name in ("dermoscopy-ISIC_0000001.jpg", "pathology-BACK-TCGA-ACTQDGTI.jpg"):
        shutil.copy(archive / "images" / name, first / name)
    assert midol("index", "build", str(first), "--index", str(tmp_path / "idx"), *options).returncode == 0
    extra = tmp_path / "more"
    extra.mkdir()
    shutil.copy(first / "dermoscopy-ISIC_0000001.jpg", extra / "renamed.jpg")  # same content, new name
    shutil.copy(image_files(data_root / "dermoscopy/isic_uda1_fullres")[7], extra / "new.jpg")
    result = midol("index", "add", str(tmp_path / "idx"), str(extra), "--labels", str(archive / "labels.csv"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "indexed 1 new row(s)" in result.stdout and "(1 file(s) already there)" in result.stdout
    assert "2 of 2 file(s) have no row in the labels CSV" in result.stderr  # said, not silently unlabelled
    assert ImageIndex(tmp_path / "idx").counts() == {"dermoscopy": 2, "pathology": 1}


def test_other_weights_are_refused(built):
    random_model = load_model("midol-micro", pretrained=False)
    with pytest.raises(IndexMismatchError, match="other weights"):
        ImageIndex(built).search(random_model, [np.zeros((64, 64), np.uint8)])


def test_a_milvus_collection_of_other_weights_is_refused(tmp_path):
    model, other = load_model("midol-micro"), load_model("midol-micro", pretrained=False)
    uri = str(tmp_path / "shared.db")
    index = ImageIndex.create(tmp_path / "site-a", model, backend="milvus", uri=uri, collection="cases")
    rows = [{"path": "a.png", "sha256": "0" * 64, "frame": None, "modality": "oct", "modality_source": "router",
             "confidence": 0.9}]
    assert index.add_rows(rows, np.ones((1, model.config.num_features), np.float32)) == 1
    assert index.add_rows(rows, np.ones((1, model.config.num_features), np.float32)) == 0  # same content: skipped
    del index
    with pytest.raises(IndexMismatchError, match="collection cases_oct"):  # a second site with other weights
        ImageIndex.create(tmp_path / "site-b", other, backend="milvus", uri=uri, collection="cases")


def test_damage_is_named_and_derived_files_are_rebuilt(faiss_index, tmp_path):
    built = faiss_index
    result = midol("search", str(REPO / "README.md"), "--index", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "not an index" in result.stderr
    broken = tmp_path / "broken"
    shutil.copytree(built, broken)
    (broken / "rows.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(IndexDamagedError, match="rows.sqlite"):
        ImageIndex(broken)
    stale = tmp_path / "stale"
    shutil.copytree(built, stale)
    for cached in (stale / "faiss").glob("*.faiss"):
        cached.write_bytes(b"damaged")  # a derived file: rebuilt from the table
    index = ImageIndex(stale)
    with sqlite3.connect(stale / "rows.sqlite") as db:
        (path,) = db.execute("SELECT path FROM rows WHERE modality = 'oct' LIMIT 1").fetchone()
    hits, _ = index.search(load_model("midol-micro"), [path], modality="oct")
    assert hits[0][0].path == path


def test_a_killed_build_resumes_to_the_same_index(faiss_index, archive, tmp_path):
    built = faiss_index
    target = tmp_path / "idx"
    command = ["index", "build", str(archive / "images"), "--index", str(target), "--labels", str(archive / "labels.csv"),
               "--batch-size", "2", "--part-size", "2", "--workers", "1"]
    parts = target / "pending.npz.parts"
    kill_after_parts(command, parts, 2)
    assert (target / "pending.json").is_file() and len(ImageIndex(target)) == 0
    again = midol("index", "add", str(target), str(archive / "images"))
    assert again.returncode == 1 and "--resume" in again.stderr
    resumed = midol(*command, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (target / "pending.json").exists() and not parts.exists()
    assert table(target) == table(built)
    mine, theirs = embeddings(target), embeddings(built)
    assert max(float(np.abs(mine[p] - theirs[p]).max()) for p in mine) < 1e-5


def table(directory: Path) -> list:
    with sqlite3.connect(directory / "rows.sqlite") as db:
        return sorted(db.execute("SELECT path, sha256, frame, modality, source, labels FROM rows"))


def embeddings(directory: Path) -> dict[str, np.ndarray]:
    with sqlite3.connect(directory / "rows.sqlite") as db:
        return {path: np.frombuffer(blob, np.float32) for path, blob in db.execute("SELECT path, embedding FROM rows")}


@pytest.mark.distributed
def test_two_torchrun_ranks_build_what_one_process_builds(faiss_index, archive, tmp_path):
    torchrun("-m", "midol_hub.cli", "index", "build", str(archive / "images"), "--index", str(tmp_path / "idx"),
             "--labels", str(archive / "labels.csv"), "--part-size", "4", "--workers", "0")
    assert table(tmp_path / "idx") == table(faiss_index)
    mine, theirs = embeddings(tmp_path / "idx"), embeddings(faiss_index)
    assert max(float(np.abs(mine[p] - theirs[p]).max()) for p in mine) < 1e-5
    assert not (tmp_path / "idx" / "pending.json").exists()


@pytest.mark.distributed
def test_two_torchrun_ranks_fill_one_milvus(faiss_index, archive, tmp_path):
    torchrun("-m", "midol_hub.cli", "index", "build", str(archive / "images"), "--index", str(tmp_path / "idx"),
             "--backend", "milvus", "--uri", str(tmp_path / "cases.db"), "--part-size", "4", "--workers", "0")
    with ImageIndex(tmp_path / "idx") as index:
        assert index.counts() == ImageIndex(faiss_index).counts()
        query = str(archive / "images" / "dermoscopy-ISIC_0000001.jpg")
        hits, _ = index.search(load_model("midol-micro"), [query])
        assert hits[0][0].path == query and abs(hits[0][0].score - 1) < 1e-5


def test_the_approximate_index_reaches_its_recall_target():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((200, 256)).astype(np.float32)
    vectors = centres[rng.integers(0, 200, 30_000)] + 0.5 * rng.standard_normal((30_000, 256)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index, built = build_faiss_index(vectors, exact_limit=10_000)
    assert built["kind"] == "ivf-flat" and built["tuned_recall_at_10"] >= RECALL_TARGET
    queries = vectors[:300] + 0.05 * rng.standard_normal((300, 256)).astype(np.float32)
    exact, _ = build_faiss_index(vectors, exact_limit=10**9)
    _, truth = exact.search(queries, 10)
    _, found = index.search(queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found)]) >= RECALL_TARGET


def test_retrieval_scores_by_hand():
    from midol_hub import retrieval_scores

    gallery = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = np.array([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.05]])  # ranks the gallery 0, 1, 3, 2: labels 0, 1, 0, 1
    scores = retrieval_scores(gallery, labels, query, np.array([0]), k=3)
    assert scores["precision@3"] == pytest.approx(2 / 3)
    assert scores["mAP@3"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # hits at ranks 1 and 3; 2 relevant in the gallery
