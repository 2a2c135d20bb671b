"""Index stage on small real KBs: factory choice, tuned recall, explicit ids, builds in blocks
merged on disk (and their resume after SIGKILL), mismatch detection."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from react_vl.index import (
    build_index,
    choose_factory,
    factory_table,
    load_index,
    stores_on_disk,
)
from react_vl.kb import KnowledgeBase

from helpers import clustered, make_kb




@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    return clustered(12_000, 32, rng), clustered(12_000, 32, rng)


def test_factory_follows_size_and_budget():
    assert choose_factory(5_000, 512, "4GB") == "Flat"
    assert choose_factory(200_000, 512, "4GB") == "HNSW32"
    assert choose_factory(2_000_000, 512, "8GB") == "IVF4096,Flat"       # too many for HNSW
    assert choose_factory(200_000, 512, "420MB") == "HNSW18"            # fewer links to fit the budget
    assert choose_factory(200_000, 512, "400MB") == "IVF2048,Flat"      # not even 16 links fit
    assert choose_factory(1_000_000, 512, "2GB") == "IVF4096,Flat"     # 11 links would fit: too few at 512-d
    large = choose_factory(400_000_000, 512, "64GB")
    assert large.startswith("OPQ") and "_HNSW32,PQ" in large and "IVF" in large
    assert choose_factory(1_000_000, 512, "100MB").endswith("PQ64x8")   # fewer code bytes when tight
    with pytest.raises(ValueError, match="too small"):
        choose_factory(1_000_000, 512, "1MB")


@pytest.mark.parametrize("budget, factory, on_disk", [
    ("4GB", "OPQ64_512,IVF65536_HNSW32,PQ64x8", True),     # raised ValueError before on-disk lists
    ("16GB", "OPQ64_512,IVF65536_HNSW32,PQ64x8", True),    # 400M x 72 B of codes and ids: 26.8 GiB
    ("32GB", "OPQ64_512,IVF65536_HNSW32,PQ64x8", False),
    ("64GB", "OPQ128_512,IVF65536_HNSW32,PQ128x8", False),  # PQ256 would need 98 GiB
])
def test_factory_at_400m_vectors(budget, factory, on_disk):
    assert choose_factory(400_000_000, 512, budget) == factory
    assert stores_on_disk(factory, 400_000_000, 512, budget) == on_disk


def test_factory_table_at_400m():
    table = factory_table(400_000_000, 512, ["16GB", "32GB", "64GB"])
    assert table[0].startswith("| budget | factory | inverted lists | RAM GiB | disk GiB")
    assert "| 16GB | `OPQ64_512,IVF65536_HNSW32,PQ64x8` | disk (mmap) | 0.1 | 26.8 | 8.0 |" in table
    assert "| 64GB | `OPQ128_512,IVF65536_HNSW32,PQ128x8` | RAM | 50.8 | 0.0 | 8.0 |" in table


@pytest.mark.parametrize("budget, expected", [("8MB", "HNSW32"), ("2MB", "IVF512,Flat")])
def test_tuned_params_reach_target_recall(tmp_path, vectors, budget, expected):
    img, text = vectors
    kb = make_kb(tmp_path / "kb", img, text, parts=[0, 1, 2])
    infos = build_index(kb, "image", memory_budget=budget, target_recall=0.9, k=10, n_queries=200)
    assert infos["factory"].startswith(expected)
    assert (tmp_path / "kb" / "image.index.json").exists()
    assert infos["target_reached"] and infos["recall_at_10"] >= 0.9
    # an independent check with fresh queries and numpy exact search, through load_index
    index = load_index(kb, "image")
    queries = clustered(100, 32, np.random.default_rng(1))
    exact = kb.ids()[np.argsort(-queries @ img.T, axis=1)[:, :10]]
    _, found = index.search(queries, 10)
    recall = np.mean([len(np.intersect1d(f, e)) / 10 for f, e in zip(found, exact)])
    assert recall >= infos["recall_at_10"] - 0.1


def test_ids_map_to_metadata_not_file_order(tmp_path, vectors):
    img, text = vectors
    kb = make_kb(tmp_path / "kb", img[:3000], text[:3000], parts=[7, 2, 4])  # written 7, 4, 2
    build_index(kb, "text", target_recall=0.95, n_queries=100)
    index = load_index(kb, "text")
    meta = kb.metadata(["id", "caption"])
    by_id = dict(zip(meta.column("id").to_pylist(), meta.column("caption").to_pylist()))
    rows = np.array([5, 1500, 2999])  # one row from each part (input order: parts 7, 2, 4)
    _, found = index.search(text[rows], 1)
    assert [by_id[i] for i in found[:, 0]] == [f"row {r}" for r in rows]
    assert set(found[:, 0] >> 32) == {7, 2, 4}


def _copy_index(src, dst):
    for name in ("image.index", "image.index.json"):
        shutil.copy(src / name, dst / name)


def test_mismatched_index_is_refused(tmp_path, vectors):
    img, text = vectors
    kb = make_kb(tmp_path / "kb", img[:2000], text[:2000], parts=[0, 1])
    build_index(kb, "image", n_queries=50)
    load_index(kb, "image", mmap_min_bytes=0)  # a matching index loads, here memory-mapped

    cases = [("more", img[:2001], [0, 1], "mini-vit-test", "holds 2000 vectors, the KB 2001"),
             ("renumbered", img[:2000], [0, 3], "mini-vit-test", "ids differ"),
             ("other-model", img[:2000], [0, 1], "mini-vit", "built for model mini-vit-test"),
             ("other-dim", img[:2000, :16], [0, 1], "mini-vit-test", "dimension is 32, the KB's 16")]
    for name, emb, parts, model, message in cases:
        other = make_kb(tmp_path / name, emb, emb, parts=parts, model=model)
        _copy_index(kb.path, other.path)
        with pytest.raises(ValueError, match=message):
            load_index(other, "image")


def _search(index, queries, k=10):
    return index.search(queries, k)


@pytest.mark.parametrize("factory", [None, "IVF64_HNSW32,Flat"])
def test_blocks_merged_on_disk_equal_the_single_build(tmp_path, vectors, factory):
    """Same trained quantizer, same lists: the merged on-disk index searches exactly as the one built in RAM."""
    img, text = vectors
    single = make_kb(tmp_path / "single", img, text, parts=[0, 1, 2])
    blocks = make_kb(tmp_path / "blocks", img, text, parts=[0, 1, 2])
    args = {"memory_budget": "2MB", "target_recall": 0.9, "n_queries": 200, "factory": factory}
    one = build_index(single, "image", **args, shards=1)
    four = build_index(blocks, "image", **args, shards=4, processes=2)
    assert "IVF" in four["factory"] and four["factory"] == one["factory"]
    assert (one["on_disk"], four["on_disk"], four["blocks"]) == (False, True, 4)
    assert (blocks.path / "image.ivfdata").exists() and not (blocks.path / "image.blocks").exists()
    assert four["params"] == one["params"] and four["recall_at_10"] == one["recall_at_10"]

    queries = clustered(200, 32, np.random.default_rng(1))
    expected = _search(load_index(single, "image"), queries)
    found = _search(load_index(blocks, "image"), queries)
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_array_equal(found[0], expected[0])
    # the lists file is found beside the index after the KB moves
    moved = KnowledgeBase(shutil.move(blocks.path, tmp_path / "moved"))
    np.testing.assert_array_equal(_search(load_index(moved, "image"), queries)[1], expected[1])
    (moved.path / "image.ivfdata").unlink()
    with pytest.raises(FileNotFoundError, match="image.ivfdata, which is missing"):
        load_index(moved, "image")


@pytest.mark.slow
def test_killed_block_build_resumes_with_its_finished_blocks(tmp_path):
    """SIGKILL mid-way through the blocks; the rerun keeps the finished ones and ends as a fresh build."""
    rng = np.random.default_rng(2)
    img, text = clustered(160_000, 64, rng), clustered(160_000, 64, rng)
    kb = make_kb(tmp_path / "kb", img, text, parts=[0, 1])
    args = {"memory_budget": "4GB", "n_queries": 100, "factory": "IVF256,Flat", "shards": 8, "processes": 1}
    code = (f"from react_vl.index import build_index; from react_vl.kb import KnowledgeBase; "
            f"build_index(KnowledgeBase({str(kb.path)!r}), 'image', **{args!r})")
    work = kb.path / "image.blocks"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (work / "block_1.index").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(work.glob("block_[0-9]*.index")))
    assert 2 <= finished < 8 and not (kb.path / "image.index").exists()

    resumed = build_index(kb, "image", **args)
    assert resumed["blocks_resumed"] == finished and resumed["on_disk"]
    fresh = make_kb(tmp_path / "fresh", img, text, parts=[0, 1])
    build_index(fresh, "image", **args)
    queries = clustered(100, 64, np.random.default_rng(3))
    np.testing.assert_array_equal(_search(load_index(kb, "image"), queries)[1],
                                  _search(load_index(fresh, "image"), queries)[1])


def test_index_cli_records_the_model_and_builds_in_blocks(tmp_path, vectors):
    """A folder without kb.json: --model records who embedded it; --shards/--processes build in blocks."""
    from click.testing import CliRunner

    from react_vl import cli, models  # noqa: F401  (models registers the package's mini model configs)

    img, text = vectors
    kb = make_kb(tmp_path / "kb", img, text, parts=[0, 1])
    (kb.path / "kb.json").unlink()
    result = CliRunner().invoke(cli.main, ["index", str(kb.path), "--model", "mini-vit-test", "--kind", "image",
                                           "--memory-budget", "2MB", "--shards", "3", "--processes", "2",
                                           "--queries", "100"])
    assert result.exit_code == 0, result.output
    assert "image.index: IVF512,Flat" in result.output and "lists on disk in 3 block(s)" in result.output
    kb = KnowledgeBase(kb.path)
    assert kb.info["model"] == "mini-vit-test" and kb.info["pretrained"] is None
    assert load_index(kb, "image").ntotal == len(img)


def test_kb_without_captions_gets_the_image_index_only(tmp_path, vectors):
    """LAION-5B's image-only folders: tuned on held-out image queries, no text index."""
    from react_vl.index import build_indexes

    img, text = vectors
    kb = make_kb(tmp_path / "kb", img[:3000], text[:3000], parts=[0, 1])
    shutil.rmtree(kb.path / "text_emb")
    infos = build_indexes(kb.path, n_queries=100)
    assert list(infos) == ["image"] and infos["image"]["recall_at_10"] == 1.0  # Flat: exact
    assert not (kb.path / "text.index").exists() and load_index(kb.path, "image").ntotal == 3000
