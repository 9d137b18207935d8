"""Hub repo ids resolve offline through a Hub cache the test builds itself (the layout huggingface_hub reads)."""

import shutil
from pathlib import Path

import pytest
import torch

import blt
from blt.config import PatchingConfig
from blt.errors import BltError
from blt.weights.hub import resolve
from tests.helpers import random_entropy_model, tiny_config

pytest.importorskip("huggingface_hub")


def cache_repo(hf_home, repo_id, src, revision="main", commit="0" * 39 + "1"):
    """Copy the directory `src` into HF_HOME/hub as the snapshot of `repo_id` at `revision`."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def saved_blt(tmp_path, seed=0, **cfg):
    torch.manual_seed(seed)
    model = blt.BLT(tiny_config(**cfg)).eval()
    model.save_pretrained(tmp_path / f"blt{seed}")
    return model, tmp_path / f"blt{seed}"


def test_a_repo_id_loads_the_cached_snapshot(tmp_path, hub):
    model, src = saved_blt(tmp_path)
    snapshot = cache_repo(hub, "someone/tiny-blt", src)
    assert resolve("someone/tiny-blt") == snapshot
    loaded = blt.load_pretrained("someone/tiny-blt")
    ids = torch.tensor([[1, 70, 80, 90, 100, 110]])
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_a_revision_picks_its_own_snapshot(tmp_path, hub):
    _, main_src = saved_blt(tmp_path, seed=0)
    other, other_src = saved_blt(tmp_path, seed=1)
    cache_repo(hub, "someone/tiny-blt", main_src)
    cache_repo(hub, "someone/tiny-blt", other_src, revision="v2", commit="0" * 39 + "2")
    loaded = blt.load_pretrained("someone/tiny-blt@v2")
    ids = torch.tensor([[1, 70, 80, 90]])
    torch.testing.assert_close(loaded(ids), other(ids), rtol=0, atol=0)


def test_the_entropy_model_comes_from_a_second_repo_id(tmp_path, hub):
    _, src = saved_blt(tmp_path, patching=PatchingConfig(mode="entropy", threshold=2.0))
    entropy = random_entropy_model()
    entropy.save_pretrained(tmp_path / "ent")
    cache_repo(hub, "someone/tiny-blt", src)
    cache_repo(hub, "someone/tiny-entropy", tmp_path / "ent")
    loaded = blt.load_pretrained("someone/tiny-blt", entropy_model="someone/tiny-entropy")
    ids = torch.tensor([[1, 70, 80, 90]])
    torch.testing.assert_close(loaded.entropy_model(ids), entropy(ids), rtol=0, atol=0)
    assert isinstance(blt.load_pretrained("someone/tiny-entropy"), blt.EntropyModel)


def test_a_local_path_wins_over_a_repo_id(tmp_path, hub, monkeypatch):
    model, src = saved_blt(tmp_path)
    (tmp_path / "someone").mkdir()
    shutil.copytree(src, tmp_path / "someone" / "tiny-blt")
    monkeypatch.chdir(tmp_path)
    assert resolve("someone/tiny-blt") == Path("someone/tiny-blt")  # the local folder, not the Hub
    ids = torch.tensor([[1, 70, 80]])
    torch.testing.assert_close(blt.load_pretrained("someone/tiny-blt")(ids), model(ids), rtol=0, atol=0)


def test_an_unknown_repo_id_offline_is_a_clear_error(hub):
    with pytest.raises(BltError, match=r"nobody/missing.*HF_HUB_OFFLINE"):
        blt.load_pretrained("nobody/missing")


def test_the_cli_takes_a_repo_id(tmp_path, hub, capsys):
    from blt.cli import main

    _, src = saved_blt(tmp_path)
    cache_repo(hub, "someone/tiny-blt", src)
    assert main(["generate", "--model", "someone/tiny-blt", "--max-new-bytes", "3", "--device", "cpu", "ab"]) in (
        0,
        None,
    )
    capsys.readouterr()
    assert main(["generate", "--model", "nobody/missing", "--device", "cpu", "hi"]) == 2
    err = capsys.readouterr().err
    assert "nobody/missing" in err and "HF_HUB_OFFLINE" in err and "Traceback" not in err
