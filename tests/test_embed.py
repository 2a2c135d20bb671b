"""Corpus readers and the embed stage, on small real webdataset / parquet / folder corpora."""

import io
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from react_vl.data import CorpusFormatError, ParquetColumns, SkipLog, iter_corpus, list_shards
from react_vl.embed import embed_corpus
from react_vl.kb import KnowledgeBase, make_ids
from react_vl.models import load_model

from helpers import make_shards, png_bytes, run_cli

MODEL = "mini-vit-test"





def test_list_shards_expands_braces_globs_and_folders(tmp_path, write_shards):
    make_shards(write_shards, tmp_path / "c", 3, 1)
    expected = [str((tmp_path / "c" / f"kb-{s:06d}.tar").resolve()) for s in range(3)]
    assert list_shards(str(tmp_path / "c" / "kb-{000000..000002}.tar")) == expected
    assert list_shards(str(tmp_path / "c" / "*.tar")) == expected
    assert list_shards(str(tmp_path / "c")) == expected
    with pytest.raises(FileNotFoundError, match="kb-000003.tar"):
        list_shards(str(tmp_path / "c" / "kb-{000000..000009}.tar"))


def test_parquet_and_image_folder_read_the_same_pairs_as_tar(tmp_path, write_shards):
    """One corpus in five forms: tar, tar by fsspec URL, parquet with bytes or paths, image folder."""
    (shard,) = make_shards(write_shards, tmp_path / "tar", 1, 5)
    pairs = list(iter_corpus(str(shard)))
    folder = tmp_path / "folder" / "00000"
    folder.mkdir(parents=True)
    for p in pairs:
        (folder / f"{p.key}.png").write_bytes(p.image)
        (folder / f"{p.key}.txt").write_text(p.caption)
    pq.write_table(pa.table({"key": [p.key for p in pairs], "text": [p.caption for p in pairs],
                             "jpg": [p.image for p in pairs], "url": [f"http://x/{p.key}" for p in pairs],
                             "id": [f"laion-{i}" for i in range(len(pairs))]}),
                   tmp_path / "bytes.parquet")
    pq.write_table(pa.table({"name": [p.key for p in pairs], "caption": [p.caption for p in pairs],
                             "image": [f"folder/00000/{p.key}.png" for p in pairs]}), tmp_path / "paths.parquet")

    as_bytes = list(iter_corpus(str(tmp_path / "bytes.parquet"), columns=ParquetColumns("text", "jpg", "key")))
    as_paths = list(iter_corpus(str(tmp_path / "paths.parquet"), columns=ParquetColumns(key="name")))
    as_folder = list(iter_corpus(str(tmp_path / "folder")))
    as_url = list(iter_corpus(f"file://{shard}"))
    for other in (as_bytes, as_paths, as_folder, as_url):
        assert [(p.key, p.caption, p.image, p.image_ext) for p in other] == [(p.key, p.caption, p.image, "png") for p in pairs]
    assert as_bytes[0].extra == {"url": f"http://x/{pairs[0].key}", "id": "laion-0"}
    assert json.loads(pairs[0].extra["json"]) == {"shard": 0, "index": 0}
    embed_corpus(str(tmp_path / "bytes.parquet"), MODEL, None, tmp_path / "kb", batch_size=2, workers=0,
                 columns=ParquetColumns("text", "jpg", "key"), progress=False)
    metadata = KnowledgeBase(tmp_path / "kb").metadata().to_pylist()
    assert [(m["id"], m["key"], m["url"], m["source_id"]) for m in metadata] == [
        (i, p.key, f"http://x/{p.key}", f"laion-{i}") for i, p in enumerate(pairs)]
    with pytest.raises(CorpusFormatError, match="caption"):  # a wrong column name is reported, not skipped silently
        list(iter_corpus(str(tmp_path / "bytes.parquet")))


def test_pipe_corpus_embeds_as_its_local_path_and_a_failing_command_is_counted(tmp_path, write_shards):
    shards = make_shards(write_shards, tmp_path / "c", 2, 4)
    piped = "pipe:cat " + str(tmp_path / "c" / "kb-{000000..000001}.tar")
    assert list_shards(piped) == [f"pipe:cat {shard}" for shard in shards]
    for corpus, out in ((str(tmp_path / "c"), "kb_local"), (piped, "kb_pipe")):
        summary = embed_corpus(corpus, MODEL, None, tmp_path / out, batch_size=4, workers=0, progress=False)
        assert summary["count"] == 8 and summary["skipped"]["counts"] == {}
    local, pipe = KnowledgeBase(tmp_path / "kb_local"), KnowledgeBase(tmp_path / "kb_pipe")
    assert np.array_equal(local.image_embeddings(), pipe.image_embeddings())
    assert np.array_equal(local.text_embeddings(), pipe.text_embeddings())
    assert pipe.metadata().column("shard").to_pylist() == [f"pipe:cat {s}" for s in shards for _ in range(4)]
    assert local.metadata().drop(["shard"]).equals(pipe.metadata().drop(["shard"]))

    skips = SkipLog()
    assert list(iter_corpus(f"pipe:cat {tmp_path}/missing.tar", skips)) == []
    assert skips.counts["corrupt shard"] == 1 and "exit 1" in skips.listed["corrupt shard"][0]


def test_embed_writes_normalised_kb_and_counts_skips(tmp_path, write_shards):
    rng = np.random.default_rng(1)
    good, truncated = make_shards(write_shards, tmp_path / "c", 2, 6)
    write_shards(tmp_path / "c", [{"__key__": "broken", "png": png_bytes(rng)[:40], "txt": "a cut-off image"},
                                  {"__key__": "silent", "png": png_bytes(rng)},
                                  {"__key__": "fine", "png": png_bytes(rng), "txt": "a good pair"}],
                 prefix="kb", first=2)  # one shard of bad pairs
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])  # a shard cut off mid-way: its head still counts
    (tmp_path / "c" / "kb-000003.tar").write_bytes(b"not a tar file at all" * 50)

    summary = embed_corpus(str(tmp_path / "c"), MODEL, None, tmp_path / "kb", batch_size=4, workers=2,
                           precision="fp32", progress=False)
    kb = KnowledgeBase(tmp_path / "kb")
    assert kb.parts == [0, 1, 2, 3] and kb.info["model"] == MODEL and kb.info["dim"] == 32
    metadata = kb.metadata()
    assert metadata.column_names[:4] == ["id", "key", "caption", "shard"] and "json" in metadata.column_names
    keys = metadata.column("key").to_pylist()
    assert keys[:6] == [f"s0-{i:04d}" for i in range(6)] and "fine" in keys and "broken" not in keys
    assert 0 < keys.count("s1-0000") and not any(k.startswith("s1-0005") for k in keys)
    assert metadata.column("id").to_pylist()[:6] == make_ids(0, 6).tolist()
    counts = summary["skipped"]["counts"]
    assert counts["undecodable image"] == 1 and counts["no caption"] == 1 and counts["corrupt shard"] == 2
    assert summary["count"] == len(kb) == kb.info["count"]
    assert json.loads((tmp_path / "kb" / "embed_summary.json").read_text())["count"] == len(kb)

    images = kb.image_embeddings()
    assert images.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(images.astype(np.float32), axis=1), 1, atol=2e-3)
    torch.manual_seed(0)  # embed's seed for randomly initialised models
    model, preprocess, tokenizer = load_model(MODEL, None)
    first = next(iter_corpus(str(good)))
    with torch.inference_mode():
        expected = model.encode_image(preprocess(Image.open(io.BytesIO(first.image)).convert("RGB"))[None])
        expected_text = model.encode_text(tokenizer([first.caption]))
    np.testing.assert_allclose(images[0], torch.nn.functional.normalize(expected, dim=-1)[0], atol=2e-3)
    np.testing.assert_allclose(kb.text_embeddings()[0], torch.nn.functional.normalize(expected_text, dim=-1)[0],
                               atol=2e-3)

    with pytest.raises(ValueError, match="part 0 was made with"):  # resuming with another dtype is refused
        embed_corpus(str(tmp_path / "c"), MODEL, None, tmp_path / "kb", dtype="float32", precision="fp32",
                     progress=False)
    with pytest.raises(ValueError, match="'autocast': 'off'.*'autocast': 'bfloat16'"):  # or another autocast
        embed_corpus(str(tmp_path / "c"), MODEL, None, tmp_path / "kb", precision="bf16", progress=False)


def test_bf16_autocast_embeddings_agree_with_fp32_and_say_how_they_were_made(tmp_path, write_shards):
    make_shards(write_shards, tmp_path / "c", 1, 16)
    kbs = {}
    for precision in ("fp32", "bf16"):
        summary = embed_corpus(str(tmp_path / "c"), MODEL, None, tmp_path / precision, batch_size=8, workers=0,
                               precision=precision, progress=False)
        assert summary["autocast"] == {"fp32": "off", "bf16": "bfloat16"}[precision]
        kbs[precision] = KnowledgeBase(tmp_path / precision)
        assert kbs[precision].info["autocast"] == summary["autocast"]  # retrieval embeds eval sets alike
    for kind in ("image_embeddings", "text_embeddings"):
        exact, low = (getattr(kbs[p], kind)().astype(np.float32) for p in ("fp32", "bf16"))
        cosines = (exact * low).sum(axis=1)
        assert cosines.min() > 0.99 and not np.array_equal(exact, low), (kind, cosines.min())


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_kb(tmp_path, write_shards):
    shards, per_shard = 6, 16
    make_shards(write_shards, tmp_path / "c", shards, per_shard)
    args = [str(tmp_path / "c"), "--model", "mini-vit", "--batch-size", "4", "--workers", "1"]
    killed = run_cli("embed", *args, "--out", str(tmp_path / "kb"))
    first_part = tmp_path / "kb" / "metadata" / "metadata_0.parquet"
    deadline = time.time() + 90
    while not first_part.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    finished = len(list((tmp_path / "kb" / "metadata").glob("metadata_*.parquet")))
    assert 1 <= finished < shards and not (tmp_path / "kb" / "kb.json").exists(), f"{finished} parts at kill"

    resumed = run_cli("embed", *args, "--out", str(tmp_path / "kb"))
    uninterrupted = run_cli("embed", *args, "--out", str(tmp_path / "kb_once"))
    for run in (resumed, uninterrupted):
        assert run.wait(timeout=120) == 0, run.stdout.read()

    summary = json.loads((tmp_path / "kb" / "embed_summary.json").read_text())
    assert summary["this_run"]["pairs"] == per_shard * (shards - finished) and summary["count"] == per_shard * shards
    a, b = KnowledgeBase(tmp_path / "kb"), KnowledgeBase(tmp_path / "kb_once")
    assert np.array_equal(a.image_embeddings(), b.image_embeddings())
    assert np.array_equal(a.text_embeddings(), b.text_embeddings())
    assert a.metadata().equals(b.metadata())
    assert not list((tmp_path / "kb").rglob("*.tmp"))


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, write_shards, free_port):
    make_shards(write_shards, tmp_path / "c", 3, 10)
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
         "-m", "react_vl.cli", "embed",
         str(tmp_path / "c"), "--model", MODEL, "--out", str(tmp_path / "kb2"), "--batch-size", "4",
         "--workers", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    embed_corpus(str(tmp_path / "c"), MODEL, None, tmp_path / "kb1", batch_size=4, workers=0, progress=False)
    assert torchrun.wait(timeout=180) == 0, torchrun.stdout.read()[-3000:]

    one, two = KnowledgeBase(tmp_path / "kb1"), KnowledgeBase(tmp_path / "kb2")
    summary = json.loads((tmp_path / "kb2" / "embed_summary.json").read_text())
    assert sorted(r["parts"] for r in summary["this_run"]["ranks"]) == [1, 2]  # shards 0, 2 -> rank 0; 1 -> rank 1
    assert one.metadata().equals(two.metadata()) and one.info["count"] == two.info["count"] == 30
    np.testing.assert_allclose(one.image_embeddings().astype(np.float32), two.image_embeddings(), atol=2e-3)
    np.testing.assert_allclose(one.text_embeddings().astype(np.float32), two.text_embeddings(), atol=2e-3)


def test_skip_log_counts_exactly_and_lists_a_bounded_sample():
    skips = SkipLog()
    for i in range(1500):
        skips.add("no caption", f"k{i}")
    merged = SkipLog()
    merged.update(skips.to_dict())
    merged.update(skips)
    assert merged.counts["no caption"] == 3000 and len(merged.listed["no caption"]) == 1000


def test_text_tower_fingerprint_recorded_and_other_weights_refused(tmp_path, write_shards):
    from react_vl.models import save_model, text_tower_fingerprint

    torch.manual_seed(0)
    model = load_model(MODEL, None)[0]
    ckpt = save_model(tmp_path / "model.pt", model, MODEL)
    before = text_tower_fingerprint(model)
    with torch.no_grad():
        model.visual.conv1.weight.add_(1)
    assert text_tower_fingerprint(model) == before  # the image tower is not part of it
    make_shards(write_shards, tmp_path / "c", 2, 3)
    embed_corpus(str(tmp_path / "c" / "kb-000000.tar"), MODEL, str(ckpt), tmp_path / "kb", workers=0, progress=False)
    assert KnowledgeBase(tmp_path / "kb").info["text_tower_sha256"] == before

    with torch.no_grad():
        model.token_embedding.weight.mul_(2)
    save_model(ckpt, model, MODEL)  # the same file name, other text weights
    assert text_tower_fingerprint(model) != before
    with pytest.raises(ValueError, match=r"part 0 was made with .*'text_tower_sha256': '" + before):
        embed_corpus(str(tmp_path / "c"), MODEL, str(ckpt), tmp_path / "kb", workers=0, progress=False)
