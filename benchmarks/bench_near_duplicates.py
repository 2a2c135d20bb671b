"""Can an embedding threshold tell a copy from a distinct image in this KB's space?

    nice -n 10 python benchmarks/bench_near_duplicates.py --kb react-vl-demo/kb

For --n images of the KB's first part it measures, in the KB's own model space:
- the cosine to the nearest *other* KB image (every part searched, exactly);
- the cosine between the image's embedding and its JPEG copy's at each --quality, both encoded
  as the KB was;
- at the paper's threshold (0.95) and tighter ones: the share of copies a filter would catch,
  and the share of images it would remove for a distinct neighbour.
A threshold separates copies from distinct images only if it catches most copies and removes
few images. Writes the figures as JSON to --out.
"""

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from react_vl.data import IMAGE_EXTS
from react_vl.kb import KnowledgeBase
from react_vl.models import load_model
from react_vl.utils import read_json

THRESHOLDS = (0.95, 0.99, 0.995, 0.998)


def kb_image_embeddings(kb: Path) -> np.ndarray:
    knowledge_base = KnowledgeBase(kb)
    return np.concatenate([knowledge_base.part_embeddings("img_emb", part).astype(np.float32)
                           for part in knowledge_base.parts])


def nearest_other(emb: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Cosine of each query row's nearest KB image other than itself (row i of queries is KB row i)."""
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    scores, ids = index.search(emb[queries], 2)
    first_is_self = ids[:, 0] == queries
    return np.where(first_is_self, scores[:, 1], scores[:, 0])


def first_images(kb: Path, n: int) -> list[Image.Image]:
    """The first n images of the KB's first part, in its row order."""
    keys = pq.read_table(kb / "metadata" / "metadata_0.parquet", columns=["key", "shard"]).slice(0, n).to_pylist()
    images = {}
    with tarfile.open(keys[0]["shard"]) as tar:
        for member in tar:
            key, _, ext = member.name.rpartition(".")
            if ext in IMAGE_EXTS:
                images[key] = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
            if len(images) == n:
                break
    return [images[row["key"]] for row in keys]


def jpeg_copy_cosines(kb: Path, images: list[Image.Image], qualities: list[int]) -> dict[int, np.ndarray]:
    """{quality: cosine between each image's embedding and its JPEG copy's}, both encoded as the KB
    was (its model, its autocast, stored as float16)."""
    info = read_json(kb / "kb.json")
    model, preprocess, _ = load_model(info["model"], info["pretrained"])
    amp = info["autocast"] != "off"

    def encode(batch: list[Image.Image]) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=getattr(torch, info["autocast"], None), enabled=amp):
            emb = model.encode_image(torch.stack([preprocess(im) for im in batch]))
        return F.normalize(emb.float(), dim=-1).numpy().astype(np.float16).astype(np.float32)

    def jpeg(image: Image.Image, quality: int) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return Image.open(buffer).convert("RGB")

    originals = encode(images)
    return {q: (originals * encode([jpeg(im, q) for im in images])).sum(1) for q in qualities}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kb", type=Path, required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--quality", type=int, nargs="+", default=[95, 75])
    parser.add_argument("--out", type=Path, default=None, help="JSON figures (default: KB/near_duplicates.json)")
    args = parser.parse_args(argv)
    emb = kb_image_embeddings(args.kb)
    others = nearest_other(emb, np.arange(args.n))
    result = {"kb": str(args.kb), "n": args.n, "kb_size": len(emb),
              "nearest_other": {"median": float(np.median(others)), "p10": float(np.percentile(others, 10)),
                                "removed_at": {f"{t:g}": float((others >= t).mean()) for t in THRESHOLDS}},
              "jpeg_copy": {}}
    images = first_images(args.kb, args.n)
    for quality, copies in jpeg_copy_cosines(args.kb, images, args.quality).items():
        result["jpeg_copy"][str(quality)] = {"median": float(np.median(copies)), "p1": float(np.percentile(copies, 1)),
                                             "caught_at": {f"{t:g}": float((copies >= t).mean()) for t in THRESHOLDS},
                                             "above_nearest_other": float((copies > others).mean())}
    print(json.dumps(result, indent=1))
    out = args.out or args.kb / "near_duplicates.json"
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
