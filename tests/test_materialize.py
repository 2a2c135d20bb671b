"""materialize: a hand-made retrieved set over tiny_world's embedded KB becomes training shards."""

import hashlib
import io
import json
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from helpers import run_cli

from react_vl.data import ParquetColumns, iter_corpus
from react_vl.embed import embed_corpus
from react_vl.kb import KnowledgeBase
from react_vl.materialize import materialize


@pytest.fixture(scope="module")
def world_kb(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("kb")
    embed_corpus(str(tiny_world / "kb" / "kb-{000000..000001}.tar"), "mini-vit-test", None, out, batch_size=256,
                 workers=2, progress=False)
    return KnowledgeBase(out)


def retrieved_rows(metadata: list[dict]) -> list[dict]:
    """'circle' gets the circles, 'red' the red things (a pair can be both), by ground truth."""
    rows = []
    for row in metadata:
        attrs = json.loads(row["json"])
        classes = [c for c, hit in (("circle", attrs["shape"] == "circle"), ("red", attrs["color"] == "red")) if hit]
        if classes:
            rows.append({"id": row["id"], "key": row["key"], "caption": row["caption"], "shard": row["shard"],
                         "score": 0.3, "classes": classes, "queries": ["a photo of a circle."], "modes": ["t2t"]})
    return rows


def test_materialize_streams_original_pairs_into_shards(world_kb, tmp_path):
    metadata = world_kb.metadata().to_pylist()
    rows = retrieved_rows(metadata)
    lost = {**rows[0], "id": 1 << 40, "key": "no-such-key"}
    remote = {**rows[1], "id": 1 << 41, "shard": None, "url": "https://example.com/remote.png"}
    nowhere = {**rows[2], "id": 1 << 42, "shard": None, "url": None}
    (tmp_path / "R").mkdir()
    pq.write_table(pa.Table.from_pylist([remote, lost, nowhere] + rows), tmp_path / "R" / "retrieved.parquet")

    summary = materialize(tmp_path / "R", tmp_path / "shards", maxcount=100, run_img2dataset=False, progress=False)
    assert summary["lineage"] == {"retrieved": str((tmp_path / "R").resolve()), "fingerprint": {
        "retrieved_sha256": hashlib.sha256((tmp_path / "R" / "retrieved.parquet").read_bytes()).hexdigest(),
        "curation_sha256": None}}, "the set the shards come from, for the trainer to record"

    originals = {(p.shard, p.key): p for p in iter_corpus(sorted({r["shard"] for r in rows}))}
    samples = list(wds.WebDataset([str(tmp_path / "shards" / name) for name in summary["shards"]], shardshuffle=False))
    assert len(samples) == summary["count"] == len(rows)
    per_source = Counter(row["shard"] for row in rows + [lost])  # each source shard holds > 100: a unit alone
    assert len(summary["shards"]) == sum(-(-n // 100) for n in per_source.values())
    sizes = [sum(1 for _ in wds.WebDataset(str(tmp_path / "shards" / name), shardshuffle=False))
             for name in summary["shards"]]
    assert max(sizes) == 100 and sum(sizes) == len(rows)
    by_id = {row["id"]: row for row in rows}
    for sample in samples:
        record = json.loads(sample["json"])
        row = by_id.pop(record["id"])
        original = originals[(row["shard"], row["key"])]
        assert sample["png"] == original.image and sample["txt"].decode() == row["caption"]
        assert record["classes"] == row["classes"] and record["score"] == pytest.approx(0.3)
        assert record["shape"] == json.loads(original.extra["json"])["shape"]  # source attributes kept
    assert not by_id

    balance = summary["class_balance"]["per_class"]
    expected = Counter(c for row in rows for c in row["classes"])
    assert {c: v["written"] for c, v in balance.items()} == dict(expected)
    unwritten = Counter(c for row in (lost, remote, nowhere) for c in row["classes"])
    assert {c: v["retrieved"] for c, v in balance.items()} == dict(expected + unwritten)

    assert summary["missing"]["counts"] == {"not found in its shard": 1, "no local shard and no url": 1}
    url_list = pq.read_table(summary["url_pairs"]["url_list"]).to_pylist()
    assert [(r["url"], r["caption"], r["id"]) for r in url_list] == [(remote["url"], remote["caption"], remote["id"])]
    assert "--url_list" in summary["url_pairs"]["img2dataset_command"]
    assert json.loads((tmp_path / "shards" / "summary.json").read_text())["count"] == len(rows)


def test_rerun_replaces_shards_and_bad_input_is_named(world_kb, tmp_path):
    rows = retrieved_rows(world_kb.metadata().to_pylist())
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "all.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:5]), tmp_path / "few.parquet")
    assert len(materialize(tmp_path / "all.parquet", tmp_path / "out", maxcount=10, progress=False)["shards"]) > 1
    assert materialize(tmp_path / "few.parquet", tmp_path / "out", maxcount=10, progress=False)["count"] == 5
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["shard-000000.tar"]

    pq.write_table(pa.table({"id": [1], "url": ["https://x/1.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet lacks column\(s\) \['caption'\]"):
        materialize(tmp_path / "bad.parquet", tmp_path / "out2")
    with pytest.raises(FileNotFoundError, match="no retrieved set at .*nothing"):
        materialize(tmp_path / "nothing", tmp_path / "out3")


def test_parquet_corpus_and_url_corpus(tiny_world, tmp_path):
    """Pairs are streamed out of a parquet corpus too; pairs with no shard get their url from --kb."""
    pairs = [p for _, p in zip(range(6), iter_corpus(str(tiny_world / "kb" / "kb-000000.tar")))]
    columns = ParquetColumns(caption="text", image="jpg")
    pq.write_table(pa.table({"key": [p.key for p in pairs], "text": [p.caption for p in pairs],
                             "jpg": [p.image for p in pairs], "url": [f"https://img/{p.key}.png" for p in pairs]}),
                   tmp_path / "corpus.parquet")
    embed_corpus(str(tmp_path / "corpus.parquet"), "mini-vit-test", None, tmp_path / "kb", workers=0,
                 columns=columns, progress=False)
    metadata = KnowledgeBase(tmp_path / "kb").metadata().to_pylist()
    rows = [{"id": m["id"], "key": m["key"], "caption": m["caption"], "shard": m["shard"] if i < 4 else None,
             "score": 0.5, "classes": ["circle"]} for i, m in enumerate(metadata)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "retrieved.parquet")

    summary = materialize(tmp_path / "retrieved.parquet", tmp_path / "out", kb=tmp_path / "kb",
                          run_img2dataset=False, columns=columns, progress=False)
    samples = list(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False))
    assert [s["png"] for s in samples] == [p.image for p in pairs[:4]]
    assert json.loads(samples[0]["json"])["url"] == f"https://img/{pairs[0].key}.png"  # source column kept
    url_list = pq.read_table(summary["url_pairs"]["url_list"]).to_pylist()
    assert [r["url"] for r in url_list] == [f"https://img/{p.key}.png" for p in pairs[4:]]
    assert summary["missing"]["total"] == 0


def corpus_retrieved(write_shards, folder, shards: int, per_shard: int) -> list[dict]:
    """Webdataset shards of random images and a retrieved set of all their pairs (ids as embed gives them)."""
    from helpers import make_shards

    from react_vl.kb import make_ids
    rows = []
    for part, path in enumerate(make_shards(write_shards, folder, shards, per_shard)):
        for i, pair in enumerate(iter_corpus(str(path.resolve()))):
            rows.append({"id": int(make_ids(part, per_shard)[i]), "key": pair.key, "caption": pair.caption,
                         "shard": pair.shard, "classes": ["circle"] if i % 2 else ["red"], "score": 0.5})
    return rows


def read_samples(folder) -> list[dict]:
    return [{k: v for k, v in s.items() if k not in ("__url__", "__local_path__")}
            for s in wds.WebDataset(sorted(str(p) for p in Path(folder).glob("shard-*.tar")), shardshuffle=False)]


def test_caption_embeddings_in_every_sample_and_parallel_equals_serial(world_kb, tmp_path):
    from react_vl.models import load_model, text_tower_fingerprint

    rows = retrieved_rows(world_kb.metadata().to_pylist())[:120]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "retrieved.parquet")
    serial = materialize(tmp_path / "retrieved.parquet", tmp_path / "one", kb=world_kb.path, maxcount=25,
                         progress=False)
    parallel = materialize(tmp_path / "retrieved.parquet", tmp_path / "two", kb=world_kb.path, maxcount=25,
                           workers=2, progress=False)
    torch.manual_seed(0)  # embed's seed for randomly initialised models
    fingerprint = text_tower_fingerprint(load_model("mini-vit-test", None)[0])
    assert world_kb.info["text_tower_sha256"] == fingerprint
    assert serial["text_embeddings"] == {"model": "mini-vit-test", "pretrained": None, "dim": 32,
                                         "text_tower_sha256": fingerprint} == parallel["text_embeddings"]
    samples = read_samples(tmp_path / "one")
    assert samples == read_samples(tmp_path / "two") and len(samples) == serial["count"] == len(rows)
    kb_rows = {row["id"]: i for i, row in enumerate(world_kb.metadata(["id"]).to_pylist())}
    text = world_kb.text_embeddings()
    for sample in samples:
        emb = np.load(io.BytesIO(sample["text_emb.npy"]))
        expected = text[kb_rows[json.loads(sample["json"])["id"]]].astype(np.float32)
        assert emb.shape == (32,) and emb.dtype == np.float16
        np.testing.assert_allclose(emb, expected / np.linalg.norm(expected), atol=1e-3)


@pytest.mark.slow
def test_resume_after_sigkill_keeps_finished_shards(tmp_path, write_shards):
    rows = corpus_retrieved(write_shards, tmp_path / "corpus", shards=12, per_shard=30)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "retrieved.parquet")
    args = [str(tmp_path / "retrieved.parquet"), "--maxcount", "5", "--no-download"]
    killed = run_cli("materialize", *args, "--out", str(tmp_path / "out"))
    state = tmp_path / "out" / ".materialize"
    deadline = time.time() + 90
    while len(list(state.glob("shard-*.json"))) < 2 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    finished = {p.name.removesuffix(".json"): (tmp_path / "out" / p.name.removesuffix(".json")).stat()
                for p in state.glob("shard-*.json")}
    assert 2 <= len(finished) < 72 and not (tmp_path / "out" / "summary.json").exists(), len(finished)

    resumed = run_cli("materialize", *args, "--out", str(tmp_path / "out"))
    materialize(tmp_path / "retrieved.parquet", tmp_path / "once", maxcount=5, run_img2dataset=False, progress=False)
    assert resumed.wait(timeout=120) == 0, resumed.stdout.read()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["this_run"] == {"shards_written": 72 - len(finished), "shards_reused": len(finished), "workers": 1}
    for name, stat in finished.items():  # never rewritten
        assert (tmp_path / "out" / name).stat().st_ino == stat.st_ino and \
               (tmp_path / "out" / name).stat().st_mtime_ns == stat.st_mtime_ns
    assert read_samples(tmp_path / "out") == read_samples(tmp_path / "once") and summary["count"] == 360
    assert summary == {**json.loads((tmp_path / "once" / "summary.json").read_text()),
                       "this_run": summary["this_run"], "seconds": summary["seconds"]}
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_truncated_source_shard_is_counted_once_and_its_head_kept(tmp_path, write_shards):
    rows = corpus_retrieved(write_shards, tmp_path / "corpus", shards=2, per_shard=20)
    shard = Path(rows[-1]["shard"])
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "retrieved.parquet")
    summary = materialize(tmp_path / "retrieved.parquet", tmp_path / "out", maxcount=8, progress=False)
    lost = summary["missing"]["counts"]["not found in its shard"]
    assert summary["corrupt_shards"]["counts"] == {"corrupt shard": 1}
    assert summary["corrupt_shards"]["listed"]["corrupt shard"][0].startswith(str(shard))
    assert 0 < lost < 20 and summary["count"] == 40 - lost == len(read_samples(tmp_path / "out"))
