"""Corpus readers: every supported corpus becomes a sorted list of shards, each read as `Pair`s.

    shards = list_shards("WORLD/kb/kb-{000000..000009}.tar")     # or a folder, glob, URL, parquet
    for pair in read_shard(shards[0], skips):                     # Pair(key, image, caption, ...)

Three layouts are read, one shard at a time (a shard is the unit of resume and scale-out):
- webdataset tar shards: local paths, brace patterns, globs, folders of .tar, URLs (`open_shard`);
  members KEY.{png,jpg,...}, KEY.txt, optional KEY.json (kept as the string column `json`);
- parquet files with a caption column and image bytes or image paths (column names configurable);
- a folder of images with sidecar KEY.txt captions (img2dataset's folder output): each
  sub-folder holding images is a shard.
A folder with tars is read as its tars only, so the NNNNN.parquet and NNNNN_stats.json sidecars
of img2dataset's output are not taken for shards (nor, in its `files` layout, the parquet files
beside the image folders); `count_from_stats` sums its stats' successes without reading a shard.
Pairs without an image or caption, and shards that are corrupt or truncated, are recorded in a
`SkipLog` with the reason and never stop the reading; images are decoded later (`decode_image`),
by the consumer, in its own worker processes, with PIL's warnings counted, never printed.
"""

import glob
import io
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import braceexpand
import pyarrow.parquet as pq
from PIL import Image
from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_expander

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
MAX_LISTED_SKIPS = 1000  # per reason; the counts stay exact beyond it


class CorpusFormatError(ValueError):
    """The corpus does not have the layout asked for (e.g. a wrong column name): fatal, unlike a bad shard."""


@dataclass
class Pair:
    key: str
    image: bytes
    image_ext: str  # the original file extension, so materialized shards keep the original bytes
    caption: str
    shard: str
    extra: dict = field(default_factory=dict)  # source columns: json sidecar (as a string), url, ...


@dataclass
class ParquetColumns:
    """Which parquet columns hold what; the image column holds bytes, a path or {bytes, path}."""
    caption: str = "caption"
    image: str = "image"
    key: str = "key"


@dataclass
class SkipLog:
    """Pairs and shards left out, counted by reason and listed (up to MAX_LISTED_SKIPS per reason)."""
    counts: Counter = field(default_factory=Counter)
    listed: dict = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        items = self.listed.setdefault(reason, [])
        if len(items) < MAX_LISTED_SKIPS:
            items.append(where)

    def update(self, other: "SkipLog | dict") -> None:
        other = other if isinstance(other, dict) else other.to_dict()
        self.counts.update(other["counts"])
        for reason, items in other["listed"].items():
            mine = self.listed.setdefault(reason, [])
            mine.extend(items[:MAX_LISTED_SKIPS - len(mine)])

    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "listed": self.listed}


def is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")  # pipe: a shell command webdataset reads from


def _shard_kind(shard: str) -> str:
    name = shard.split("?")[0]
    if shard.startswith("pipe:"):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(TAR_EXTS):
        return "webdataset"
    if not is_url(shard) and Path(shard).is_dir():
        return "folder"
    raise ValueError(f"corpus shard {shard!r}: not a .tar, .parquet or image folder")


def _folder_shards(folder: Path) -> list[str]:
    """Sub-folders (and the folder itself) that directly hold images, as in img2dataset's output."""
    holders = {p.parent for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS}
    return sorted(str(p) for p in holders)


def _folder_contents(folder: Path) -> list[str]:
    """A folder's shards: its tars if it has any (an img2dataset folder's .parquet files are
    sidecars then), else image sub-folders when img2dataset wrote it (`_stats.json` files),
    else its parquet files, else its image sub-folders."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    tars = [str(p) for p in files if p.name.endswith(TAR_EXTS)]
    if tars:
        return tars
    if not any(p.name.endswith("_stats.json") for p in files):
        parquets = [str(p) for p in files if p.suffix == ".parquet"]
        if parquets:
            return parquets
    return _folder_shards(folder)


def list_shards(corpus: str | list[str]) -> list[str]:
    """Expand a corpus spec (paths, brace patterns, globs, folders, URLs) into a sorted shard list.

    Local paths become absolute, so the shard recorded in a KB can be reopened from anywhere.
    """
    specs = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    shards = []
    for spec in specs:
        for item in braceexpand.braceexpand(str(spec)):
            if is_url(item):
                shards.append(item)
                continue
            matches = sorted(glob.glob(os.path.expanduser(item))) if glob.has_magic(item) else [item]
            if not matches or not all(Path(m).exists() for m in matches):
                raise FileNotFoundError(f"corpus path not found: {item} (from corpus spec {spec!r})")
            for match in matches:
                path = Path(match).resolve()
                if path.is_dir():
                    shards.extend(_folder_contents(path))
                else:
                    shards.append(str(path))
    if not shards:
        raise FileNotFoundError(f"corpus {corpus!r} holds no shard (.tar, .parquet or images)")
    for shard in shards:
        _shard_kind(shard)
    return sorted(set(shards))


def _stats_path(shard: str) -> Path:
    """img2dataset's stats file of a shard: NNNNN_stats.json beside NNNNN.tar (or the NNNNN/ folder)."""
    path = Path(shard)
    name = path.name
    for ext in (*TAR_EXTS, ".parquet"):
        name = name.removesuffix(ext)
    return path.parent / f"{name}_stats.json"


def count_from_stats(folder_or_shards: str | list[str]) -> int | None:
    """Samples in an img2dataset output (folder, spec or shard list): the sum of `successes` over
    each shard's NNNNN_stats.json. None when a shard has no stats file (not written by
    img2dataset, or a download still running or killed: img2dataset writes the stats last)."""
    total = 0
    for shard in list_shards(folder_or_shards):
        stats = _stats_path(shard)
        if is_url(shard) or not stats.is_file():
            return None
        try:
            total += int(json.loads(stats.read_text())["successes"])
        except (ValueError, KeyError, TypeError) as err:
            raise CorpusFormatError(f"{stats}: not an img2dataset stats file ({type(err).__name__}: {err}); "
                                    f"it needs an integer 'successes'") from err
    return total


def open_shard(shard: str, seekable: bool = True):
    """A binary file object for a shard's local path or URL (the one shard opener of the package).

    seekable (parquet files, reads at an offset): a local file, or fsspec for a URL (s3://, gs://,
    https://, ...). seekable=False, for a tar read front to back: `pipe:` commands and the other
    schemes webdataset's gopen knows (http(s) via curl, gs, ais, hf, ...) through gopen, the rest
    (s3://, az://, ...) through fsspec (pip install fsspec s3fs).
    """
    if not is_url(shard):
        return open(shard, "rb")
    scheme = urlparse(shard).scheme
    if not seekable and scheme in gopen_schemes:
        return gopen(shard, "rb")
    if scheme == "pipe":
        raise ValueError(f"shard {shard!r}: a pipe: command's output can only be read front to back, "
                         f"not at an offset; give the shard's path or URL instead")
    import fsspec
    return fsspec.open(shard, "rb").open()


def read_shard(shard: str, skips: SkipLog, columns: ParquetColumns | None = None) -> Iterator[Pair]:
    """Yield the shard's pairs in file order; a corrupt or truncated shard is logged and ends early."""
    reader = {"webdataset": _read_tar, "parquet": _read_parquet, "folder": _read_folder}[_shard_kind(shard)]
    try:
        yield from reader(shard, skips, columns or ParquetColumns())
    except CorpusFormatError:
        raise
    except Exception as err:  # noqa: BLE001 - any reading error only loses this shard's remainder
        skips.add("corrupt shard", f"{shard}: {type(err).__name__}: {err}")


def _pair_or_skip(skips: SkipLog, shard: str, key: str, image: bytes | None, image_ext: str,
                  caption, extra: dict) -> Pair | None:
    if not image:
        skips.add("no image", f"{shard}:{key}")
        return None
    caption = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else caption
    if not isinstance(caption, str) or not caption.strip():
        skips.add("no caption", f"{shard}:{key}")
        return None
    return Pair(key, image, image_ext, caption.strip(), shard, extra)


def _read_tar(shard, skips, columns):
    with open_shard(shard, seekable=False) as stream:
        for sample in group_by_keys(tar_file_expander([{"url": shard, "stream": stream}])):
            key = sample["__key__"]
            image_ext = next((ext for ext in IMAGE_EXTS if ext in sample), "")
            extra = {"json": sample["json"].decode("utf-8", "replace")} if "json" in sample else {}
            pair = _pair_or_skip(skips, shard, key, sample.get(image_ext), image_ext, sample.get("txt"), extra)
            if pair:
                yield pair


def _read_parquet(shard, skips, columns):
    base = Path(shard).parent if not is_url(shard) else None
    with open_shard(shard) as stream:
        rows = (row for batch in pq.ParquetFile(stream).iter_batches(batch_size=1024) for row in batch.to_pylist())
        for row_number, row in enumerate(rows):
            for needed in (columns.caption, columns.image):
                if needed == columns.image and needed not in row and "url" in row:
                    raise _url_list_error(shard, "url")
                if needed not in row:
                    raise CorpusFormatError(f"{shard}: no column {needed!r} (it has {list(row)}); "
                                            f"set the column names (--caption-column, --image-column)")
            key = str(row.get(columns.key, row_number))
            image, image_ext = _parquet_image(row[columns.image], base, shard, columns.image)
            extra = {k: v for k, v in row.items()
                     if k not in (columns.caption, columns.image, columns.key) and not isinstance(v, bytes)}
            pair = _pair_or_skip(skips, shard, key, image, image_ext, row[columns.caption], extra)
            if pair:
                yield pair


def _url_list_error(shard: str, column: str) -> CorpusFormatError:
    return CorpusFormatError(
        f"{shard}: column {column!r} holds URLs, not images: this parquet is a URL list, which cannot be "
        f"embedded as it is. Download it first with img2dataset (the path `react-vl materialize` takes for "
        f"URL-only pairs): img2dataset --url_list {shard} --input_format parquet --url_col {column} "
        f"--caption_col caption --output_format webdataset --output_folder DIR, then `react-vl embed DIR`. "
        f"If its embeddings exist already (LAION's), index that folder instead: "
        f"`react-vl index KB --model NAME --pretrained TAG`")


def _parquet_image(value, base: Path | None, shard: str, column: str) -> tuple[bytes | None, str]:
    """Image bytes from a bytes value, a path (relative to the parquet file) or {bytes, path}."""
    path = None
    if isinstance(value, dict):
        value, path = value.get("bytes"), value.get("path")
    elif isinstance(value, str):
        value, path = None, value
    if value is None and path and is_url(path):
        raise _url_list_error(shard, column)
    ext = Path(path).suffix.lower().lstrip(".") if path else ""
    if value is None and path:
        full = Path(path) if Path(path).is_absolute() or base is None else base / path
        value = full.read_bytes() if full.is_file() else None
    return value, ext or (_sniff_ext(value) if value else "")


def _sniff_ext(data: bytes) -> str:
    """The file extension for image bytes that came without a name (read from the header only)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return {"jpeg": "jpg"}.get(image.format.lower(), image.format.lower())
    except Exception:  # noqa: BLE001 - undecodable bytes are counted when decoded, not here
        return "jpg"


def _read_folder(shard, skips, columns):
    folder = Path(shard)
    for image_path in sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTS):
        caption_path, json_path = image_path.with_suffix(".txt"), image_path.with_suffix(".json")
        caption = caption_path.read_text(errors="replace") if caption_path.is_file() else None
        extra = {"json": json_path.read_text(errors="replace")} if json_path.is_file() else {}
        pair = _pair_or_skip(skips, shard, image_path.stem, image_path.read_bytes(),
                             image_path.suffix.lower().lstrip("."), caption, extra)
        if pair:
            yield pair


def iter_corpus(corpus: str | list[str], skips: SkipLog | None = None,
                columns: ParquetColumns | None = None) -> Iterator[Pair]:
    """Every pair of every shard, shard by shard in sorted order."""
    skips = skips if skips is not None else SkipLog()
    for shard in list_shards(corpus):
        yield from read_shard(shard, skips, columns)


def _warning_reason(warning: warnings.WarningMessage) -> str:
    if issubclass(warning.category, Image.DecompressionBombWarning):
        return "decompression bomb warning"
    if "Transparency" in str(warning.message):
        return "palette transparency"
    return f"{warning.category.__name__}: {str(warning.message)[:80]}"


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (palette transparency goes through RGBA first)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, decode_warnings: SkipLog | None = None, where: str = "") -> Image.Image:
    """Fully decode to RGB (raises on corrupt or truncated bytes, which callers count as skips).

    PIL's warnings (decompression bomb, palette transparency, ...) are counted by reason in
    `decode_warnings` with `where` as the item, instead of printed; images over twice PIL's
    MAX_IMAGE_PIXELS raise DecompressionBombError, which callers count as skips too.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(io.BytesIO(data)) as image:
            rgb = to_rgb(image)
    if decode_warnings is not None:
        for warning in caught:
            decode_warnings.add(_warning_reason(warning), where)
    return rgb

