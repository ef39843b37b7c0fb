"""The README shows what its commands really do: the quickstart's output, the transformers snippets."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.DOTALL)


def quickstart_blocks() -> list[str]:
    quickstart = README.read_text(encoding="utf-8").split("## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"\n\n```\n(.*?)```", quickstart, re.DOTALL)  # the unlabelled blocks: printed output


def run_quickstart(*args: str) -> str:
    return subprocess.run([sys.executable, str(README.parent / "examples/quickstart.py"), *args], capture_output=True,
                          text=True, check=True).stdout


def test_quickstart_prints_what_the_readme_shows():
    assert run_quickstart() == quickstart_blocks()[0]


def test_quickstart_on_midol_lite_prints_what_the_readme_shows():
    # midol-lite serves the pooled feature: the quickstart once asked every model for the expert embedding
    printed = run_quickstart("--model", "midol-lite")
    assert printed == quickstart_blocks()[1]
    assert all(line.endswith(" pooled shape=(1280,)") for line in printed.splitlines())


def test_use_with_transformers_snippets_run(tmp_path, monkeypatch, data_root):
    blocks = snippets("Use with transformers")
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scan.jpeg").write_bytes((data_root / "oct/kermany_oct2017_samples_b/test_dme.jpeg").read_bytes())
    with np.load(data_root / "xray/pneumoniamnist_balanced_subset/pneumoniamnist.npz") as data:
        images, labels = data["train_images"][:64], data["train_labels"][:64].reshape(-1)
        from PIL import Image

        Image.fromarray(data["test_images"][0]).save(tmp_path / "chest.png")
    first: dict = {}
    exec(blocks[0], first)
    assert first["embedding"].shape == (1, 256) and set(first["inputs"]) == {"pixel_values", "expert_index"}
    assert len(first["routed"][0]) == len(first["pooled"][0]) == len(first["forced"][0]) == 256
    second: dict = {"train_images": images, "train_labels": labels}
    exec(blocks[1], second)
    answer = second["classify"]("chest.png")
    assert {a["label"] for a in answer} == {"normal", "pneumonia"}
    assert (tmp_path / "runs/cxr/model/preprocessor_config.json").is_file()


def test_calibrating_on_your_own_images_snippet_runs(tmp_path, monkeypatch, data_root):
    from collections import Counter

    from midol_hub import load_model
    from training.shared_data import fullres_parts, group_of

    block = textwrap.dedent(next(b for b in snippets("The encode contract") if "calibrate(" in b))  # in a list item
    monkeypatch.chdir(tmp_path)
    train, test = fullres_parts(data_root, "train"), fullres_parts(data_root, "test")
    given = {"fundus_files": train["fundus"], "oct_files": train["oct"],
             "fundus_patients": [group_of(data_root, p) for p in train["fundus"]],
             "oct_patients": [group_of(data_root, p) for p in train["oct"]]}
    exec(block, given)
    assert given["report"]["images_per_modality"] == {"fundus": 38, "oct": 72}
    model = load_model("models/micro-our-clinic")
    assert sorted(set(model.config.expert_modalities)) == ["fundus", "oct", "unassigned"]
    said = {m: Counter(model.encode(test[m], modality="auto").modality) for m in ("fundus", "oct", "pathology")}
    # the README's figures: every fundus and OCT test file named right, 14 of 15 H&E files unknown
    assert said["fundus"] == {"fundus": 16} and said["oct"] == {"oct": 28} and said["pathology"]["unknown"] >= 13


def test_dicom_header_example_shows_what_encode_returns():
    section = README.read_text(encoding="utf-8").split("## The encode contract\n", 1)[1].split("\n## ", 1)[0]
    block = next(b for b in re.findall(r"```python\n(.*?)```", section, re.DOTALL) if "get_testdata_file" in b)
    code = "\n".join(line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#"))
    shown = " ".join(line.strip().lstrip("#").strip() for line in block.splitlines() if line.strip().startswith("#"))
    from midol_hub import load_model

    namespace = {"model": load_model("midol-micro")}
    exec(code.replace("list(zip(", "result = list(zip(", 1), namespace)
    assert repr(namespace["result"]) == shown
