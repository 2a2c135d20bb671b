"""Embed throughput: the real embed stage vs a plain open_clip loop on pre-decoded tensors.

    nice -n 10 python benchmarks/bench_embed.py                       # mini-vit on a generated KB
    nice -n 10 python benchmarks/bench_embed.py --model ViT-B-32 --pairs 256 --batch-size 32

Both sides use the same model (same seed), batch size and pairs, in one run. The plain loop
gets every image already decoded and preprocessed and every caption tokenised, so it measures
pure encode_image + encode_text; the embed stage reads shards, decodes in DataLoader workers,
encodes and writes the KB. Rounds alternate; the best of each side counts.
Ratio = stage pairs/s / plain pairs/s (target >= 0.85: decoding hidden
behind compute).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from react_vl.data import decode_image, iter_corpus, list_shards
from react_vl.embed import embed_corpus
from react_vl.models import load_model
from react_vl.world import WorldConfig, generate_world


def plain_loop_rate(model_name: str, shards: list[str], batch_size: int) -> float:
    """pairs/s of encode_image + encode_text over tensors decoded beforehand (decoding not timed)."""
    torch.manual_seed(0)
    model, preprocess, tokenizer = load_model(model_name, None)
    pairs = list(iter_corpus(shards))
    images = torch.stack([preprocess(decode_image(p.image)) for p in pairs])
    texts = tokenizer([p.caption for p in pairs])
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(pairs), batch_size):
            F.normalize(model.encode_image(images[i:i + batch_size]), dim=-1)
            F.normalize(model.encode_text(texts[i:i + batch_size]), dim=-1)
    return len(pairs) / (time.perf_counter() - start)


def stage_rate(model_name: str, shards: list[str], batch_size: int, workers: int, out: Path) -> tuple[float, dict]:
    """pairs/s of the whole embed stage (read, decode, encode, write), wall clock."""
    start = time.perf_counter()
    summary = embed_corpus(shards, model_name, None, out, batch_size=batch_size, workers=workers, progress=False)
    return summary["count"] / (time.perf_counter() - start), summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini-vit")
    parser.add_argument("--pairs", type=int, default=2000, help="knowledge-base pairs to generate and embed")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="embed stage DataLoader workers")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best of each side counts")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        generate_world(world, WorldConfig(pretrain_size=0, kb_size=args.pairs, eval_size=0,
                                          shard_size=args.shard_size))
        shards = list_shards(str(world / "kb"))
        plain, staged = [], []
        for round_ in range(args.repeats):  # alternate, so a load change on a shared machine hits both sides
            plain.append(plain_loop_rate(args.model, shards, args.batch_size))
            rate, summary = stage_rate(args.model, shards, args.batch_size, args.workers, Path(tmp) / f"kb{round_}")
            staged.append(rate)
        plain, staged = max(plain), max(staged)

    print(f"model {args.model}, {summary['count']} pairs in {len(shards)} shards, batch {args.batch_size}, "
          f"{args.workers} workers, {torch.get_num_threads()} torch threads")
    print(f"plain open_clip loop on pre-decoded tensors: {plain:8.1f} pairs/s")
    print(f"react-vl embed stage (read+decode+encode+write): {staged:8.1f} pairs/s")
    print(f"ratio stage / plain: {staged / plain:.2f}x (target >= 0.85x)")


if __name__ == "__main__":
    main()
