"""The knowledge base on disk: the clip-retrieval embedding-folder layout plus `kb.json`.

    KB/img_emb/img_emb_N.npy, KB/text_emb/text_emb_N.npy, KB/metadata/metadata_N.parquet

Part N holds one input shard's pairs. Every pair has an explicit int64 `id`
(`make_ids(part, n)`), which is also its FAISS id, so nothing depends on file order.
Folders as clip-retrieval and LAION publish them are read as they were downloaded: part numbers
padded or not (`img_emb_0000.npy`), the metadata folder under any name
(`laion2B-en-metadata/metadata_0000.parquet`), metadata without an `id` column (ids are then
derived the same way from part number and row), no text embeddings (the KB then serves image
search only: `has_text`). `record_model` writes the kb.json of such a folder. Parts that
disagree in dimension or dtype, or whose metadata rows do not match their embedding rows, are
refused when the KB is opened, with the part and the numbers.
"""

import re
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .utils import atomic_path, read_json, write_json

PART_BITS = 32
EMBEDDINGS = ("img_emb", "text_emb")
_PART_RE = re.compile(r"^(img_emb|text_emb|metadata)_(\d+)\.(npy|parquet)$")


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


def _part_files(folder: Path, kind: str) -> dict[int, Path]:
    """{part number: file} of a folder's KIND_N files, N padded or not."""
    files = {}
    for path in sorted(folder.glob(f"{kind}_*")) if folder.is_dir() else []:
        match = _PART_RE.match(path.name)
        if match and match.group(1) == kind:
            part = int(match.group(2))
            if part in files:
                raise ValueError(f"{folder}: {files[part].name} and {path.name} are both part {part}")
            files[part] = path
    return files


def metadata_folder(kb_dir: str | Path) -> Path:
    """The sub-folder holding metadata_N.parquet: `metadata/`, else the only other one (LAION
    names it e.g. `laion2B-en-metadata/`). Raises when none or several are there."""
    kb_dir = Path(kb_dir)
    if (kb_dir / "metadata").is_dir():
        return kb_dir / "metadata"
    found = sorted(p for p in kb_dir.iterdir() if p.is_dir() and p.name not in EMBEDDINGS
                   and next(p.glob("metadata_*.parquet"), None)) if kb_dir.is_dir() else []
    if len(found) != 1:
        raise FileNotFoundError(
            f"{kb_dir}: {'several folders' if found else 'no folder'} of metadata_N.parquet files "
            f"({', '.join(p.name for p in found) or 'expected metadata/'}); "
            f"keep one, or name the right one metadata/")
    return found[0]


def finished_parts(kb_dir: str | Path) -> list[int]:
    """Parts whose three files all exist (embed writes metadata last)."""
    kb_dir = Path(kb_dir)
    metadata = _part_files(kb_dir / "metadata", "metadata")
    images, texts = _part_files(kb_dir / "img_emb", "img_emb"), _part_files(kb_dir / "text_emb", "text_emb")
    return sorted(set(metadata) & set(images) & set(texts))


def write_info(kb_dir: str | Path, **info) -> None:
    write_json(info, Path(kb_dir) / "kb.json")


def _rows_of(part_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row positions of `ids` in a part whose metadata ids are `part_ids`; -1 where absent."""
    order = np.argsort(part_ids)
    pos = np.clip(np.searchsorted(part_ids, ids, sorter=order), 0, max(len(order) - 1, 0))
    rows = order[pos] if len(order) else np.zeros(len(ids), np.int64)
    found = part_ids[rows] == ids if len(order) else np.zeros(len(ids), bool)
    return np.where(found, rows, -1)


class KnowledgeBase:
    """Read access to a KB folder: info, embeddings (memory-mapped) and metadata, by part."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "img_emb").is_dir():
            raise FileNotFoundError(f"{self.path} is not a knowledge base: no img_emb/ folder "
                                    f"(make one with `react-vl embed`)")
        self.files = {"img_emb": _part_files(self.path / "img_emb", "img_emb"),
                      "text_emb": _part_files(self.path / "text_emb", "text_emb"),
                      "metadata": _part_files(metadata_folder(self.path), "metadata")}
        self.parts = sorted(self.files["img_emb"])
        if not self.parts:
            raise FileNotFoundError(f"knowledge base {self.path} holds no part (no img_emb/img_emb_N.npy)")
        self.part_rows = {part: self._check_part(part) for part in self.parts}
        stray = sorted((set(self.files["metadata"]) | set(self.files["text_emb"])) - set(self.parts))
        if stray:
            raise ValueError(f"{self.path}: metadata or text embeddings for part(s) {stray[:10]} that have no "
                             f"img_emb_N.npy (an incomplete download?)")

    @property
    def has_text(self) -> bool:
        """Whether caption embeddings are there (LAION-5B folders may have image embeddings only)."""
        return bool(self.files["text_emb"])

    @cached_property
    def _first(self) -> np.ndarray:
        return np.load(self.files["img_emb"][self.parts[0]], mmap_mode="r")

    @property
    def dim(self) -> int:
        return int(self._first.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return self._first.dtype

    def _check_part(self, part: int) -> int:
        """The part's row count, once its files are there and agree with each other and with part 0."""
        needed = ("text_emb", "metadata") if self.has_text else ("metadata",)
        for kind in needed:
            if part not in self.files[kind]:
                raise ValueError(f"{self.path}: part {part} has {self.files['img_emb'][part].name} but no "
                                 f"{kind}_{part}.{'parquet' if kind == 'metadata' else 'npy'} (an unfinished "
                                 f"`react-vl embed`: rerun it; or an incomplete download)")
        counts = {"metadata": pq.read_metadata(self.files["metadata"][part]).num_rows}
        for kind in ("img_emb", "text_emb") if self.has_text else ("img_emb",):
            emb, name = np.load(self.files[kind][part], mmap_mode="r"), self.files[kind][part].name
            if emb.ndim != 2 or (emb.shape[1], emb.dtype) != (self.dim, self.dtype):
                raise ValueError(f"{self.path}: part {part} ({name}) holds {emb.shape} {emb.dtype} embeddings, "
                                 f"{self.files['img_emb'][self.parts[0]].name} {self.dim}-d {self.dtype}: every "
                                 f"part must come from one model and be stored in one dtype")
            counts[kind] = emb.shape[0]
        if len(set(counts.values())) != 1:
            raise ValueError(f"{self.path}: part {part} rows disagree: "
                             + ", ".join(f"{n} in {self.files[k][part].name}" for k, n in counts.items())
                             + " (metadata row i must describe embedding row i)")
        return counts["metadata"]

    @cached_property
    def info(self) -> dict:
        """kb.json (model, pretrained, dim, ...); {} for a folder no one recorded (see record_model)."""
        path = self.path / "kb.json"
        return read_json(path) if path.exists() else {}

    def part_embeddings(self, kind: str, part: int) -> np.ndarray:
        """One part's embeddings, memory-mapped; kind: img_emb or text_emb."""
        if kind == "text_emb" and not self.has_text:
            raise ValueError(f"{self.path} has no caption embeddings (no text_emb/ folder, as in LAION-5B's "
                             f"image-only folders): it serves image search (t2i) only")
        return np.load(self.files[kind][part], mmap_mode="r")

    def _load(self, kind: str) -> np.ndarray:
        arrays = [self.part_embeddings(kind, n) for n in self.parts]
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    def image_embeddings(self) -> np.ndarray:
        return self._load("img_emb")

    def text_embeddings(self) -> np.ndarray:
        return self._load("text_emb")

    def metadata_path(self, part: int) -> Path:
        return self.files["metadata"][part]

    def metadata(self, columns: list[str] | None = None) -> pa.Table:
        """All parts' metadata, concatenated in part order, always with an `id` column."""
        return pa.concat_tables([self.part_metadata(n, columns) for n in self.parts], promote_options="default")

    def part_metadata(self, part: int, columns: list[str] | None = None) -> pa.Table:
        """One part's metadata (the given columns where present), always with an `id` column."""
        path = self.metadata_path(part)
        table = pq.read_table(path, columns=None if columns is None else
                              [c for c in columns if c in pq.read_schema(path).names])
        if "id" not in table.column_names:
            table = table.append_column("id", pa.array(make_ids(part, table.num_rows)))
        return table

    def part_ids(self, part: int) -> np.ndarray:
        """The ids of one part, in row order (only its `id` column is read)."""
        return self.part_metadata(part, ["id"]).column("id").to_numpy()

    def ids(self) -> np.ndarray:
        return self.metadata(["id"]).column("id").to_numpy()

    def embeddings_of(self, kind: str, ids: np.ndarray) -> np.ndarray:
        """The embeddings of the given ids (any order), read part by part; KeyError names an unknown id."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=self.dtype)
        parts = part_of(ids)
        for part in np.unique(parts).tolist():
            wanted = np.flatnonzero(parts == part)
            part_ids = self.part_ids(part) if part in self.part_rows else []
            rows = _rows_of(np.asarray(part_ids, dtype=np.int64), ids[wanted])
            if (rows < 0).any():
                raise KeyError(f"{self.path}: id {ids[wanted][rows < 0][0]} is in no part's metadata")
            order = np.argsort(rows)
            out[wanted[order]] = self.part_embeddings(kind, part)[rows[order]]
        return out

    def __len__(self) -> int:
        return sum(self.part_rows.values())


def record_model(kb_path: str | Path, model: str, pretrained: str | None) -> dict:
    """Write kb.json for a folder another tool embedded (clip-retrieval, LAION's downloads): the
    model and pretrained tag that made its embeddings, which the queries must use, plus dim,
    dtype, count and parts read from the files. Refuses a model whose embedding width differs
    from the files', or a kb.json that names another model. Returns the info written."""
    import open_clip

    from . import models  # noqa: F401 - registers the package's own model configs (mini-vit, ...) with open_clip

    kb = KnowledgeBase(kb_path)
    config = open_clip.get_model_config(model) if not model.startswith(("hf-hub:", "local-dir:")) else {}
    if config is None:
        raise ValueError(f"unknown model {model!r}; open_clip knows: {', '.join(open_clip.list_models())}")
    if config and config["embed_dim"] != kb.dim:
        raise ValueError(f"{model} makes {config['embed_dim']}-d embeddings, but {kb.path} holds {kb.dim}-d ones "
                         f"({kb.files['img_emb'][kb.parts[0]].name}): name the model that embedded it")
    made_with = {k: kb.info[k] for k in ("model", "pretrained") if k in kb.info}
    if made_with and made_with != {"model": model, "pretrained": pretrained}:
        raise ValueError(f"{kb.path}/kb.json records {made_with}, not model {model!r} / pretrained "
                         f"{pretrained!r}; delete it first if it is wrong")
    info = {**kb.info, "model": model, "pretrained": pretrained, "dim": kb.dim, "dtype": kb.dtype.name,
            "count": len(kb), "parts": len(kb.parts), "has_text": kb.has_text}
    info.setdefault("text_tower_sha256", None)
    write_info(kb.path, **info)
    return info
