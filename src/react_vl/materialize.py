"""Materialize a retrieved set as webdataset training shards, streamed out of the corpus shards.

    materialize("R", "SHARDS", workers=8)   # R/retrieved.parquet -> SHARDS/shard-000000.tar ..., summary.json

Retrieved pairs with a readable source shard are sorted by (source shard, id), which is the
order embed read them in, and cut into units: consecutive source shards whose pairs fill at most
one output shard (`maxcount` samples), or one source shard whose pairs fill several. A unit reads
its source shards once, front to back, keeping the pairs asked for, and writes its output
shards; units run in parallel processes (`workers`). Each output shard is written atomically,
then recorded in SHARDS/.materialize/, so a rerun of a killed run (kill -9 included) skips the
recorded shards and ends with what an uninterrupted run writes; another retrieved set or
maxcount starts over. Each sample has the original image bytes, the caption (`txt`), a `json`
with the pair's id, classes, score, queries, modes and source attributes, and, when the KB has
caption embeddings, `text_emb.npy`: the pair's L2-normalised KB caption embedding (np.save
bytes, shape (dim,), the KB's dtype), which summary.json's `text_embeddings` describes (model,
pretrained, dim, text tower fingerprint). Pairs with no local shard but a `url` (LAION's
metadata has no `shard`) go to an img2dataset input parquet instead, and img2dataset is run on
it when installed (`DownloadOptions`); its output folder, SHARDS/downloaded, is a training-shard
folder as it is, counted by its `_stats.json` files. Pairs rejected in R/curation.json
(`react-vl serve`) are left out, counted as `rejected_by_curation`. summary.json's `lineage`
names the retrieved set and its fingerprint (`curation.fingerprint`), for the trainer to record.
"""

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import webdataset as wds
from tqdm import tqdm

from .curation import fingerprint, rejected_ids
from .data import MAX_LISTED_SKIPS, ParquetColumns, SkipLog, count_from_stats, read_shard
from .kb import KnowledgeBase, part_of
from .utils import atomic_path, read_json, write_json

REQUIRED_COLUMNS = ("id", "caption")
STATE_DIR = ".materialize"  # plan.json and one record per finished output shard
TEXT_EMB = "text_emb.npy"   # the sample member (KEY.text_emb.npy) with the KB caption embedding


@dataclass
class DownloadOptions:
    """img2dataset's settings for URL-only pairs (its flags of the same names)."""
    processes_count: int = field(default_factory=lambda: os.cpu_count() or 1)
    thread_count: int = 64
    resize_mode: str = "keep_ratio"  # smaller side to image_size, aspect kept (what random crops need)
    image_size: int = 256


@dataclass
class Unit:
    """Rows start..stop of the sorted local pairs, written as output shards first..first+shards-1."""
    start: int
    stop: int
    first: int
    shards: int


def _read_retrieved(retrieved: str | Path, kb: KnowledgeBase | None) -> pa.Table:
    """retrieved.parquet with key/shard columns (null where absent, as for LAION metadata) and a
    url column taken from the KB, part by part for the retrieved ids only, when it has none."""
    path = Path(retrieved)
    path = path / "retrieved.parquet" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no retrieved set at {path} (make one with `react-vl retrieve`)")
    table = pq.read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it has {table.column_names}")
    for name in ("key", "shard"):
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    if kb is not None and "url" not in table.column_names:
        urls = [kb.part_metadata(part, ["id", "url"]) for part in np.unique(part_of(table["id"].to_numpy()))
                if part in kb.part_rows]
        urls = [t.filter(pc.is_in(t["id"], value_set=table["id"])) for t in urls if "url" in t.column_names]
        if urls:
            urls = pa.concat_tables(urls)
            table = table.append_column("url", urls["url"].take(pc.index_in(table["id"], value_set=urls["id"])))
    return table


def _drop_rejected(retrieved: str | Path, table: pa.Table) -> tuple[pa.Table, int]:
    """The pairs left once those rejected in R/curation.json (`react-vl serve` writes it) are
    dropped, and how many were."""
    folder = Path(retrieved) if Path(retrieved).is_dir() else Path(retrieved).parent
    rejected = pa.array(sorted(rejected_ids(folder)), pa.int64())
    kept = table.filter(pc.invert(pc.is_in(table["id"], value_set=rejected)))
    return kept, table.num_rows - kept.num_rows


def _lineage(retrieved: str | Path) -> dict:
    """The retrieved set these shards are made from: its folder and `curation.fingerprint`, which
    the trainer copies into every checkpoint trained on them (react-vl serve traces pairs by it)."""
    path = Path(retrieved).resolve()
    return {"retrieved": str(path if path.is_dir() else path.parent), "fingerprint": fingerprint(path)}


def _kb_of(retrieved: str | Path, kb: str | Path | None) -> KnowledgeBase | None:
    """The KB given, else the one R/summary.json names (retrieve records it), else None."""
    if kb is None:
        summary = Path(retrieved) / "summary.json" if Path(retrieved).is_dir() else Path(retrieved).parent / "summary.json"
        kb = read_json(summary).get("kb") if summary.is_file() else None
        if kb is None or not Path(kb).is_dir():
            return None
    return KnowledgeBase(kb)


def _split(table: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(pairs in a readable shard sorted by shard and id, pairs to download by url, pairs with neither)."""
    shards = [s for s in pc.unique(table["shard"]).to_pylist() if s]
    readable = pa.array([s for s in shards if "://" in s or Path(s).is_file()], pa.string())
    local = pc.fill_null(pc.is_in(table["shard"], value_set=readable), False)
    rest = table.filter(pc.invert(local))
    has_url = pc.fill_null(pc.invert(pc.is_null(rest["url"])), False) if "url" in rest.column_names \
        else pa.array([False] * rest.num_rows, pa.bool_())
    local_rows = table.filter(local).sort_by([("shard", "ascending"), ("id", "ascending")])
    return local_rows, rest.filter(has_url), rest.filter(pc.invert(has_url))


def plan_units(local: pa.Table, maxcount: int) -> list[Unit]:
    """Cut the sorted pairs into units: whole source shards, at most one output shard of pairs
    per unit unless a single source shard holds more (then it alone fills several)."""
    counts = pc.value_counts(local["shard"]).to_pylist() if local.num_rows else []
    units, start, size = [], 0, 0
    for n in [c["counts"] for c in sorted(counts, key=lambda c: c["values"])]:
        if size and size + n > maxcount:
            units.append(Unit(start, start + size, 0, -(-size // maxcount)))
            start, size = start + size, 0
        size += n
    if size:
        units.append(Unit(start, start + size, 0, -(-size // maxcount)))
    first = 0
    for unit in units:
        unit.first, first = first, first + unit.shards
    return units


def _plan_fingerprint(local: pa.Table, units: list[Unit], maxcount: int, text: bool) -> str:
    """Changes with the pairs, their source shards, the cut into output shards or the members written."""
    digest = hashlib.sha256(json.dumps([maxcount, text, [asdict(unit) for unit in units],
                                        pc.unique(local["shard"]).to_pylist()]).encode())
    digest.update(np.ascontiguousarray(local["id"].to_numpy(), dtype=np.int64).tobytes())
    return digest.hexdigest()


def _prepare_state(out: Path, fingerprint: str) -> None:
    """Keep the state folder of this plan (a resume); for another plan, empty it and remove the
    old plan's output shards. Temporary files of a killed run go either way."""
    plan = out / STATE_DIR / "plan.json"
    if not plan.is_file() or read_json(plan).get("fingerprint") != fingerprint:
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
        for stale in out.glob("shard-*.tar"):
            stale.unlink()
        write_json({"fingerprint": fingerprint}, plan)
    for stale in out.glob(".shard-*.tar.*.tmp"):
        stale.unlink()


def shard_name(n: int) -> str:
    return f"shard-{n:06d}.tar"


def _record_path(out: Path, n: int) -> Path:
    return out / STATE_DIR / f"{shard_name(n)}.json"


def _sample(pair, row: dict, text_emb: bytes | None) -> dict:
    """The training sample: original image bytes, caption, the pair's retrieval record and, when
    the KB has them, its caption embedding."""
    source = {k: v for k, v in pair.extra.items() if k != "json"}
    try:
        source.update(json.loads(pair.extra.get("json") or "{}"))
    except json.JSONDecodeError:
        pass
    record = {**source, "id": row["id"], "key": row["key"], "source_shard": row["shard"],
              **{k: row.get(k) for k in ("score", "classes", "queries", "modes") if k in row}}
    sample = {"__key__": f"{row['id']:020d}", pair.image_ext: pair.image, "txt": row["caption"],
              "json": json.dumps(record).encode()}
    if text_emb is not None:
        sample[TEXT_EMB] = text_emb
    return sample


@lru_cache(maxsize=4)
def _open_kb(path: str) -> KnowledgeBase:
    return KnowledgeBase(path)


def _text_embeddings(kb_path: str | None, ids: list[int]) -> dict[int, bytes]:
    """id -> np.save bytes of the L2-normalised KB caption embedding (KB dtype); {} without a KB."""
    if kb_path is None or not ids:
        return {}
    kb = _open_kb(kb_path)
    rows = kb.embeddings_of("text_emb", np.asarray(ids)).astype(np.float32)
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    encoded = {}
    for i, row in zip(ids, rows.astype(kb.dtype)):
        buffer = io.BytesIO()
        np.save(buffer, row)
        encoded[i] = buffer.getvalue()
    return encoded


class _Output:
    """One output shard being written: a tar at a temporary path, renamed and recorded on finish
    (an output whose pairs were all missing leaves only its record)."""

    def __init__(self, out: Path, n: int, planned: int):
        self.out, self.n, self.remaining = out, n, planned
        self.stack, self.writer = contextlib.ExitStack(), None
        self.count, self.classes, self.missing, self.corrupt = 0, Counter(), SkipLog(), []

    def write(self, sample: dict, row: dict):
        if self.writer is None:
            self.writer = wds.TarWriter(str(self.stack.enter_context(atomic_path(self.out / shard_name(self.n)))))
        self.writer.write(sample)
        self.count += 1
        self.remaining -= 1
        self.classes.update(row.get("classes") or [])

    def finish(self):
        if self.writer is not None:
            self.writer.close()
            self.stack.close()  # renames the tar into place
        write_json({"count": self.count, "classes": dict(self.classes), "missing": self.missing.to_dict(),
                    "corrupt_shards": self.corrupt}, _record_path(self.out, self.n))

    def abandon(self):
        if self.writer is not None:
            self.writer.close()
            self.stack.__exit__(*sys.exc_info())  # inside an except block: the temporary file goes


def write_unit(unit: Unit, rows: list[dict], out: Path, maxcount: int, columns: ParquetColumns | None,
               kb_path: str | None) -> int:
    """Read the unit's source shards once and write its unrecorded output shards; returns pairs written."""
    chunks = {unit.first + j: rows[j * maxcount:(j + 1) * maxcount] for j in range(unit.shards)}
    chunks = {n: chunk for n, chunk in chunks.items() if not _record_path(out, n).is_file()}
    wanted = {(row["shard"], row["key"]): (n, row) for n, chunk in chunks.items() for row in chunk}
    per_shard = Counter(shard for shard, _ in wanted)
    text = _text_embeddings(kb_path, [row["id"] for _, row in wanted.values()])
    outputs = {n: _Output(out, n, len(chunk)) for n, chunk in chunks.items()}
    written = 0
    try:
        for shard in sorted(per_shard):
            errors = SkipLog()
            for pair in read_shard(shard, errors, columns):
                n, row = wanted.pop((shard, pair.key), (None, None))
                if row is None:
                    continue
                outputs[n].write(_sample(pair, row, text.get(row["id"])), row)
                written += 1
                if outputs[n].remaining == 0:
                    outputs.pop(n).finish()
                per_shard[shard] -= 1
                if per_shard[shard] == 0:
                    break  # the rest of this shard holds nothing asked for
            for output in outputs.values():
                output.corrupt.extend(errors.listed.get("corrupt shard", []))
        for (shard, key), (n, row) in wanted.items():
            outputs[n].missing.add("not found in its shard", f"{row['id']} ({shard}:{key})")
        for n in sorted(outputs):
            outputs.pop(n).finish()
    except BaseException:
        for output in outputs.values():
            output.abandon()
        raise
    return written


def materialize(retrieved: str | Path, out: str | Path, kb: str | Path | None = None, maxcount: int = 10000,
                run_img2dataset: bool = True, columns: ParquetColumns | None = None, workers: int = 1,
                download: DownloadOptions | None = None, progress: bool = True) -> dict:
    """Write the retrieved pairs of `retrieved` (R/ or its parquet) as shards in `out`.

    `kb` (default: the KB that R/summary.json names) supplies caption embeddings and a `url` by id
    for pairs without a local shard; `columns` names the columns of a parquet corpus, as given to
    embed; `workers` processes write units in parallel. Rerun to resume.
    Returns the summary, also written to out/summary.json.
    """
    started = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    knowledge = _kb_of(retrieved, kb)
    lineage = _lineage(retrieved)  # before reading: a decision written meanwhile shows as a changed curation
    table, rejected = _drop_rejected(retrieved, _read_retrieved(retrieved, knowledge))
    local, url_rows, nowhere = _split(table)
    text = knowledge is not None and knowledge.has_text
    units = plan_units(local, maxcount)
    _prepare_state(out, _plan_fingerprint(local, units, maxcount, text))
    planned = sum(unit.shards for unit in units)
    reused = sum(_record_path(out, n).is_file() for n in range(planned))
    todo = [u for u in units if not all(_record_path(out, n).is_file() for n in range(u.first, u.first + u.shards))]
    args = (out, maxcount, columns, str(knowledge.path) if text else None)
    with tqdm(total=planned, initial=reused, desc="materialize", unit="shard", disable=not progress) as bar:
        if workers <= 1:
            for unit in todo:
                write_unit(unit, local.slice(unit.start, unit.stop - unit.start).to_pylist(), *args)
                bar.update(unit.shards)
        else:
            _write_in_processes(todo, local, args, workers, bar)

    records = [read_json(_record_path(out, n)) for n in range(planned)]
    missing = SkipLog()
    for record in records:
        missing.update(record["missing"])
    for row in nowhere.select(["id", "shard"]).to_pylist():
        missing.add("no local shard and no url", f"{row['id']} ({row['shard']})")
    written_classes = sum((Counter(r["classes"]) for r in records), Counter())
    corrupt = SkipLog()  # listed in each output shard of its unit that was open then: counted once
    for item in sorted({item for r in records for item in r["corrupt_shards"]}):
        corrupt.add("corrupt shard", item)
    summary = {
        "count": sum(r["count"] for r in records),
        "shards": [shard_name(n) for n, r in enumerate(records) if r["count"]],
        "retrieved": table.num_rows + rejected, "rejected_by_curation": rejected, "lineage": lineage,
        "class_balance": _class_balance(table, written_classes),
        "missing": {"total": missing.total(), **missing.to_dict()},
        "corrupt_shards": corrupt.to_dict(),
        "text_embeddings": _text_embeddings_info(knowledge) if text else None,
        "url_pairs": _write_url_list(url_rows, out, run_img2dataset, maxcount, download or DownloadOptions())
        if url_rows.num_rows else None,
        "this_run": {"shards_written": planned - reused, "shards_reused": reused, "workers": workers},
        "seconds": round(time.time() - started, 3),
    }
    write_json(summary, out / "summary.json")
    return summary


def _write_in_processes(units: list[Unit], local: pa.Table, args: tuple, workers: int, bar: tqdm):
    """Units spread over `workers` processes, at most two each in flight (memory stays bounded)."""
    pending, queue = set(), list(reversed(units))
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        while queue or pending:
            while queue and len(pending) < 2 * workers:
                unit = queue.pop()
                future = pool.submit(write_unit, unit, local.slice(unit.start, unit.stop - unit.start).to_pylist(),
                                     *args)
                future.shards = unit.shards
                pending.add(future)
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()  # a fatal error (e.g. a wrong parquet column) stops the run here
                bar.update(future.shards)


def _text_embeddings_info(kb: KnowledgeBase) -> dict:
    """What the trainer checks cached caption embeddings against."""
    return {"model": kb.info.get("model"), "pretrained": kb.info.get("pretrained"), "dim": kb.dim,
            "text_tower_sha256": kb.info.get("text_tower_sha256")}


def _class_balance(table: pa.Table, written: Counter) -> dict:
    """Per class: pairs retrieved and pairs written; spread of the written counts."""
    retrieved = Counter()
    if "classes" in table.column_names:
        counts = pc.value_counts(pc.list_flatten(table["classes"])).to_pylist()
        retrieved = Counter({c["values"]: c["counts"] for c in counts})
    counts = [written[c] for c in retrieved]
    return {
        "per_class": {c: {"retrieved": retrieved[c], "written": written[c]} for c in sorted(retrieved)},
        "min": min(counts, default=0), "max": max(counts, default=0),
        "mean": round(sum(counts) / len(counts), 2) if counts else 0,
        "max_over_min": round(max(counts) / min(counts), 2) if counts and min(counts) else None,
        "empty_classes": sorted(c for c in retrieved if not written[c])[:MAX_LISTED_SKIPS],
    }


def img2dataset_command(url_list: Path, output_folder: Path, maxcount: int, options: DownloadOptions) -> list[str]:
    """img2dataset's command for a URL list: webdataset shards of `maxcount` samples, id and classes kept."""
    flags = [f"--{name}={value}" for name, value in asdict(options).items()]
    return ["img2dataset", "--url_list", str(url_list), "--input_format", "parquet",
            "--url_col", "url", "--caption_col", "caption", "--save_additional_columns", '["id","classes"]',
            "--output_format", "webdataset", "--output_folder", str(output_folder),
            f"--number_sample_per_shard={maxcount}", *flags]


def _write_url_list(url_rows: pa.Table, out: Path, run: bool, maxcount: int, options: DownloadOptions) -> dict:
    """The pairs to download as an img2dataset input parquet (url, caption, id, classes); img2dataset
    runs on it when installed (it resumes a killed download itself) and its output is counted."""
    url_list, downloaded = out / "img2dataset.parquet", out / "downloaded"
    classes = url_rows["classes"] if "classes" in url_rows.column_names else pa.array([[]] * url_rows.num_rows,
                                                                                         pa.list_(pa.string()))
    table = pa.table({"url": url_rows["url"], "caption": url_rows["caption"],
                      "id": url_rows["id"].cast(pa.int64()), "classes": classes})
    with atomic_path(url_list) as tmp:
        pq.write_table(table, tmp)
    command = img2dataset_command(url_list, downloaded, maxcount, options)
    installed = shutil.which("img2dataset") is not None
    returncode = subprocess.run(command, check=False).returncode if run and installed else None
    return {"count": url_rows.num_rows, "url_list": str(url_list), "img2dataset_command": command,
            "img2dataset_installed": installed, "img2dataset_returncode": returncode,
            "output_folder": str(downloaded),
            "downloaded": count_from_stats(str(downloaded)) if returncode == 0 and downloaded.is_dir() else None}
