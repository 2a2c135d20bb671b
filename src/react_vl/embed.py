"""Embed an image-text corpus into a knowledge base (the clip-retrieval layout, see kb.py).

    embed_corpus("WORLD/kb", "mini-vit", None, "KB")
    torchrun --nproc_per_node 2 -m react_vl.cli embed WORLD/kb --model mini-vit --out KB

Part N holds the pairs of sorted shard N. DataLoader workers read and decode whole shards with
the model's own preprocess and tokenizer and hand over batches that never cross a shard; the
main process encodes them and writes a part as soon as its shard is done. Finished parts are
never redone, so the same command resumes after a crash (kill -9 included) and ends with the
embeddings an uninterrupted run makes; a part made with another model, weights (the text
tower's fingerprint), dtype or autocast is refused. Under torchrun (or srun), rank r takes
shards r, r+N, r+2N, ... and rank 0 writes kb.json and embed_summary.json once every rank is
done. PIL's warnings are counted per reason in the summary's `decode_warnings`, never printed.
"""

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from .data import ParquetColumns, SkipLog, decode_image, list_shards, read_shard
from .distributed import init_distributed
from .kb import finished_parts, make_ids, write_info, write_part
from .models import load_model, text_tower_fingerprint
from .utils import autocast_dtype, keep_freed_memory, write_json

PART_META_KEY = b"react_vl"  # parquet schema metadata of each part: model, shard, skips


class ShardBatches(IterableDataset):
    """Yields, per shard, preprocessed batches of at most `batch_size` pairs and a final batch
    with `done=True` that carries the shard's skip and decode-warning logs. Each worker takes
    every k-th shard."""

    def __init__(self, shards: list[str], parts: list[int], preprocess, tokenizer, batch_size: int,
                 columns: ParquetColumns):
        self.shards, self.parts = shards, parts
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.batch_size, self.columns = batch_size, columns

    def __iter__(self):
        worker = get_worker_info()
        parts = self.parts if worker is None else self.parts[worker.id::worker.num_workers]
        for part in parts:
            skips, decode_warnings, pending = SkipLog(), SkipLog(), []
            for pair in read_shard(self.shards[part], skips, self.columns):
                try:
                    image = decode_image(pair.image, decode_warnings, f"{pair.shard}:{pair.key}")
                    pending.append((self.preprocess(image), pair))
                except Exception as err:  # noqa: BLE001 - a bad image is a counted skip, never fatal
                    skips.add("undecodable image", f"{pair.shard}:{pair.key}: {type(err).__name__}")
                if len(pending) == self.batch_size:
                    yield self._batch(part, pending)
                    pending = []
            yield {**self._batch(part, pending), "done": True, "skips": skips.to_dict(),
                   "decode_warnings": decode_warnings.to_dict()}

    def _batch(self, part: int, pending: list) -> dict:
        pairs = [pair for _, pair in pending]
        return {
            "part": part, "done": False, "pairs": [(p.key, p.caption, p.extra) for p in pairs],
            "images": torch.stack([image for image, _ in pending]) if pending else None,
            "texts": self.tokenizer([p.caption for p in pairs]) if pending else None,
        }


def _part_record(kb_dir: Path, part: int) -> dict:
    schema = pq.read_schema(kb_dir / "metadata" / f"metadata_{part}.parquet")
    return json.loads((schema.metadata or {}).get(PART_META_KEY, b"{}"))


def _check_resumable(kb_dir: Path, done: list[int], shards: list[str], made_with: dict):
    """Refuse to mix parts from another model, weights, dtype, autocast or corpus into one KB."""
    for part in done:
        record = _part_record(kb_dir, part)
        want = {**made_with, "shard": shards[part] if part < len(shards) else None}
        # parts from before react-vl recorded the autocast are taken as they are
        have = {k: record.get(k, want[k] if k == "autocast" else None) for k in want}
        if have != want:
            raise ValueError(f"{kb_dir}: part {part} was made with {have}, this run asks for {want}; "
                             f"use another --out folder (or delete {kb_dir}) to start over")


def _remove_stale_temp_files(kb_dir: Path, parts: list[int]):
    """Temporary files a killed run left behind (atomic writes never finished)."""
    for part in parts:
        for sub, suffix in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
            for tmp in (kb_dir / sub).glob(f".{sub}_{part}.{suffix}.*.tmp"):
                tmp.unlink(missing_ok=True)


def _metadata_table(part: int, shard: str, rows: list, record: dict) -> pa.Table:
    """id, key, caption, shard, then the source columns (json sidecar, url, ...), None where absent;
    a source column named like one of the first four is kept as source_<name>."""
    columns = {
        "id": pa.array(make_ids(part, len(rows))),
        "key": pa.array([key for key, _, _ in rows], pa.string()),
        "caption": pa.array([caption for _, caption, _ in rows], pa.string()),
        "shard": pa.array([shard] * len(rows), pa.string()),
    }
    for name in sorted({name for _, _, extra in rows for name in extra}):
        columns[f"source_{name}" if name in columns else name] = pa.array([extra.get(name) for _, _, extra in rows])
    return pa.table(columns).replace_schema_metadata({PART_META_KEY: json.dumps(record)})


def _encode(model, images: torch.Tensor, texts: torch.Tensor, device) -> tuple[np.ndarray, np.ndarray]:
    image_emb = F.normalize(model.encode_image(images.to(device, non_blocking=True)).float(), dim=-1)
    text_emb = F.normalize(model.encode_text(texts.to(device, non_blocking=True)).float(), dim=-1)
    return image_emb.cpu().numpy(), text_emb.cpu().numpy()


def _load(model: str | None, pretrained: str | None, device, precision: str, dtype: str):
    """(model, preprocess, tokenizer, embedding width, autocast dtype, the `made_with` record)."""
    torch.manual_seed(0)  # randomly initialised models (no --pretrained) must agree across resumes and ranks
    clip, preprocess, tokenizer = load_model(model, pretrained, device=device)
    amp_dtype = autocast_dtype(precision, device)
    made_with = {"model": clip.react_vl["model"], "pretrained": pretrained, "dtype": dtype,
                 "autocast": str(amp_dtype).removeprefix("torch.") if amp_dtype else "off",
                 "text_tower_sha256": text_tower_fingerprint(clip)}
    with torch.inference_mode():  # the embedding width, for shards with no usable pair
        dim = clip.encode_text(tokenizer(["a"]).to(device)).shape[-1]
    return clip, preprocess, tokenizer, dim, amp_dtype, made_with


def embed_corpus(corpus: str | list[str], model: str | None, pretrained: str | None, out: str | Path,
                 batch_size: int = 256, workers: int = 4, dtype: str = "float16", device: str = "auto",
                 precision: str = "auto", columns: ParquetColumns | None = None, progress: bool = True) -> dict:
    """Embed every pair of `corpus` with an open_clip model into the KB folder `out`.

    dtype: how embeddings are stored; precision: the autocast the models run under (utils.autocast_dtype).
    Returns the summary (also written to out/embed_summary.json by rank 0).
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    started = time.time()
    kb_dir = Path(out)
    env = init_distributed(device)
    if env.device.type == "cpu":
        keep_freed_memory()
    shards = list_shards(corpus)
    clip, preprocess, tokenizer, dim, amp_dtype, made_with = _load(model, pretrained, env.device, precision, dtype)

    mine = list(range(env.rank, len(shards), env.world_size))
    done = [p for p in finished_parts(kb_dir) if p in mine]
    _check_resumable(kb_dir, done, shards, made_with)
    todo = [p for p in mine if p not in done]
    _remove_stale_temp_files(kb_dir, todo)

    dataset = ShardBatches(shards, todo, preprocess, tokenizer, batch_size, columns or ParquetColumns())
    loader = DataLoader(dataset, batch_size=None, num_workers=min(workers, len(todo)),
                        pin_memory=env.device.type == "cuda")
    open_parts: dict[int, list] = {}
    pairs_done = parts_done = 0
    bar = tqdm(desc=f"embed (rank {env.rank})" if env.distributed else "embed", unit="pair",
               disable=not progress or not todo, dynamic_ncols=True)
    with torch.inference_mode(), torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for batch in loader:
            part = batch["part"]
            chunks = open_parts.setdefault(part, [])
            if batch["images"] is not None:
                chunks.append((*_encode(clip, batch["images"], batch["texts"], env.device), batch["pairs"]))
                pairs_done += len(batch["pairs"])
                bar.update(len(batch["pairs"]))
            if batch["done"]:
                _finish_part(kb_dir, part, shards[part], open_parts.pop(part), batch, dim, made_with)
                parts_done += 1
                bar.total = round(pairs_done / parts_done * len(todo))  # an estimate, for the ETA
                bar.refresh()
    bar.close()
    rank_stats = {"rank": env.rank, "pairs": pairs_done, "parts": parts_done, "seconds": time.time() - started}
    all_stats = env.gather(rank_stats)  # also the barrier before rank 0 reads all parts
    summary = _summarize(kb_dir, shards, corpus, made_with, all_stats) if env.is_main else None
    env.barrier()
    env.close()
    return summary


def _finish_part(kb_dir, part, shard, chunks, last_batch, dim, made_with):
    image_emb = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros((0, dim), np.float32)
    text_emb = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros((0, dim), np.float32)
    rows = [row for c in chunks for row in c[2]]
    record = {**made_with, "shard": shard, "pairs": len(rows), "skipped": last_batch["skips"],
              "decode_warnings": last_batch["decode_warnings"]}
    write_part(kb_dir, part, image_emb.astype(made_with["dtype"]), text_emb.astype(made_with["dtype"]),
               _metadata_table(part, shard, rows, record))


def _summarize(kb_dir, shards, corpus, made_with, rank_stats) -> dict:
    """kb.json and embed_summary.json from every finished part (this run's and earlier runs')."""
    parts = finished_parts(kb_dir)
    records = {part: _part_record(kb_dir, part) for part in parts}
    skips, decode_warnings = SkipLog(), SkipLog()
    for record in records.values():
        skips.update(record["skipped"])
        decode_warnings.update(record["decode_warnings"])
    count = sum(r["pairs"] for r in records.values())
    dim = int(np.load(kb_dir / "img_emb" / f"img_emb_{parts[0]}.npy", mmap_mode="r").shape[1]) if parts else None
    missing = sorted(set(range(len(shards))) - set(parts))
    if not missing:
        write_info(kb_dir, **made_with, dim=dim, count=count, parts=len(shards),
                   corpus=corpus if isinstance(corpus, str) else list(corpus))
    pairs_this_run = sum(s["pairs"] for s in rank_stats)
    seconds = max(s["seconds"] for s in rank_stats)
    summary = {
        **made_with, "dim": dim,
        "count": count, "parts": len(parts), "shards": len(shards), "missing_parts": missing,
        "skipped_total": skips.total(), "skipped": skips.to_dict(),
        "decode_warnings_total": decode_warnings.total(), "decode_warnings": decode_warnings.to_dict(),
        "this_run": {"pairs": pairs_this_run, "seconds": round(seconds, 3),
                     "pairs_per_second": round(pairs_this_run / seconds, 2) if seconds else None,
                     "ranks": rank_stats},
    }
    write_json(summary, kb_dir / "embed_summary.json")
    return summary
