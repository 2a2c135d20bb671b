"""Helpers several test modules share (plain functions; the shared fixtures are in conftest.py)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from react_vl.kb import KnowledgeBase, make_ids, write_info, write_part


def png_bytes(rng, size=24) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def make_shards(write_shards, folder: Path, shards: int, per_shard: int, seed: int = 0) -> list[Path]:
    """webdataset shards kb-NNNNNN.tar of random images with captions and a json sidecar (KEY.png/txt/json),
    written by conftest's `write_shards`; keys s{shard}-{index}."""
    rng = np.random.default_rng(seed)
    return [path for s in range(shards) for path in write_shards(
        folder, [{"__key__": f"s{s}-{i:04d}", "png": png_bytes(rng), "txt": f"a red circle number {i}",
                  "json": json.dumps({"shard": s, "index": i})} for i in range(per_shard)], prefix="kb", first=s)]


def run_cli(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "react_vl.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def clustered(n: int, dim: int, rng: np.random.Generator, n_clusters: int = 50) -> np.ndarray:
    """Normalised vectors around random centres: neighbours are meaningful, as with CLIP embeddings."""
    centres = rng.standard_normal((n_clusters, dim))
    x = centres[rng.integers(n_clusters, size=n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_kb(path, img, text, parts, model="mini-vit-test", pretrained=None, captions=None):
    """Write embeddings as KB parts, in the given (shuffled) part order; caption = 'row N' unless given."""
    chunks = np.array_split(np.arange(len(img)), len(parts))
    for part, rows in sorted(zip(parts, chunks), key=lambda pair: -pair[0]):  # write the last part first
        caps = [captions[r] if captions else f"row {r}" for r in rows]
        meta = pa.table({"key": [f"k{r:06d}" for r in rows], "caption": caps,
                         "shard": [f"shard-{part:06d}.tar"] * len(rows), "id": make_ids(part, len(rows))})
        write_part(path, part, img[rows], text[rows], meta)
    write_info(path, model=model, pretrained=pretrained, dim=img.shape[1], dtype=str(img.dtype), count=len(img),
               parts=len(parts))
    return KnowledgeBase(path)
