"""Evaluation feature extraction speed vs a plain encode_image loop, same model, same images, one run.

Three ways over the same webdataset shard:
- plain:     decode + preprocess + model.encode_image one image at a time (a naive eval script);
- evaluate:  react_vl.evaluate.extract_features (DataLoader workers, batches, inference_mode);
- forward:   encode_image on already preprocessed batches: the bound evaluation cannot beat.

    nice -n 10 python benchmarks/bench_evaluate.py                 # mini-vit and a short ViT-B-32 run
    nice -n 10 python benchmarks/bench_evaluate.py --models mini-vit --images 512
"""

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import tarfile_samples

from react_vl.evaluate import extract_features, open_eval_data
from react_vl.models import load_model


def write_shard(path: Path, count: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as writer:
        for i in range(count):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
            writer.write({"__key__": f"{i:06d}", "png": buffer.getvalue(), "json": '{"label": 0}'})
    return path


def plain_loop(model, preprocess, shard) -> float:
    started, count = time.perf_counter(), 0
    with torch.no_grad():
        for sample in tarfile_samples([{"url": str(shard)}]):
            image = preprocess(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
            model.encode_image(image[None])
            count += 1
    return count / (time.perf_counter() - started)


def forward_only(model, preprocess, shard, batch_size) -> float:
    images = torch.stack([preprocess(Image.open(io.BytesIO(s["png"])).convert("RGB"))
                          for s in tarfile_samples([{"url": str(shard)}])])
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            model.encode_image(images[i:i + batch_size])
    return len(images) / (time.perf_counter() - started)


def evaluate_pipeline(model, preprocess, shard, batch_size, workers) -> float:
    started = time.perf_counter()
    features = extract_features(model, open_eval_data(str(shard), preprocess), batch_size=batch_size, workers=workers)
    return len(features.keys) / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mini-vit", "ViT-B-32"])
    parser.add_argument("--images", type=int, nargs="+", default=[256, 48], help="images per model (in order)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch_size}, workers {args.workers}")
    print(f"{'model':10} {'images':>6} {'plain img/s':>12} {'evaluate img/s':>15} {'forward img/s':>14} "
          f"{'eval/plain':>10} {'eval/forward':>12}")
    with tempfile.TemporaryDirectory() as folder:
        for name, count in zip(args.models, args.images + args.images[-1:] * len(args.models)):
            torch.manual_seed(0)
            model, preprocess, _ = load_model(name)  # random weights: speed does not depend on them
            size = model.visual.image_size[0]
            shard = write_shard(Path(folder) / f"{name}.tar", count, size)
            plain = plain_loop(model, preprocess, shard)
            ours = evaluate_pipeline(model, preprocess, shard, args.batch_size, args.workers)
            forward = forward_only(model, preprocess, shard, args.batch_size)
            print(f"{name:10} {count:6d} {plain:12.1f} {ours:15.1f} {forward:14.1f} {ours / plain:10.2f} "
                  f"{ours / forward:12.2f}", flush=True)


if __name__ == "__main__":
    main()
