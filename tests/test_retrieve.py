"""Retrieve stage on a real FAISS-indexed KB whose pairs are planted around the task's real query embeddings."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_index import make_kb

from react_vl.cli import main
from react_vl.index import build_indexes
from react_vl.kb import KnowledgeBase
from react_vl.retrieve import cap_per_class, encode_queries, retrieve
from react_vl.tasks import Task

TASK = Task("planted-shapes", ["circle", "square", "star"], ["a photo of a {}.", "a drawing of a {}."])
PER_CLASS = 30


def _normalise(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """KB: 30 pairs per class near the class's query embeddings (caption and image), 600 random
    pairs, 10 'star' captions with random images (only t2t finds them), and one near-duplicate
    image of circle pair 0 under another id."""
    root = tmp_path_factory.mktemp("retrieve")
    rng = np.random.default_rng(0)
    probe = make_kb(root / "probe", _normalise(rng.standard_normal((4, 32))), _normalise(rng.standard_normal((4, 32))), [0])
    _, query_class, queries = encode_queries(probe, TASK)
    centres = _normalise(np.stack([queries[query_class == c].mean(0) for c in range(3)]))

    def near(centre, n, spread=0.05):
        return _normalise(centre + spread * rng.standard_normal((n, 32)) / np.sqrt(32))

    img, text, captions = [], [], []
    for c, name in enumerate(TASK.classnames):
        img.append(near(centres[c], PER_CLASS)), text.append(near(centres[c], PER_CLASS))
        captions += [f"{name} {i}" for i in range(PER_CLASS)]
    img.append(_normalise(rng.standard_normal((600, 32)))), text.append(_normalise(rng.standard_normal((600, 32))))
    captions += [f"noise {i}" for i in range(600)]
    img.append(_normalise(rng.standard_normal((10, 32)))), text.append(near(centres[2], 10))
    captions += [f"star caption random image {i}" for i in range(10)]
    img.append(_normalise(img[0][:1] + 0.001 * rng.standard_normal((1, 32)))), text.append(text[0][:1])
    captions += ["circle duplicate"]
    img, text = np.concatenate(img), np.concatenate(text)
    kb = make_kb(root / "kb", img, text, parts=[3, 1], captions=captions)  # parts written out of order
    build_indexes(kb.path, n_queries=50)
    return kb, img


def _read(out):
    return pq.read_table(out / "retrieved.parquet").to_pylist()


@pytest.mark.parametrize("mode", ["t2t", "t2i", "both"])
def test_modes_retrieve_the_planted_classes(planted, tmp_path, mode):
    kb, _ = planted
    summary = retrieve(kb.path, TASK, tmp_path, mode=mode, k=PER_CLASS, dedup_threshold=None)
    rows = _read(tmp_path)
    assert len(rows) == summary["retrieved"] and set(rows[0]) >= {"id", "key", "caption", "shard", "score",
                                                                 "classes", "queries", "modes"}
    for name in TASK.classnames:
        found = [r["caption"] for r in rows if name in r["classes"]]
        precision = np.mean([c.startswith(name) or (name == "star" and c.startswith("star caption")) for c in found])
        assert len(found) >= 25 and precision >= 0.9, (name, len(found), precision)
    assert all(set(r["modes"]) <= ({"t2t", "t2i"} if mode == "both" else {mode}) for r in rows)
    random_image = [r for r in rows if r["caption"].startswith("star caption")]
    if mode == "t2i":
        assert not random_image and all(r["score_t2t"] is None for r in rows)
    else:
        assert len(random_image) == 10 and all(r["modes"] == ["t2t"] for r in random_image)
    if mode == "both":
        assert 0 < summary["t2t_t2i_overlap"] < summary["unique_candidates"]
    # the metadata comes by id: each caption is the one written with that row's embeddings
    meta = {r["id"]: r["caption"] for r in KnowledgeBase(kb.path).metadata(["id", "caption"]).to_pylist()}
    assert all(meta[r["id"]] == r["caption"] for r in rows)


def test_filters_remove_and_count(planted, tmp_path):
    kb, img = planted
    eval_emb = _normalise(img[[1, 2, PER_CLASS + 1]] + 0.0005 * np.random.default_rng(1).standard_normal((3, 32)))
    np.save(tmp_path / "eval.npy", eval_emb)
    summary = retrieve(kb.path, TASK, tmp_path / "r", mode="both", k=PER_CLASS, min_clip_score=0.5,
                       eval_set=tmp_path / "eval.npy", eval_threshold=0.9999, dedup_threshold=0.9999)
    captions = {r["caption"] for r in _read(tmp_path / "r")}
    assert summary["removed"]["eval_overlap"] == 3
    assert not captions & {"circle 1", "circle 2", "square 1"}
    assert summary["removed"]["clip_score"] >= 10 and not any(c.startswith("star caption") for c in captions)
    assert summary["removed"]["near_duplicate"] == 1
    assert ("circle 0" in captions) != ("circle duplicate" in captions)


def test_per_class_keeps_each_class_best(planted, tmp_path):
    kb, _ = planted
    summary = retrieve(kb.path, TASK, tmp_path, per_class=10, dedup_threshold=None)
    rows = _read(tmp_path)
    assert summary["per_class_counts"] == {name: 10 for name in TASK.classnames}
    for name in TASK.classnames:
        mine = [r for r in rows if name in r["classes"]]
        assert len(mine) == 10 and all(r["caption"].startswith(name) for r in mine)


def test_per_class_takes_both_modes_in_turn():
    """t2t scores (text-text cosines) run far above t2i ones; a class's quota must still hold both modes' best."""
    import pyarrow as pa
    hits = pa.table({"query": [0] * 8, "id": [1, 2, 3, 4, 5, 6, 7, 8],
                     "score": [0.99, 0.98, 0.97, 0.96, 0.31, 0.30, 0.29, 0.28],
                     "mode": ["t2t"] * 4 + ["t2i"] * 4, "class": [0] * 8})
    pairs = pa.table({"id": list(range(1, 9)), "class_distinct": [[0]] * 8})
    kept, rows = cap_per_class(pairs, np.arange(8), hits, per_class=4)
    assert sorted(kept.column("id").to_pylist()) == [1, 2, 5, 6] and sorted(rows.tolist()) == [0, 1, 4, 5]


def test_other_model_or_dimension_is_refused(planted, tmp_path):
    kb, img = planted
    with pytest.raises(ValueError, match="differs from the model that embedded"):
        retrieve(kb.path, TASK, tmp_path / "a", model="mini-vit")
    small = make_kb(tmp_path / "kb16", img[:, :16], img[:, :16], [0])
    with pytest.raises(ValueError, match="dimension 32 but .* holds dimension 16"):
        retrieve(small.path, TASK, tmp_path / "b")


def test_cli_index_and_retrieve(planted, tmp_path):
    kb, img = planted
    small = make_kb(tmp_path / "kb", img[:300], img[:300], [0])
    (tmp_path / "task.json").write_text(json.dumps(TASK.to_dict()))
    runner = CliRunner()
    result = runner.invoke(main, ["index", str(small.path), "--queries", "20"])
    assert result.exit_code == 0, result.output
    assert "image.index: Flat [exact] recall@10 1.000" in result.output
    result = runner.invoke(main, ["retrieve", str(small.path), "--task", str(tmp_path / "task.json"),
                                  "--out", str(tmp_path / "r"), "--per-class", "5", "--no-dedup"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["per_class_counts"] == {n: 5 for n in TASK.classnames}
    result = runner.invoke(main, ["retrieve", str(small.path), "--task", "no-such-task", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "unknown task 'no-such-task'" in result.output


@pytest.mark.slow
def test_mini_world_embed_index_retrieve(tiny_world, tmp_path):
    """The real stages in a row on the mini world: embed's KB -> index -> retrieve with an eval set to embed."""
    from react_vl.embed import embed_corpus
    embed_corpus(str(tiny_world / "kb"), "mini-vit-test", None, tmp_path / "kb", batch_size=256, workers=0,
                 progress=False)
    build_indexes(tmp_path / "kb", n_queries=100)
    eval_dir = tiny_world / "eval" / "mini-shape-sketch"
    summary = retrieve(tmp_path / "kb", "mini-shape-sketch", tmp_path / "r", per_class=20, eval_set=eval_dir)
    rows = _read(tmp_path / "r")
    meta = {r["id"]: r for r in KnowledgeBase(tmp_path / "kb").metadata().to_pylist()}
    assert 0 < len(rows) == summary["retrieved"] <= 20 * len(summary["per_class_counts"])
    assert all(meta[r["id"]]["key"] == r["key"] and (tiny_world / "kb").as_posix() in r["shard"] for r in rows)
    assert set(summary["removed"]) == {"eval_overlap", "near_duplicate"}


# --- on the mini world, with a trained model: precision against the world's ground truth ------------
@pytest.fixture(scope="module")
def trained_kb(tiny_world, tiny_trained_model, tmp_path_factory):
    from react_vl.embed import embed_corpus
    kb = tmp_path_factory.mktemp("trained_kb")
    embed_corpus(str(tiny_world / "kb"), None, str(tiny_trained_model), kb, batch_size=256, workers=0, progress=False)
    build_indexes(kb, n_queries=100)
    return kb


def _truth(row) -> dict:
    return json.loads(row["json"])


@pytest.mark.parametrize("mode", ["t2t", "t2i", "both"])
def test_retrieval_precision_against_ground_truth(trained_kb, tmp_path, mode):
    """Retrieved pairs show the class they were retrieved for, in the task's style, far more often
    than a random KB pair does (the tiny model knows colours, not yet shapes: see conftest)."""
    from react_vl.demo import ground_truth
    summary = retrieve(trained_kb, "mini-color-night", tmp_path, mode=mode, per_class=15, dedup_threshold=None)
    kb_rows = KnowledgeBase(trained_kb).metadata().to_pylist()
    night_share = np.mean([_truth(r)["style"] == "night" for r in kb_rows])
    truth = ground_truth(tmp_path)
    class_precision = truth["mini-color-night"]["class_precision"]
    night_precision = truth["mini-color-night"]["style_share"]
    print(f"{mode}: {truth['pairs']} pairs, class precision {class_precision:.2f} (chance 0.125), "
          f"night {night_precision:.2f} (KB share {night_share:.2f})")
    assert summary["retrieved"] == truth["pairs"] >= 60
    assert class_precision >= 0.3
    assert night_precision >= 3 * night_share
