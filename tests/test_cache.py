import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from qa_lab.cache import ItemCache, build_once, canonical_json, is_finished, stable_hash, stage_key


def test_hash_ignores_key_order_and_nulls():
    assert stable_hash({"a": 1, "b": {"c": 2}}) == stable_hash({"b": {"c": 2}, "a": 1})
    assert stable_hash({"a": 1}) == stable_hash({"a": 1, "z": None})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert canonical_json({"b": 1, "a": [1, None]}) == '{"a":[1,null],"b":1}'.replace(
        ",null", ",null"
    )


def test_stage_key_excludes_and_versions():
    cfg = {"lr": 1e-4, "batch_size": 8, "epochs": 2}
    base = stage_key(cfg, version=1, exclude=("batch_size",))
    assert stage_key({**cfg, "batch_size": 32}, version=1, exclude=("batch_size",)) == base
    assert stage_key({**cfg, "lr": 2e-4}, version=1, exclude=("batch_size",)) != base
    assert stage_key(cfg, version=2, exclude=("batch_size",)) != base
    assert stage_key(cfg, version=1, exclude=("batch_size",), upstream={"data": "x"}) != base


def test_build_once_writes_manifest_last_and_reuses(tmp_path: Path):
    calls = []

    def build(tmp: Path):
        calls.append(tmp)
        (tmp / "out.txt").write_text("hello")
        return {"key": "k"}

    folder, built = build_once(tmp_path / "stage" / "k", build)
    assert built and is_finished(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"out.txt"}
    folder2, built2 = build_once(tmp_path / "stage" / "k", build)
    assert folder2 == folder and not built2 and len(calls) == 1


def test_build_once_leaves_nothing_on_failure(tmp_path: Path):
    def build(tmp: Path):
        (tmp / "partial.txt").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "stage" / "k", build)
    assert not (tmp_path / "stage" / "k").exists()
    assert [p.name for p in (tmp_path / "stage").iterdir()] == ["k.lock"]


def _slow_build(folder: str, log: str) -> None:
    def build(tmp: Path):
        with open(log, "a") as fh:
            fh.write("built\n")
        time.sleep(1.0)
        (tmp / "x").write_text("1")
        return {}

    build_once(Path(folder), build)


def test_build_once_lock_builds_once_across_processes(tmp_path: Path):
    log = tmp_path / "log.txt"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_slow_build, args=(str(tmp_path / "s" / "k"), str(log)))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert log.read_text().count("built") == 1


def test_item_cache_roundtrip_and_persistence(tmp_path: Path):
    cache = ItemCache(tmp_path / "c.sqlite")
    cache.put_many({"a": {"prediction": "x"}, "b": {"prediction": "y"}})
    cache.close()
    again = ItemCache(tmp_path / "c.sqlite")
    assert again.get_many(["a", "c"]) == {"a": {"prediction": "x"}}
    assert len(again) == 2
