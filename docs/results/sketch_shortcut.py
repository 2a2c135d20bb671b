"""What a mini-world base model tells apart in sketches: shape, colour, or both (zero-shot).

    python docs/results/sketch_shortcut.py DEMO/base/model.pt DEMO/world

The README's diagnosis of the sketch target rests on this: a base can name the colour of a
sketch and not its shape, because with ~2 sketches in a pretraining batch of 128 the colour
alone tells them apart, so contrastive pretraining never needs their shape. Labels come from
the world's per-image metadata (KEY.json), which no stage of the pipeline reads.
"""

import io
import json
import sys
import tarfile
from pathlib import Path

import open_clip
import torch
from PIL import Image

from react_vl.evaluate import class_prompt_cosine
from react_vl.models import load_model
from react_vl.world import COLORS, SHAPES


def sketch_images(world: Path, preprocess):
    images, attributes = [], []
    for shard in sorted((world / "eval" / "mini-shape-sketch").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {member.name: member for member in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".png")):
                images.append(preprocess(Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB")))
                attributes.append(json.loads(tar.extractfile(members[name[:-4] + ".json"]).read()))
    return torch.stack(images), attributes


@torch.inference_mode()
def main(base: str, world: str):
    model, preprocess, tokenizer = load_model(None, base)
    images, attributes = sketch_images(Path(world), preprocess)
    features = torch.cat([model.encode_image(images[i:i + 256], normalize=True) for i in range(0, len(images), 256)])
    questions = {
        "shape": ([a["shape"] for a in attributes], SHAPES, ["a sketch of a {}.", "a drawing of a {}."]),
        "colour": ([a["color"] for a in attributes], list(COLORS), ["a sketch of a {} object.", "a drawing of a {} shape."]),
        "colour and shape": ([f"{a['color']} {a['shape']}" for a in attributes],
                             [f"{c} {s}" for c in COLORS for s in SHAPES], ["a sketch of a {}.", "a drawing of a {}."]),
    }
    for question, (truth, classes, templates) in questions.items():
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, classes, templates, device="cpu").float()
        labels = torch.tensor([classes.index(t) for t in truth])
        accuracy = ((features @ classifier).argmax(1) == labels).float().mean().item()
        print(f"sketch {question}: zero-shot {100 * accuracy:.1f}% (chance {100 / len(classes):.1f}%), "
              f"mean class-prompt cosine {class_prompt_cosine(classifier):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
