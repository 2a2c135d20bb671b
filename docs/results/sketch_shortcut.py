"""What a mini-world base model tells apart in sketches: shape, colour, or both (zero-shot).

    python docs/results/sketch_shortcut.py DEMO/base/model.pt DEMO/world

The README's diagnosis of the sketch target rests on this: a base can name the colour of a
sketch and not its shape, because with ~2 sketches in a pretraining batch of 128 the colour
alone tells them apart, so contrastive pretraining never needs their shape. Labels come from
the world's per-image metadata (KEY.json), which no stage of the pipeline reads.
"""

import json
import sys
from pathlib import Path

from webdataset.tariterators import tarfile_samples

from react_vl.evaluate import class_prompt_cosine, extract_features, open_eval_data, text_classifier
from react_vl.metrics import topk_accuracy
from react_vl.models import load_model
from react_vl.tasks import Task
from react_vl.world import COLORS, SHAPES


def sketch_attributes(shards: list[str]) -> dict:
    """KEY.json of every sample, under the 'shard:key' names evaluation gives its features."""
    return {f"{shard}:{sample['__key__']}": json.loads(sample["json"])
            for shard in shards for sample in tarfile_samples([{"url": shard}])}


def main(base: str, world: str):
    model, preprocess, tokenizer = load_model(None, base)
    data = Path(world) / "eval" / "mini-shape-sketch"
    features = extract_features(model, open_eval_data(str(data), preprocess), workers=0)
    attributes = sketch_attributes(sorted(str(p) for p in data.glob("*.tar")))
    attributes = [attributes[key] for key in features.keys]
    questions = {
        "shape": ([a["shape"] for a in attributes], SHAPES, ["a sketch of a {}.", "a drawing of a {}."]),
        "colour": ([a["color"] for a in attributes], list(COLORS), ["a sketch of a {} object.", "a drawing of a {} shape."]),
        "colour and shape": ([f"{a['color']} {a['shape']}" for a in attributes],
                             [f"{c} {s}" for c in COLORS for s in SHAPES], ["a sketch of a {}.", "a drawing of a {}."]),
    }
    for question, (truth, classes, templates) in questions.items():
        classifier = text_classifier(model, tokenizer, Task(question, classes, templates), "cpu")
        labels = features.labels.new_tensor([classes.index(t) for t in truth])
        accuracy = topk_accuracy(features.image @ classifier, labels)
        print(f"sketch {question}: zero-shot {100 * accuracy:.1f}% (chance {100 / len(classes):.1f}%), "
              f"mean class-prompt cosine {class_prompt_cosine(classifier):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
