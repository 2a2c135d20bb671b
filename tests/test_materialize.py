"""materialize: a hand-made retrieved set over tiny_world's embedded KB becomes training shards."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

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
