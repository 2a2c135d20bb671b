"""The knowledge base on disk: the clip-retrieval embedding-folder layout plus `kb.json`.

    KB/img_emb/img_emb_N.npy, KB/text_emb/text_emb_N.npy, KB/metadata/metadata_N.parquet

Part N holds one input shard's pairs. Every pair has an explicit int64 `id`
(`make_ids(part, n)`), which is also its FAISS id, so nothing depends on file order.
Folders written by clip-retrieval (no `kb.json`, no `id` column) are read too; their ids are
then derived the same way from part number and row.
"""

import re
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .utils import atomic_path, read_json, write_json

PART_BITS = 32
_PART_RE = re.compile(r"_(\d+)\.npy$")


def make_ids(part: int, count: int) -> np.ndarray:
    return (np.int64(part) << PART_BITS) + np.arange(count, dtype=np.int64)


def part_of(ids: np.ndarray) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64) >> PART_BITS


def write_part(kb_dir: str | Path, part: int, img_emb: np.ndarray, text_emb: np.ndarray,
               metadata: pa.Table) -> None:
    """Write one part atomically; metadata rows align with embedding rows. Parquet goes last,
    so a part counts as finished only when its metadata file exists."""
    kb_dir = Path(kb_dir)
    if not (len(img_emb) == len(text_emb) == metadata.num_rows):
        raise ValueError(f"part {part}: {len(img_emb)} image rows, {len(text_emb)} text rows, "
                         f"{metadata.num_rows} metadata rows")
    if "id" not in metadata.column_names:
        metadata = metadata.append_column("id", pa.array(make_ids(part, metadata.num_rows)))
    for sub, arr in (("img_emb", img_emb), ("text_emb", text_emb)):
        with atomic_path(kb_dir / sub / f"{sub}_{part}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
    with atomic_path(kb_dir / "metadata" / f"metadata_{part}.parquet") as tmp:
        pq.write_table(metadata, tmp)


def finished_parts(kb_dir: str | Path) -> list[int]:
    """Parts whose three files all exist (metadata is written last)."""
    kb_dir = Path(kb_dir)
    parts = []
    for p in sorted((kb_dir / "metadata").glob("metadata_*.parquet")):
        n = int(p.stem.split("_")[-1])
        if (kb_dir / "img_emb" / f"img_emb_{n}.npy").exists() and (kb_dir / "text_emb" / f"text_emb_{n}.npy").exists():
            parts.append(n)
    return sorted(parts)


def write_info(kb_dir: str | Path, **info) -> None:
    write_json(info, Path(kb_dir) / "kb.json")


class KnowledgeBase:
    """Read access to a KB folder: info, embeddings (memory-mapped) and metadata, by part."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "img_emb").is_dir() and not (self.path / "text_emb").is_dir():
            raise FileNotFoundError(f"{self.path} is not a knowledge base: no img_emb/ or text_emb/ folder "
                                    f"(make one with `react-vl embed`)")
        self.parts = finished_parts(self.path) or self._embedding_parts()
        if not self.parts:
            raise FileNotFoundError(f"knowledge base {self.path} holds no finished part")

    def _embedding_parts(self) -> list[int]:
        return sorted(int(_PART_RE.search(p.name).group(1)) for p in (self.path / "img_emb").glob("img_emb_*.npy"))

    @cached_property
    def info(self) -> dict:
        """kb.json (model, pretrained, dim, ...); {} for a folder clip-retrieval wrote."""
        path = self.path / "kb.json"
        return read_json(path) if path.exists() else {}

    def _load(self, kind: str) -> np.ndarray:
        arrays = [np.load(self.path / kind / f"{kind}_{n}.npy", mmap_mode="r") for n in self.parts]
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    def image_embeddings(self) -> np.ndarray:
        return self._load("img_emb")

    def text_embeddings(self) -> np.ndarray:
        return self._load("text_emb")

    @cached_property
    def dim(self) -> int:
        return int(np.load(self.path / "img_emb" / f"img_emb_{self.parts[0]}.npy", mmap_mode="r").shape[1])

    def metadata(self, columns: list[str] | None = None) -> pa.Table:
        """All parts' metadata, concatenated in part order, always with an `id` column."""
        tables = []
        for n in self.parts:
            path = self.path / "metadata" / f"metadata_{n}.parquet"
            table = pq.read_table(path, columns=None if columns is None else
                                  [c for c in columns if c in pq.read_schema(path).names])
            if "id" not in table.column_names:
                table = table.append_column("id", pa.array(make_ids(n, table.num_rows)))
            tables.append(table)
        return pa.concat_tables(tables, promote_options="default")

    def ids(self) -> np.ndarray:
        return self.metadata(["id"]).column("id").to_numpy()

    def __len__(self) -> int:
        return sum(pq.read_metadata(self.path / "metadata" / f"metadata_{n}.parquet").num_rows for n in self.parts)
