"""The README's "Use with transformers" snippets run as written, on the shipped model and real images."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.DOTALL)


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
