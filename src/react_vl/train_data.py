"""The training data stream: image-text webdataset shards split across ranks and loader workers.

    shard_set = open_shard_set("SHARDS/", env)                  # shards, sample count, caption embeddings
    batches = RankBatches([Source(shard_set, 64)], transform, tokenizer, seed=0, start=0,
                          rank=env.rank, world_size=env.world_size, workers=4)
    batch = batches.next()                                       # this rank's part of micro-batch 0

Each byte is read once per epoch. There are N = world_size x workers logical streams; stream s
(worker w of rank r: s = r * workers + w) reads, in each of its epochs e, the shards
`order_e[s::N]` (`order_e`: the shard list in a seeded order, the same on every rank) through a
seeded shuffle buffer, as webdataset's split_by_node / split_by_worker do. Micro-batch m is chunk
m of every stream (per_batch / N samples each), streams in order: so the global batches depend on
N only, not on how N is split into ranks and workers (1 rank x 2 workers and 2 ranks x 1 worker
train on the same batches). Each stream starts its next epoch, in a new shard order, when its
own shards are used up; with shards of equal size (materialize's and img2dataset's are, but the
last) every sample comes once per epoch.

Exact resume: every chunk carries its stream's cursor (its epoch, samples taken in it); a
checkpoint keeps the cursors, and a resumed stream replays that epoch's raw samples up to its
cursor without decoding them. Augmentation randomness is seeded per (micro-batch, stream).

Shard URLs: anything webdataset's `gopen` opens (local paths, `pipe:` commands, http(s) via curl,
gs, ais ...), other schemes (s3://, ...) through fsspec. The sample count of a shard set comes
from SHARDS/summary.json's `count`, else img2dataset's `*_stats.json`, else `train_num_samples`,
else it is counted once on rank 0 and sent to the others.
"""

import io
import itertools
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL.Image import DecompressionBombError
from tqdm import tqdm
from webdataset.tariterators import group_by_keys, tar_file_expander

from .data import IMAGE_EXTS, TAR_EXTS, SkipLog, count_from_stats, decode_image, is_url, list_shards, open_shard
from .loss import caption_ids
from .utils import read_json

TEXT_EMB = "text_emb.npy"  # a sample's precomputed caption embedding (np.save of a (dim,) array)


# --- shard sets --------------------------------------------------------------------------------
@dataclass
class ShardSet:
    spec: str
    shards: list[str]
    count: int | None  # samples, when known
    text_embeddings: dict | None = None  # summary.json's record when the samples carry KEY.text_emb.npy
    lineage: dict | None = None  # summary.json's record of the retrieved set materialized (materialize)


def _summary(spec: str, shards: list[str]) -> dict:
    """The shard set's summary.json: in SHARDS/ given as a folder, or beside shards that are all of it."""
    folder = Path(spec)
    if not is_url(spec) and folder.is_dir() and (folder / "summary.json").is_file():
        return read_json(folder / "summary.json")
    parents = {Path(s).parent for s in shards if not is_url(s)}
    if len(parents) == 1 and len(shards) == len([s for s in shards if Path(s).parent in parents]):
        candidate = next(iter(parents)) / "summary.json"
        if candidate.is_file():
            summary = read_json(candidate)
            if sorted(summary.get("shards") or []) == sorted(Path(s).name for s in shards):
                return summary
    return {}


def count_samples(shards: list[str]) -> int:
    """Readable image-text samples in `shards`, by reading them all (once: rank 0 only)."""
    skips = SkipLog()
    total = sum(1 for _ in tqdm(_raw_samples(shards, skips), desc="counting samples (pass --train-num-samples "
                                "to skip this)", unit=" samples", leave=False))
    if total == 0:
        raise ValueError(f"no readable image-text samples (an image and a .txt per key) in {len(shards)} "
                         f"shard(s): {shards[:3]}{' ...' if len(shards) > 3 else ''}; skipped: {dict(skips.counts)}")
    return total


def open_shard_set(spec, env, train_num_samples: int | None = None, need_count: bool = True) -> ShardSet:
    """The shards of `spec` and their sample count, found without reading them where possible.

    The count is SHARDS/summary.json's, else the sum of img2dataset's `successes`, else
    `train_num_samples`, else (when `need_count`) counted on rank 0 and broadcast.
    """
    shards = list_shards(spec)  # a folder, pattern or URL, or a list of them
    spec = str(spec) if isinstance(spec, (str, os.PathLike)) else ",".join(map(str, spec))
    not_tar = [s for s in shards if not s.startswith("pipe:") and not s.split("?")[0].endswith(TAR_EXTS)]
    if not_tar:
        raise ValueError(f"{spec}: customize reads webdataset .tar shards; {not_tar[:3]} are not (materialize a "
                         f"retrieved set, or convert the corpus with img2dataset --output_format webdataset)")
    summary = _summary(spec, shards)
    count = summary.get("count") if isinstance(summary.get("count"), int) else None
    if count is None and not any(is_url(s) for s in shards):
        count = count_from_stats(shards)
    count = count if count is not None else train_num_samples
    if count is None and need_count:
        count = env.gather(count_samples(shards) if env.is_main else None)[0]
    return ShardSet(spec, shards, count, summary.get("text_embeddings"), summary.get("lineage"))


# --- one logical stream ------------------------------------------------------------------------
def _raw_samples(shards: list[str], skips: SkipLog):
    """Complete raw samples (image and txt, undecoded) of `shards` in order; bad ones counted."""
    def handler(err: Exception) -> bool:  # webdataset appends the stream and the URL to err.args
        url, message = (err.args[-1], err.args[0]) if len(err.args) > 1 else ("?", err)
        skips.add("unreadable shard", f"{url}: {type(err).__name__}: {message}")
        return True

    for url in shards:
        try:
            stream = open_shard(url, seekable=False)
        except Exception as err:  # noqa: BLE001 - any opening error loses this shard only, counted
            skips.add("unreadable shard", f"{url}: {type(err).__name__}: {err}")
            continue
        try:
            for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=handler),
                                        handler=handler):
                if "txt" in sample and any(e in sample for e in IMAGE_EXTS):
                    yield sample
                else:
                    skips.add("missing image or txt", f"{url}:{sample.get('__key__')}")
        finally:
            try:
                stream.close()
            except Exception as err:  # noqa: BLE001 - e.g. a pipe: command that failed
                skips.add("unreadable shard", f"{url}: {type(err).__name__}: {err}")


class _SkipSink:
    """Where a stream's skips go: a throw-away log while it replays samples an earlier run counted."""

    def __init__(self, log: SkipLog):
        self.log = log

    def add(self, reason: str, where: str):
        self.log.add(reason, where)


def stream_samples(shards: list[str], streams: int, stream: int, seed: int, cursor: tuple[int, int],
                   skips: SkipLog, buffer: int):
    """(epoch, taken, raw sample) of logical stream `stream` of `streams`, from `cursor` = (epoch, taken) on.

    Epoch e reads the shards order_e[stream::streams] through a shuffle buffer, both seeded by
    (seed, e, stream); `taken` counts the samples the stream gave in epoch e, this one included.
    """
    epoch, resume_at = cursor
    sink = _SkipSink(SkipLog() if resume_at else skips)
    while True:
        order = list(shards)
        random.Random(f"{seed}-{epoch}-shards").shuffle(order)
        mine = order[stream::streams]
        rng = random.Random(f"{seed}-{epoch}-{stream}-buffer")
        taken = 0
        for sample in wds.shuffle(buffer, initial=buffer, rng=rng)(_raw_samples(mine, sink)):
            taken += 1
            if taken == resume_at:
                sink.log = skips
            if taken > resume_at:
                yield epoch, taken, sample
        if taken == 0:
            raise ValueError(f"data stream {stream} of {streams} read no image-text sample in epoch {epoch} from "
                             f"its {len(mine)} shard(s) {mine[:3]}{' ...' if len(mine) > 3 else ''}: "
                             f"skipped {dict(skips.counts) or dict(sink.log.counts)}; check that they open "
                             f"(e.g. `tar tf`), or list only readable shards")
        epoch, resume_at, sink.log = epoch + 1, 0, skips


# --- chunks and batches ------------------------------------------------------------------------
@dataclass
class Source:
    shard_set: ShardSet
    per_batch: int  # global samples per micro-batch from this source
    use_text_embeddings: bool = False  # take each sample's KEY.text_emb.npy as its text features

    @property
    def embedding_dim(self) -> int | None:
        return self.shard_set.text_embeddings["dim"] if self.use_text_embeddings else None


def check_streams(sources: list[Source], streams: int, workers_per_rank: int):
    """Every shard set needs a shard and every micro-batch a sample per logical stream."""
    for source in sources:
        shards = len(source.shard_set.shards)
        processes = streams // workers_per_rank
        if shards < streams:
            raise ValueError(f"{source.shard_set.spec}: {shards} shard(s) for {streams} data streams "
                             f"({processes} process(es) x {workers_per_rank} loader worker(s)); each stream reads "
                             f"its own shards: pass --workers {max(1, shards // processes)} or fewer, or "
                             f"materialize with a smaller --maxcount so there are >= {streams} shards")
        if source.per_batch % streams:
            raise ValueError(f"{source.per_batch} samples per batch from {source.shard_set.spec} do not split over "
                             f"{streams} data streams (processes x loader workers); choose a --batch-size (and "
                             f"--mix-ratio) that makes it a multiple of {streams}")


def _decode(sample: dict, transform, embedding_dim: int | None, skips: SkipLog):
    """(image tensor, caption, embedding or None) of a raw sample, or None when it is skipped.

    `embedding_dim`: the sample's KEY.text_emb.npy is its text features, of that size.
    """
    where = f"{sample.get('__url__')}:{sample.get('__key__')}"
    if embedding_dim and TEXT_EMB not in sample:
        skips.add("no caption embedding", where)
        return None
    try:
        embedding = None
        if embedding_dim:
            embedding = torch.from_numpy(np.load(io.BytesIO(sample[TEXT_EMB])).astype(np.float32))
            if embedding.shape != (embedding_dim,):
                skips.add(f"caption embedding of shape {tuple(embedding.shape)}, not ({embedding_dim},)", where)
                return None
        ext = next(e for e in IMAGE_EXTS if e in sample)
        image = transform(decode_image(sample[ext], skips, where))
        caption = sample["txt"].decode("utf-8").strip()
    except (OSError, ValueError, EOFError, DecompressionBombError) as err:  # truncated image, bad encoding
        skips.add(f"undecodable: {type(err).__name__}", where)
        return None
    return image, caption, embedding


class StreamChunks(torch.utils.data.IterableDataset):
    """Chunk after chunk (from micro-batch `start` on) of the logical streams this process serves."""

    def __init__(self, sources: list[Source], transform, tokenizer, seed: int, start: int, cursors: list[dict],
                 rank: int = 0, world_size: int = 1, workers: int = 1, buffer: int = 1000):
        self.sources, self.transform, self.tokenizer, self.seed, self.start = sources, transform, tokenizer, seed, start
        self.cursors, self.rank, self.world_size, self.workers, self.buffer = cursors, rank, world_size, workers, buffer

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        stream = self.rank * self.workers + (info.id if info else 0)
        streams = self.world_size * self.workers
        skips = SkipLog()
        raws = [stream_samples(s.shard_set.shards, streams, stream, self.seed + 7919 * k,
                               tuple(self.cursors[k].get(stream, (0, 0))), skips, self.buffer)
                for k, s in enumerate(self.sources)]
        cursors = [tuple(c.get(stream, (0, 0))) for c in self.cursors]
        for micro in itertools.count(self.start):
            _seed_everything(self.seed * 1_000_003 + micro * streams + stream)
            rows, keys = [], []
            for k, (source, raw) in enumerate(zip(self.sources, raws)):
                for epoch, taken, sample in itertools.islice(raw, source.per_batch // streams):
                    cursors[k] = (epoch, taken)
                    row = _decode(sample, self.transform, source.embedding_dim, skips)
                    if row is not None:
                        rows.append(row)
                        keys.append(sample["__key__"])
            yield self._chunk(stream, micro, rows, keys, list(cursors), skips)
            skips.counts.clear()
            skips.listed.clear()

    def _chunk(self, stream, micro, rows, keys, cursors, skips) -> dict:
        images, captions, embeddings = zip(*rows) if rows else ((), (), ())
        dim = max((s.embedding_dim or 0 for s in self.sources), default=0)
        return {"stream": stream, "micro": micro, "keys": keys, "cursors": cursors,
                "skipped": {"counts": dict(skips.counts), "listed": {k: list(v) for k, v in skips.listed.items()}},
                "images": torch.stack(images) if rows else torch.empty(0),
                "tokens": self.tokenizer(list(captions)) if rows else torch.empty(0, dtype=torch.long),
                "text_ids": caption_ids(list(captions)),
                "has_embedding": torch.tensor([e is not None for e in embeddings], dtype=torch.bool),
                "embeddings": torch.stack([e if e is not None else torch.zeros(dim) for e in embeddings])
                if dim and rows else torch.empty(0, dim) if dim else None}


def _seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RankBatches:
    """This rank's part of each micro-batch: one chunk from each of its streams, in stream order.

    `cursors[k][stream]` is where each stream of source k stands after the last micro-batch
    taken, which a checkpoint records. workers=0 reads in this process (one stream per rank).
    """

    def __init__(self, sources: list[Source], transform, tokenizer, seed: int, start: int, rank: int = 0,
                 world_size: int = 1, workers: int = 1, cursors: list[dict] | None = None, buffer: int = 1000):
        self.streams_here = max(1, workers)
        self.cursors = [dict(c) for c in cursors] if cursors else [{} for _ in sources]
        dataset = StreamChunks(sources, transform, tokenizer, seed, start, [dict(c) for c in self.cursors], rank,
                               world_size, self.streams_here, buffer)
        self.loader = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                       persistent_workers=False))

    def next(self) -> dict:
        chunks = [next(self.loader) for _ in range(self.streams_here)]
        skips = SkipLog()
        for chunk in chunks:
            skips.update(chunk["skipped"])
            for k, cursor in enumerate(chunk["cursors"]):
                self.cursors[k][chunk["stream"]] = tuple(cursor)
        batch = {"micro": chunks[0]["micro"], "keys": [key for c in chunks for key in c["keys"]], "skipped": skips}
        for name in ("images", "tokens", "text_ids", "has_embedding"):
            batch[name] = torch.cat([c[name] for c in chunks if len(c[name])] or [chunks[0][name]])
        embeddings = [c["embeddings"] for c in chunks]
        batch["embeddings"] = torch.cat(embeddings) if embeddings[0] is not None else None
        return batch

    def close(self):
        del self.loader  # stops the loader workers
