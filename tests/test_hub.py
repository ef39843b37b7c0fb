"""Hub loading through a real huggingface_hub cache laid out on disk, with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import pytest
import torch

from midol_hub import ModelNotFoundError, load_model

from .helpers import COMMIT_NEW, COMMIT_OLD, add_snapshot, make_micro


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """org/midol-test with an old commit (tag v1) and a newer one on main."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    models = {}
    for seed, commit, refs in ((1, COMMIT_OLD, ("v1",)), (2, COMMIT_NEW, ("main",))):
        model = make_micro(seed)
        directory = root / f"model{seed}"
        model.save_pretrained(directory)
        add_snapshot(cache, "org/midol-test", commit, directory, refs)
        models[commit] = model
    return cache, models


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_hub_id_loads_main_from_the_cache(hub_cache):
    cache, models = hub_cache
    model = load_model("org/midol-test", cache_dir=cache)
    assert same(model, models[COMMIT_NEW])
    assert model.provenance.source == "hub"
    assert model.provenance.commit == COMMIT_NEW
    assert model.provenance.location == "org/midol-test"


@pytest.mark.parametrize("spec, kwargs", [
    ("hf-hub:org/midol-test@v1", {}),
    ("org/midol-test", {"revision": "v1"}),
    (f"hf-hub:org/midol-test@{COMMIT_OLD}", {}),
])
def test_revision_pinning_by_tag_or_commit(hub_cache, spec, kwargs):
    cache, models = hub_cache
    model = load_model(spec, cache_dir=cache, **kwargs)
    assert same(model, models[COMMIT_OLD])
    assert model.provenance.commit == COMMIT_OLD


def test_local_files_only_reads_the_cache(hub_cache):
    cache, models = hub_cache
    model = load_model("org/midol-test", cache_dir=cache, local_files_only=True)
    assert same(model, models[COMMIT_NEW])


def test_offline_repo_missing_from_cache_says_how_to_fix(hub_cache):
    cache, _ = hub_cache
    with pytest.raises(ModelNotFoundError, match=r"org/other.*not in the cache.*downloads are off.*prefetch"):
        load_model("org/other", cache_dir=cache)


def test_offline_unknown_revision_is_reported(hub_cache):
    cache, _ = hub_cache
    with pytest.raises(ModelNotFoundError, match=r"org/midol-test@v9"):
        load_model("hf-hub:org/midol-test@v9", cache_dir=cache)


def test_pretrained_false_takes_only_the_config_from_the_hub(hub_cache):
    cache, models = hub_cache
    with pytest.warns(UserWarning, match="random weights"):
        model = load_model("org/midol-test", cache_dir=cache, pretrained=False)
    assert model.config.img_size == 64
    assert not same(model, models[COMMIT_NEW])
