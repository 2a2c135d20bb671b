"""Materialize a retrieved set as webdataset training shards, streamed out of the corpus shards.

    materialize("R", "SHARDS")   # R/retrieved.parquet -> SHARDS/shard-000000.tar ..., SHARDS/summary.json

Retrieved pairs are grouped by the source shard embed recorded for them, and each needed shard
is read once, front to back, keeping the pairs asked for: the cost is one sequential pass over
the shards that hold retrieved pairs, never one file per sample. Each output sample has the
original image bytes, the caption (`txt`) and a `json` with the pair's id, classes, score,
queries, modes and its source attributes. Pairs with no local shard but a `url` (a KB made
from a URL corpus such as LAION's public embeddings) go to an img2dataset-ready parquet
instead, and img2dataset is run on it when installed.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import webdataset as wds
from tqdm import tqdm

from .data import MAX_LISTED_SKIPS, ParquetColumns, SkipLog, read_shard
from .kb import KnowledgeBase
from .utils import atomic_path, write_json

REQUIRED_COLUMNS = ("id", "key", "caption", "shard")


def _read_retrieved(retrieved: str | Path, kb: str | Path | None) -> list[dict]:
    path = Path(retrieved)
    path = path / "retrieved.parquet" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no retrieved set at {path} (make one with `react-vl retrieve`)")
    table = pq.read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it has {table.column_names}")
    rows = table.to_pylist()
    if kb is not None and "url" not in table.column_names:
        urls = KnowledgeBase(kb).metadata(["id", "url"])
        if "url" in urls.column_names:
            urls = urls.filter(pc.is_in(urls["id"], value_set=table["id"]))
            url_of = dict(zip(urls["id"].to_pylist(), urls["url"].to_pylist()))
            for row in rows:
                row["url"] = url_of.get(row["id"])
    return rows


def _is_readable_shard(shard: str | None) -> bool:
    return bool(shard) and ("://" in shard or Path(shard).is_file())


def _sample(pair, row: dict) -> dict:
    """The training sample: original image bytes, caption, and the pair's retrieval record."""
    source = {k: v for k, v in pair.extra.items() if k != "json"}
    try:
        source.update(json.loads(pair.extra.get("json") or "{}"))
    except json.JSONDecodeError:
        pass
    record = {**source, "id": row["id"], "key": row["key"], "source_shard": row["shard"],
              **{k: row.get(k) for k in ("score", "classes", "queries", "modes") if k in row}}
    return {"__key__": f"{row['id']:020d}", pair.image_ext: pair.image, "txt": row["caption"],
            "json": json.dumps(record).encode()}


def materialize(retrieved: str | Path, out: str | Path, kb: str | Path | None = None, maxcount: int = 10000,
                run_img2dataset: bool = True, columns: ParquetColumns | None = None, progress: bool = True) -> dict:
    """Write the retrieved pairs of `retrieved` (R/ or its parquet) as shards in `out`.

    `kb` (optional) supplies a `url` column by id for pairs without a local shard; `columns` names
    the columns of a parquet corpus, as given to embed.
    Returns the summary, also written to out/summary.json.
    """
    started = time.time()
    rows = _read_retrieved(retrieved, kb)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_shard: dict[str, dict[str, dict]] = defaultdict(dict)
    url_rows, missing = [], SkipLog()
    for row in rows:
        if _is_readable_shard(row["shard"]):
            by_shard[row["shard"]][row["key"]] = row
        elif row.get("url"):
            url_rows.append(row)
        else:
            missing.add("no local shard and no url", f"{row['id']} ({row['shard']})")

    written_classes, written, shard_errors = Counter(), 0, SkipLog()
    with tempfile.TemporaryDirectory(dir=out, prefix=".materialize-") as tmp:
        with wds.ShardWriter(f"{tmp}/shard-%06d.tar", maxcount=maxcount, verbose=0) as sink:
            for shard in tqdm(sorted(by_shard), desc="materialize", unit="shard", disable=not progress):
                wanted = by_shard[shard]
                for pair in read_shard(shard, shard_errors, columns):
                    row = wanted.pop(pair.key, None)
                    if row is not None:
                        sink.write(_sample(pair, row))
                        written += 1
                        written_classes.update(row.get("classes") or [])
                for row in wanted.values():
                    missing.add("not found in its shard", f"{row['id']} ({shard}:{row['key']})")
        for stale in out.glob("shard-*.tar"):
            stale.unlink()
        shards = sorted(Path(tmp).glob("shard-*.tar"))
        for path in shards:
            os.replace(path, out / path.name)

    summary = {
        "count": written, "shards": [p.name for p in shards], "retrieved": len(rows),
        "class_balance": _class_balance(rows, written_classes),
        "missing": {"total": missing.total(), **missing.to_dict()},
        "corrupt_shards": shard_errors.to_dict(),
        "url_pairs": _write_url_list(url_rows, out, run_img2dataset) if url_rows else None,
        "seconds": round(time.time() - started, 3),
    }
    write_json(summary, out / "summary.json")
    return summary


def _class_balance(rows: list[dict], written: Counter) -> dict:
    """Per class: pairs retrieved and pairs written; spread of the written counts."""
    retrieved = Counter(c for row in rows for c in (row.get("classes") or []))
    counts = [written[c] for c in retrieved]
    return {
        "per_class": {c: {"retrieved": retrieved[c], "written": written[c]} for c in sorted(retrieved)},
        "min": min(counts, default=0), "max": max(counts, default=0),
        "mean": round(sum(counts) / len(counts), 2) if counts else 0,
        "max_over_min": round(max(counts) / min(counts), 2) if counts and min(counts) else None,
        "empty_classes": sorted(c for c in retrieved if not written[c])[:MAX_LISTED_SKIPS],
    }


def img2dataset_command(url_list: Path, output_folder: Path) -> list[str]:
    return ["img2dataset", "--url_list", str(url_list), "--input_format", "parquet",
            "--url_col", "url", "--caption_col", "caption", "--save_additional_columns", '["id","classes"]',
            "--output_format", "webdataset", "--output_folder", str(output_folder)]


def _write_url_list(url_rows: list[dict], out: Path, run: bool) -> dict:
    """The pairs to download: url, caption, id, classes as an img2dataset input parquet."""
    url_list = out / "img2dataset.parquet"
    table = pa.table({"url": [r["url"] for r in url_rows], "caption": [r["caption"] for r in url_rows],
                      "id": pa.array([r["id"] for r in url_rows], pa.int64()),
                      "classes": [r.get("classes") or [] for r in url_rows]})
    with atomic_path(url_list) as tmp:
        pq.write_table(table, tmp)
    command = img2dataset_command(url_list, out / "downloaded")
    installed = shutil.which("img2dataset") is not None
    returncode = subprocess.run(command, check=False).returncode if run and installed else None
    return {"count": len(url_rows), "url_list": str(url_list), "img2dataset_command": command,
            "img2dataset_installed": installed, "img2dataset_returncode": returncode}
