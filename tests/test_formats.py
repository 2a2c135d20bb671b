"""The files users have, as downloaded: LAION / clip-retrieval embedding folders, img2dataset
output folders, URL lists, and images PIL warns about."""

import io
import json
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from helpers import make_shards, png_bytes

from react_vl.data import CorpusFormatError, SkipLog, count_from_stats, decode_image, iter_corpus, list_shards
from react_vl.embed import embed_corpus
from react_vl.index import build_indexes
from react_vl.kb import KnowledgeBase, make_ids, record_model
from react_vl.materialize import materialize
from react_vl.retrieve import retrieve

MODEL = "mini-vit-test"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, write_shards):
    """A KB react-vl embedded: 3 parts of 12 pairs with urls."""
    root = tmp_path_factory.mktemp("embedded")
    make_shards(write_shards, root / "corpus", 3, 12)
    embed_corpus(str(root / "corpus"), MODEL, None, root / "kb", batch_size=16, workers=0, precision="fp32",
                 progress=False)
    return root / "kb"


def laion_folder(kb: KnowledgeBase, out, text: bool = True):
    """The KB laid out as LAION-5B publishes it: padded part numbers, url/caption metadata only (no id,
    key or shard), in a metadata folder named after the dataset, no kb.json."""
    for part in kb.parts:
        for kind in ("img_emb", "text_emb") if text else ("img_emb",):
            (out / kind).mkdir(parents=True, exist_ok=True)
            shutil.copy(kb.files[kind][part], out / kind / f"{kind}_{part:04d}.npy")
        meta = kb.part_metadata(part, ["key", "caption"])
        urls = pa.array([f"https://laion.example/{key}.jpg" for key in meta["key"].to_pylist()])
        (out / "laion2B-en-metadata").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"url": urls, "caption": meta["caption"]}),
                       out / "laion2B-en-metadata" / f"metadata_{part:04d}.parquet")
    return out


def test_laion_folder_runs_record_model_index_retrieve_materialize(embedded, tmp_path):
    source = KnowledgeBase(embedded)
    folder = laion_folder(source, tmp_path / "laion")
    kb = KnowledgeBase(folder)
    assert kb.parts == [0, 1, 2] and len(kb) == 36 and kb.has_text and kb.info == {}
    assert kb.ids().tolist() == np.concatenate([make_ids(p, 12) for p in range(3)]).tolist()  # stable ids

    info = record_model(folder, MODEL, None)
    assert {k: info[k] for k in ("model", "pretrained", "dim", "dtype", "count", "parts")} == {
        "model": MODEL, "pretrained": None, "dim": 32, "dtype": "float16", "count": 36, "parts": 3}
    assert json.loads((folder / "kb.json").read_text()) == info
    build_indexes(folder, k=5, n_queries=4)
    summary = retrieve(folder, "mini-shape-photo", tmp_path / "R", mode="both", k=5, dedup_threshold=None)
    retrieved = pq.read_table(tmp_path / "R" / "retrieved.parquet").to_pylist()
    assert summary["retrieved"] == len(retrieved) > 0

    out = materialize(tmp_path / "R", tmp_path / "SHARDS", run_img2dataset=False, progress=False)
    url_list = pq.read_table(out["url_pairs"]["url_list"]).to_pylist()
    keys = {int(i): k for i, k in zip(source.ids(), source.metadata(["key"])["key"].to_pylist())}
    assert sorted((r["id"], r["url"]) for r in url_list) == sorted(
        (r["id"], f"https://laion.example/{keys[r['id']]}.jpg") for r in retrieved)
    assert out["count"] == 0 and out["url_pairs"]["count"] == len(retrieved) and out["missing"]["total"] == 0
    command = out["url_pairs"]["img2dataset_command"]
    assert "--resize_mode=keep_ratio" in command and "--number_sample_per_shard=10000" in command


def test_record_model_refuses_another_width_or_model(embedded, tmp_path):
    folder = laion_folder(KnowledgeBase(embedded), tmp_path / "laion")
    with pytest.raises(ValueError, match=r"ViT-B-32 makes 512-d embeddings, but .* holds 32-d ones \(img_emb_0000"):
        record_model(folder, "ViT-B-32", None)
    record_model(folder, MODEL, None)
    with pytest.raises(ValueError, match="kb.json records .*'pretrained': None}, not model 'mini-vit-test' / pretrained 'ft.pt'"):
        record_model(folder, MODEL, "ft.pt")


def test_image_only_folder_serves_t2i_only(embedded, tmp_path):
    folder = laion_folder(KnowledgeBase(embedded), tmp_path / "laion", text=False)
    kb = KnowledgeBase(folder)
    assert not kb.has_text and kb.image_embeddings().shape == (36, 32)
    with pytest.raises(ValueError, match=r"no caption embeddings .* image search \(t2i\) only"):
        kb.text_embeddings()
    record_model(folder, MODEL, None)
    assert set(build_indexes(folder, k=5, n_queries=4)) == {"image"}
    summary = retrieve(folder, "mini-shape-photo", tmp_path / "R", mode="t2i", k=5, dedup_threshold=None)
    out = materialize(tmp_path / "R", tmp_path / "SHARDS", run_img2dataset=False, progress=False)
    assert out["url_pairs"]["count"] == summary["retrieved"] > 0 and out["text_embeddings"] is None


@pytest.mark.parametrize("damage, message", [
    ("dim", r"part 1 \(img_emb_0001.npy\) holds \(12, 16\) float16 embeddings, img_emb_0000.npy 32-d float16"),
    ("dtype", r"part 2 \(text_emb_0002.npy\) holds \(12, 32\) float32 embeddings, img_emb_0000.npy 32-d float16"),
    ("rows", r"part 1 rows disagree: 11 in metadata_0001.parquet, 12 in img_emb_0001.npy, 12 in text_emb_0001"),
    ("no metadata", r"part 2 has img_emb_0002.npy but no metadata_2.parquet"),
])
def test_bad_parts_are_refused_with_the_part_and_numbers(embedded, tmp_path, damage, message):
    folder = laion_folder(KnowledgeBase(embedded), tmp_path / "laion")
    meta = folder / "laion2B-en-metadata"
    if damage == "dim":
        np.save(folder / "img_emb" / "img_emb_0001.npy", np.zeros((12, 16), np.float16))
    elif damage == "dtype":
        np.save(folder / "text_emb" / "text_emb_0002.npy", np.zeros((12, 32), np.float32))
    elif damage == "rows":
        pq.write_table(pq.read_table(meta / "metadata_0001.parquet").slice(0, 11), meta / "metadata_0001.parquet")
    else:
        (meta / "metadata_0002.parquet").unlink()
    with pytest.raises(ValueError, match=message):
        KnowledgeBase(folder)


def write_img2dataset_folder(folder, shards: int, per_shard: int, failed: int, seed: int = 0) -> list[str]:
    """What `img2dataset --output_format webdataset` leaves: NNNNN.tar with the successes, NNNNN.parquet
    with every row, NNNNN_stats.json (written last), keys shard * 10^4 + row over 9 digits."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    captions = []
    for s in range(shards):
        rows = []
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                key, url = f"{s * 10**4 + i:09d}", f"https://img.example/{s}/{i}.jpg"
                ok = i >= failed
                rows.append({"url": url, "caption": f"pair {s} {i}", "key": key,
                             "status": "success" if ok else "failed_to_download"})
                if ok:
                    meta = {"url": url, "caption": f"pair {s} {i}", "key": key, "status": "success", "id": s * 100 + i}
                    sink.write({"__key__": key, "jpg": png_bytes(rng), "txt": f"pair {s} {i}", "json": json.dumps(meta)})
                    captions.append(f"pair {s} {i}")
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{s:05d}.parquet")
        stats = {"count": per_shard, "successes": per_shard - failed, "failed_to_download": failed,
                 "failed_to_resize": 0, "status_dict": {"success": per_shard - failed}}
        (folder / f"{s:05d}_stats.json").write_text(json.dumps(stats, indent=4))
    return captions


def test_img2dataset_folder_is_its_tars_and_counted_by_its_stats(tmp_path):
    captions = write_img2dataset_folder(tmp_path / "dl", shards=3, per_shard=7, failed=2)
    shards = list_shards(str(tmp_path / "dl"))
    assert shards == [str((tmp_path / "dl" / f"{s:05d}.tar").resolve()) for s in range(3)]
    assert count_from_stats(str(tmp_path / "dl")) == 15 == count_from_stats(shards[:2]) + 5
    assert [p.caption for p in iter_corpus(shards)] == captions
    (tmp_path / "dl" / "00002_stats.json").unlink()  # a shard still downloading: no count rather than a wrong one
    assert count_from_stats(str(tmp_path / "dl")) is None
    (tmp_path / "dl" / "00001_stats.json").write_text("{}")
    with pytest.raises(CorpusFormatError, match="00001_stats.json: not an img2dataset stats file"):
        count_from_stats(shards[:2])


def test_img2dataset_files_layout_is_its_image_folders(tmp_path):
    """img2dataset --output_format files: NNNNN/ image folders beside NNNNN.parquet and NNNNN_stats.json."""
    rng = np.random.default_rng(0)
    for s in range(2):
        (tmp_path / f"{s:05d}").mkdir()
        for i in range(3):
            (tmp_path / f"{s:05d}" / f"{s:05d}{i:04d}.png").write_bytes(png_bytes(rng))
            (tmp_path / f"{s:05d}" / f"{s:05d}{i:04d}.txt").write_text(f"pair {s} {i}")
        pq.write_table(pa.table({"url": ["u"] * 3, "caption": ["c"] * 3}), tmp_path / f"{s:05d}.parquet")
        (tmp_path / f"{s:05d}_stats.json").write_text(json.dumps({"successes": 3}))
    assert list_shards(str(tmp_path)) == [str((tmp_path / f"{s:05d}").resolve()) for s in range(2)]
    assert count_from_stats(str(tmp_path)) == 6 == len(list(iter_corpus(str(tmp_path))))


def test_url_only_parquet_points_to_img2dataset(tmp_path):
    pq.write_table(pa.table({"url": ["https://x/1.jpg"], "caption": ["a cat"]}), tmp_path / "urls.parquet")
    with pytest.raises(CorpusFormatError, match="holds URLs, not images.*img2dataset --url_list"):
        embed_corpus(str(tmp_path / "urls.parquet"), MODEL, None, tmp_path / "kb", workers=0, progress=False)
    from react_vl.data import ParquetColumns
    with pytest.raises(CorpusFormatError, match="column 'url' holds URLs"):
        list(iter_corpus(str(tmp_path / "urls.parquet"), columns=ParquetColumns(image="url")))


def palette_png(transparency: bytes) -> bytes:
    """An 8x8 palette PNG: index 0 everywhere (alpha transparency[0]), index 1 and 2 in the first row."""
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * 759)
    image.putpixel((0, 0), 1)
    image.putpixel((1, 0), 2)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=transparency)
    return buffer.getvalue()


def big_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 200).save(buffer, "PNG")
    return buffer.getvalue()


def test_transparency_is_composited_on_white():
    data = palette_png(bytes([0, 128, 255]))  # transparency per palette entry, as bytes: PIL warns on convert("RGB")
    assert isinstance(Image.open(io.BytesIO(data)).info["transparency"], bytes)
    decode_warnings = SkipLog()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = decode_image(data, decode_warnings, "x")
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (255, 255, 255)  # transparent red -> white
    assert image.getpixel((1, 0)) == (0, 255, 0)                               # opaque green stays
    assert image.getpixel((0, 0)) == (127, 127, 255)                           # half-transparent blue on white
    assert decode_warnings.total() == 0
    la = Image.new("LA", (4, 4), (0, 0))
    buffer = io.BytesIO()
    la.save(buffer, "PNG")
    assert decode_image(buffer.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_embed_counts_pil_warnings_instead_of_printing_them(tmp_path, recwarn, write_shards):
    """A 90M-pixel image (over PIL's MAX_IMAGE_PIXELS: warned), one over twice that (refused by PIL: a
    skip) and palette PNGs with transparency, through embed: counted in the summary, none printed."""
    rng = np.random.default_rng(0)
    write_shards(tmp_path / "c", [
        {"__key__": "large", "png": big_png(9500), "txt": "a large flat image"},
        {"__key__": "bomb", "png": big_png(13500), "txt": "an image PIL refuses"},
        *({"__key__": f"clip{i}", "png": palette_png(bytes([0, 128, 255])), "txt": f"clip art {i}"} for i in range(3)),
        {"__key__": "plain", "png": png_bytes(rng), "txt": "a plain image"}], prefix="clipart")
    summary = embed_corpus(str(tmp_path / "c"), MODEL, None, tmp_path / "kb", workers=0, progress=False)
    assert summary["count"] == 5
    assert summary["decode_warnings"]["counts"] == {"decompression bomb warning": 1}
    assert summary["decode_warnings"]["listed"]["decompression bomb warning"][0].endswith(":large")
    assert summary["skipped"]["counts"] == {"undecodable image": 1}
    assert summary["skipped"]["listed"]["undecodable image"][0].endswith("bomb: DecompressionBombError")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)
                or "Transparency" in str(w.message)]


@pytest.mark.skipif(shutil.which("img2dataset") is None, reason="img2dataset not installed (optional: it pins webdataset<0.3)")
def test_url_pairs_downloaded_by_img2dataset_become_a_training_folder(tmp_path):
    """The URL path for real, without network: file:// URLs, img2dataset run by materialize."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        path = tmp_path / "img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (90 + i, 120, 3), dtype=np.uint8)).save(path)
        rows.append({"id": i, "caption": f"picture {i}", "url": f"file://{path}", "classes": ["x"]})
    rows.append({"id": 99, "caption": "gone", "url": f"file://{tmp_path}/img/missing.png", "classes": ["x"]})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "retrieved.parquet")
    from react_vl.materialize import DownloadOptions
    summary = materialize(tmp_path / "retrieved.parquet", tmp_path / "SHARDS", maxcount=5, progress=False,
                          download=DownloadOptions(processes_count=1, thread_count=2, image_size=32))
    downloaded = summary["url_pairs"]["output_folder"]
    assert summary["url_pairs"]["img2dataset_returncode"] == 0 and summary["url_pairs"]["downloaded"] == 12
    pairs = list(iter_corpus(downloaded))
    assert len(list_shards(downloaded)) == 3 and count_from_stats(downloaded) == len(pairs) == 12
    assert sorted(json.loads(p.extra["json"])["id"] for p in pairs) == list(range(12))
    assert min(Image.open(io.BytesIO(p.image)).size[1] for p in pairs) == 32  # keep_ratio: the smaller side


def test_img2dataset_output_folder_trains_as_it_is(tmp_path):
    """customize takes img2dataset's output folder as it is: its tars (not the .parquet / _stats.json
    sidecars) are the shards, and an epoch is the stats files' count of successes."""
    from react_vl.train import TrainConfig, train

    write_img2dataset_folder(tmp_path / "dl", shards=2, per_shard=10, failed=2)
    summary = train(TrainConfig(str(tmp_path / "dl"), tmp_path / "run", model="mini-vit-test", strategy="full",
                                epochs=1.0, batch_size=8, workers=1, log_every=1, seed=0, device="cpu"))
    assert summary["dataset_count"] == 16  # 2 x (10 - 2) successes, from the _stats.json files
    assert summary["steps"] == 2 and summary["samples_seen"] == 16
    assert summary["skipped"]["total"] == 0
    assert (tmp_path / "run" / "model.pt").is_file()
