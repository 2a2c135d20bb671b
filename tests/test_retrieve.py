"""Retrieve stage on a real FAISS-indexed KB whose pairs are planted around the task's real query embeddings."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import make_kb

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
    ids = np.array([1, 2, 3, 4, 5, 6, 7, 8])
    score = np.array([0.99, 0.98, 0.97, 0.96, 0.31, 0.30, 0.29, 0.28], dtype=np.float32)
    mode = np.array([0] * 4 + [1] * 4)  # t2t, then t2i
    kept = cap_per_class(np.zeros(8, dtype=np.int64), mode, ids, score, limit=4)
    assert kept["id"].tolist() == [1, 5, 2, 6] and kept["position"].tolist() == [0, 1, 2, 3]
    assert kept["score"][0, 0] == np.float32(0.99) and np.isnan(kept["score"][0, 1])


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


# --- memory-bounded path vs a straightforward reference; torchrun; resume; bad input ------------
def reference_retrieve(kb, task, k, per_class, dedup_threshold, min_clip_score):
    """The stage written out plainly over every hit at once: per class, each mode's pairs by best
    score, taken in turn by rank up to per_class + margin; the filters over those pairs best first;
    each class then cut to per_class. Returns {id: row} with the provenance columns."""
    from react_vl.index import load_index, read_rows
    from react_vl.retrieve import MODES, OVERFETCH, locate
    import math
    prompts, query_class, queries = encode_queries(kb, task)
    limit = math.ceil(per_class * (1 + OVERFETCH))
    hits = {}  # (class, mode) -> {id: [best score, queries]}
    for mode, kind in MODES.items():
        scores, ids = load_index(kb, kind).search(queries, k)
        for q in range(len(queries)):
            for score, i in zip(scores[q], ids[q]):
                best = hits.setdefault((int(query_class[q]), mode), {}).setdefault(int(i), [-np.inf, set()])
                best[0], _ = max(best[0], float(score)), best[1].add(prompts[q])
    lists = {}
    for c in range(len(task.classnames)):
        ranked = [sorted(hits[(c, m)], key=lambda i: (-hits[(c, m)][i][0], i))[:limit] for m in MODES]
        order = [i for rank in range(limit) for by_mode in ranked if rank < len(by_mode) for i in [by_mode[rank]]]
        lists[c] = list(dict.fromkeys(order))[:limit]
    best = {}
    for c, ids in lists.items():
        for i in ids:
            best[i] = max(best.get(i, -np.inf), *(hits[(c, m)][i][0] for m in MODES if i in hits[(c, m)]))
    ordered = sorted(best, key=lambda i: (-best[i], i))
    rows = locate(kb, np.array(ordered))
    image, text = read_rows(kb, "image", rows), read_rows(kb, "text", rows)
    removed = set()
    for n, i in enumerate(ordered):
        if float(image[n] @ text[n]) < min_clip_score:
            removed.add(i)
    kept_images = []
    for n, i in enumerate(ordered):
        if i not in removed:
            if any(float(image[n] @ other) >= dedup_threshold for other in kept_images):
                removed.add(i)
            else:
                kept_images.append(image[n])
    out = {}
    for c, ids in lists.items():
        for i in [i for i in ids if i not in removed][:per_class]:
            row = out.setdefault(i, {"classes": set(), "queries": set(), "modes": set(), "score_t2t": None,
                                     "score_t2i": None})
            row["classes"].add(task.classnames[c])
            for m in MODES:
                if i in hits[(c, m)]:
                    row["modes"].add(m)
                    row["queries"] |= hits[(c, m)][i][1]
                    row[f"score_{m}"] = max(row[f"score_{m}"] or -np.inf, hits[(c, m)][i][0])
    return {i: {**row, "classes": sorted(row["classes"]), "queries": sorted(row["queries"]),
                "modes": sorted(row["modes"])} for i, row in out.items()}, removed


def test_chunked_path_equals_a_reference(planted, tmp_path):
    """Per-class cap first (with its margin), then clip-score and near-duplicate removal on the kept
    pairs, then the cut: the same pairs, classes, queries, modes and scores as the plain version,
    with one chunk file per class."""
    kb, _ = planted
    per_class, k = 12, 40
    summary = retrieve(kb.path, TASK, tmp_path, per_class=per_class, k=k, dedup_threshold=0.9, min_clip_score=0.2,
                       hits_per_chunk=len(TASK.templates) * k * 2)
    expected, removed = reference_retrieve(KnowledgeBase(kb.path), TASK, k, per_class, 0.9, 0.2)
    rows = {r["id"]: r for r in _read(tmp_path)}
    assert summary["chunks"]["total"] == 3 and len(list((tmp_path / "parts").rglob("chunk-*.npz"))) == 3
    assert set(rows) == set(expected) and summary["retrieved"] == len(expected) > 0
    assert sum(summary["removed"].values()) == len(removed) > 0
    for i, row in rows.items():
        want = expected[i]
        assert {c: row[c] for c in ("classes", "queries", "modes")} == {c: want[c] for c in ("classes", "queries", "modes")}
        for m in ("t2t", "t2i"):
            assert (row[f"score_{m}"] is None) == (want[f"score_{m}"] is None)
            assert row[f"score_{m}"] is None or abs(row[f"score_{m}"] - want[f"score_{m}"]) < 1e-6
        assert abs(row["score"] - max(s for s in (want["score_t2t"], want["score_t2i"]) if s is not None)) < 1e-6


def test_kept_margin_fills_classes_after_removal(planted, tmp_path):
    """The margin kept beyond per_class refills what the filters remove; classes that still fall short are counted."""
    kb, _ = planted
    summary = retrieve(kb.path, TASK, tmp_path / "a", per_class=20, dedup_threshold=0.9999)
    assert summary["removed"]["near_duplicate"] == 1 and summary["short_classes"]["count"] == 0
    assert summary["per_class_counts"] == {name: 20 for name in TASK.classnames}
    summary = retrieve(kb.path, TASK, tmp_path / "b", per_class=40, mode="t2i", dedup_threshold=None)
    assert summary["short_classes"]["count"] == 0  # 30 planted + random neighbours: enough for 40
    # only the 91 planted pairs have matching image and caption: no class can keep 100
    strict = retrieve(kb.path, TASK, tmp_path / "c", per_class=100, mode="t2i", min_clip_score=0.5,
                      dedup_threshold=None)
    counts = strict["per_class_counts"]
    assert strict["short_classes"]["count"] == 3 and all(25 <= v <= 91 for v in counts.values())
    assert strict["short_classes"]["missing_pairs"] == sum(100 - v for v in counts.values())


def test_near_duplicates_above_the_exact_size(tmp_path):
    """Over EXACT_DEDUP_MAX kept pairs the IVF path runs; it finds planted near-duplicates as exact search does."""
    from react_vl.retrieve import EXACT_DEDUP_MAX, near_duplicates
    rng = np.random.default_rng(3)
    n = EXACT_DEDUP_MAX + 5_000
    img = _normalise(rng.standard_normal((n, 32)))
    copies = rng.choice(n - 1000, 200, replace=False)
    img[n - 200:] = _normalise(img[copies] + 0.02 * rng.standard_normal((200, 32)) / np.sqrt(32))
    kb = make_kb(tmp_path / "kb", img, img, [0, 1])
    removed = near_duplicates(kb, np.arange(n), 0.99)
    cosine = np.einsum("ij,ij->i", img[copies], img[n - 200:])
    assert (cosine > 0.99).all() and removed[n - 200:].all() and removed.sum() == 200


def test_index_tuned_at_a_smaller_k_is_retuned(tmp_path):
    """An IVF index tuned for recall@10 is re-tuned at retrieve's k; the setting used is in the summary."""
    from react_vl.index import build_index
    from helpers import clustered
    rng = np.random.default_rng(5)
    img, text = clustered(12_000, 32, rng, 20), clustered(12_000, 32, rng, 20)
    kb = make_kb(tmp_path / "kb", img, text, [0, 1])
    for kind in ("image", "text"):
        build_index(kb, kind, factory="IVF64,Flat", k=10, n_queries=100, target_recall=0.9)
    summary = retrieve(kb.path, TASK, tmp_path / "r", k=400, dedup_threshold=None)
    for mode in ("t2t", "t2i"):
        search = summary["search"][mode]
        assert search["index_k"] == 10 and search["k"] == 400 and search["retuned"]
        assert search["recall"] >= 0.9 and search["params"].startswith("nprobe=")
        assert int(search["params"].split("=")[1]) >= int(search["index_params"].split("=")[1])
    same_k = retrieve(kb.path, TASK, tmp_path / "s", k=10, dedup_threshold=None)
    assert all(not same_k["search"][m]["retuned"] and same_k["search"][m]["params"] == summary["search"][m]["index_params"]
               for m in ("t2t", "t2i"))


def test_bad_arguments_are_refused(planted, tmp_path):
    kb, _ = planted
    with pytest.raises(ValueError, match="per_class must be at least 1, got 0"):
        retrieve(kb.path, TASK, tmp_path / "a", per_class=0)
    with pytest.raises(ValueError, match="mode must be t2t, t2i or both, got 'x'"):
        retrieve(kb.path, TASK, tmp_path / "a", mode="x")
    (tmp_path / "empty.json").write_text(json.dumps({**TASK.to_dict(), "classnames": []}))
    result = CliRunner().invoke(main, ["retrieve", str(kb.path), "--task", str(tmp_path / "empty.json"),
                                       "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and "the class list is empty" in result.output


def test_index_of_other_ids_is_refused(planted, tmp_path):
    """Metadata renumbered after indexing: the index's ids no longer name the KB's pairs."""
    import shutil
    kb, _ = planted
    shutil.copytree(kb.path, tmp_path / "kb")
    path = tmp_path / "kb" / "metadata" / "metadata_1.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.schema.get_field_index("id"), "id",
                                    pa.array(table.column("id").to_numpy() + 1)), path)
    with pytest.raises(ValueError, match="does not match its knowledge base: its ids differ"):
        retrieve(tmp_path / "kb", TASK, tmp_path / "r", per_class=5)


def test_image_only_kb_searches_images(planted, tmp_path):
    """A KB without caption embeddings (LAION-5B image-only folders): `both` runs t2i with a note, `t2t` is refused."""
    import shutil
    kb, _ = planted
    shutil.copytree(kb.path, tmp_path / "kb", ignore=shutil.ignore_patterns("text_emb", "text.index*"))
    summary = retrieve(tmp_path / "kb", TASK, tmp_path / "r", per_class=10, dedup_threshold=None)
    assert summary["modes"] == ["t2i"] and summary["per_class_counts"] == {n: 10 for n in TASK.classnames}
    assert all(r["modes"] == ["t2i"] for r in _read(tmp_path / "r"))
    with pytest.raises(ValueError, match="no caption embeddings .* --mode t2i only"):
        retrieve(tmp_path / "kb", TASK, tmp_path / "r", mode="t2t")


def _many_classes(n: int) -> Task:
    return Task("many", [f"{shape} number {i}" for i in range(n // 3) for shape in TASK.classnames][:n],
                list(TASK.templates))


def _retrieve_cli(kb, task_file, out, *extra, torchrun=None):
    import subprocess
    import sys
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(torchrun)] if torchrun else [sys.executable]
    return subprocess.Popen([*launcher, "-m", "react_vl.cli", "retrieve", str(kb), "--task", str(task_file),
                             "--out", str(out), "--per-class", "8", "--hits-per-chunk", "40", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(planted, tmp_path):
    kb, _ = planted
    (tmp_path / "task.json").write_text(json.dumps(_many_classes(12).to_dict()))
    two = _retrieve_cli(kb.path, tmp_path / "task.json", tmp_path / "r2", torchrun=_free_port())
    one = _retrieve_cli(kb.path, tmp_path / "task.json", tmp_path / "r1")
    for run in (two, one):
        assert run.wait(timeout=300) == 0, run.stdout.read()[-3000:]
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert [r["chunks"] for r in summary["chunks"]["ranks"]] == [6, 6] and summary["retrieved"] > 0
    assert pq.read_table(tmp_path / "r2" / "retrieved.parquet").equals(pq.read_table(tmp_path / "r1" / "retrieved.parquet"))


@pytest.mark.slow
def test_sigkill_mid_retrieve_resumes(planted, tmp_path):
    """Killed after some chunk files were written: the rerun searches only the others, same result."""
    import signal
    import time
    kb, _ = planted
    (tmp_path / "task.json").write_text(json.dumps(_many_classes(150).to_dict()))
    killed = _retrieve_cli(kb.path, tmp_path / "task.json", tmp_path / "r", "--k", "600")
    while killed.poll() is None and len(list((tmp_path / "r").rglob("chunk-*.npz"))) < 2:
        time.sleep(0.002)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = len(list((tmp_path / "r").rglob("chunk-*.npz")))
    assert 2 <= done < 150 and not (tmp_path / "r" / "retrieved.parquet").exists(), f"{done} chunks at kill"
    resumed = _retrieve_cli(kb.path, tmp_path / "task.json", tmp_path / "r", "--k", "600")
    once = _retrieve_cli(kb.path, tmp_path / "task.json", tmp_path / "once", "--k", "600")
    for run in (resumed, once):
        assert run.wait(timeout=300) == 0, run.stdout.read()[-3000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["chunks"]["total"] == 150 and summary["chunks"]["searched"] == 150 - done
    assert pq.read_table(tmp_path / "r" / "retrieved.parquet").equals(pq.read_table(tmp_path / "once" / "retrieved.parquet"))
    assert not list((tmp_path / "r").rglob("*.tmp"))
