import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from react_vl.concepts import COLORS, MINI_TASKS, SHAPES, STYLE_WORDS, STYLES
from react_vl.world import (NIGHT_CHROMA, SKETCH_COLOUR_RATE, SKETCH_SHADING_RATE, SKETCH_SUBJECT_ONLY_RATE,
                            WEB_TEXTURE_SHARES, WorldConfig, _desaturate, generate_world)

SMALL = dict(pretrain_size=48, kb_size=48, eval_size=16, val_size=16, shard_size=24)


def _shard_bytes(world: Path) -> dict:
    return {str(p.relative_to(world)): p.read_bytes() for p in sorted(world.rglob("*.tar"))}


def _samples(world: Path, folder: str):
    shards = sorted(str(p) for p in (world / folder).glob("*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False))


def _within(count: int, total: int, share: float) -> bool:
    """Is `count` within 4 binomial standard deviations (plus one) of `share * total`?"""
    return abs(count - share * total) <= 4 * math.sqrt(total * share * (1 - share)) + 1


def test_same_seed_gives_identical_shards_whatever_the_worker_count(tmp_path):
    one = generate_world(tmp_path / "a", WorldConfig(seed=3, workers=1, **SMALL))
    generate_world(tmp_path / "b", WorldConfig(seed=3, workers=2, **SMALL))
    generate_world(tmp_path / "c", WorldConfig(seed=4, workers=1, **SMALL))
    a, b, c = (_shard_bytes(tmp_path / x) for x in "abc")
    assert len(a) == one["shards"]["total"] == 2 + 2 + 2 * len(MINI_TASKS)  # pretrain, kb, eval and val per task
    assert a == b
    assert a.keys() == c.keys() and all(a[name] != c[name] for name in a)


def test_resume_regenerates_only_missing_shards_and_refuses_another_config(tmp_path):
    config = WorldConfig(seed=1, workers=1, **SMALL)
    generate_world(tmp_path, config)
    before = _shard_bytes(tmp_path)
    (tmp_path / "kb" / "kb-000001.tar").unlink()
    summary = generate_world(tmp_path, config)
    assert summary["shards"]["generated"] == 1
    assert _shard_bytes(tmp_path) == before
    with pytest.raises(ValueError, match=r"different config \(seed\)"):
        generate_world(tmp_path, WorldConfig(seed=2, workers=1, **SMALL))
    assert generate_world(tmp_path, WorldConfig(seed=1, workers=2, **SMALL))["shards"]["generated"] == 0
    # another val_size regenerates the validation sets and nothing else
    shutil.rmtree(tmp_path / "val")
    summary = generate_world(tmp_path, WorldConfig(seed=1, workers=1, **{**SMALL, "val_size": 8}))
    assert summary["shards"]["generated"] == len(MINI_TASKS) and summary["counts"]["val/mini-color-night"]["total"] == 8
    assert {k: v for k, v in _shard_bytes(tmp_path).items() if "val" not in k} == \
        {k: v for k, v in before.items() if "val" not in k}


def test_corpus_settings_leave_out_only_what_changes_no_corpus_byte():
    settings = WorldConfig(workers=1, val_size=5).corpus_settings()
    assert settings == WorldConfig(workers=3).corpus_settings() != WorldConfig(seed=1).corpus_settings()
    assert set(settings) == set(vars(WorldConfig())) - {"workers", "val_size"} | {"look"}
    assert json.loads(json.dumps(settings)) == settings  # as world.json stores them
    # the look: a hash of what this code draws, which changes with the drawing, not with the seed
    assert settings["look"] == WorldConfig(seed=1).corpus_settings()["look"] != \
        WorldConfig(variant="colour-cue").corpus_settings()["look"]


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="kb_styles"):
        WorldConfig(kb_styles={"photo": 0.5, "watercolour": 0.5})
    with pytest.raises(ValueError, match="pretrain_styles"):
        WorldConfig(pretrain_styles={"photo": 0.9})
    with pytest.raises(ValueError, match="noise_rate"):
        WorldConfig(noise_rate=1.5)


def test_every_shard_reads_back_as_valid_webdataset(tiny_world):
    config = json.loads((tiny_world / "world.json").read_text())["config"]
    expected = {"pretrain": config["pretrain_size"], "kb": config["kb_size"],
                **{f"eval/{task}": config["eval_size"] for task in MINI_TASKS},
                **{f"val/{task}": config["val_size"] for task in MINI_TASKS}}
    keys = set()
    for folder, count in expected.items():
        samples = _samples(tiny_world, folder)
        assert len(samples) == count, folder
        for sample in samples:
            image = Image.open(io.BytesIO(sample["png"]))
            assert image.size == (64, 64) and image.mode == "RGB"
            meta = json.loads(sample["json"])
            assert meta["key"] == sample["__key__"]
            assert {"shape", "color", "texture", "size", "position", "background", "style", "noisy"} <= meta.keys()
            assert sample["txt"].decode().strip()
            assert ("label" in meta) == folder.startswith(("eval/", "val/"))
            keys.add(sample["__key__"])
    assert len(keys) == sum(expected.values())  # keys unique across the whole world


def test_concept_distribution_follows_the_config(tiny_world):
    summary = json.loads((tiny_world / "world.json").read_text())
    config = summary["config"]
    for corpus, styles in (("pretrain", config["pretrain_styles"]), ("kb", config["kb_styles"])):
        metas = [json.loads(s["json"]) for s in _samples(tiny_world, corpus)]
        total = len(metas)
        recount = {style: sum(m["style"] == style for m in metas) for style in STYLES}
        assert recount == summary["counts"][corpus]["style"]  # world.json counts what is on disk
        for style, share in styles.items():
            assert _within(recount[style], total, share), (corpus, style, recount)
        for attribute, classes in (("shape", SHAPES), ("color", list(COLORS))):
            for name in classes:
                assert _within(sum(m[attribute] == name for m in metas), total, 1 / len(classes)), (corpus, name)
        for texture, share in WEB_TEXTURE_SHARES.items():  # mostly plain objects
            assert _within(sum(m["texture"] == texture for m in metas), total, share), (corpus, texture)
        noisy = sum(m["noisy"] for m in metas)
        assert _within(noisy, total, config["noise_rate"]), (corpus, noisy)


@pytest.mark.parametrize("split", ["eval", "val"])
def test_eval_and_val_sets_are_balanced_clean_and_in_the_task_style(tiny_world, split):
    for name, spec in MINI_TASKS.items():
        task = json.loads((tiny_world / "tasks" / f"{name}.json").read_text())
        assert task[split] == f"{split}/{name}"
        metas = [json.loads(s["json"]) for s in _samples(tiny_world, task[split])]
        assert metas, (split, name)
        labels = [m["label"] for m in metas]
        assert all(task["classnames"][m["label"]] == m[spec["attribute"]] for m in metas)
        per_class = [labels.count(i) for i in range(len(task["classnames"]))]
        assert max(per_class) - min(per_class) <= 1, (name, per_class)
        assert all(m["style"] == spec["style"] and not m["noisy"] for m in metas)


def test_eval_images_never_appear_in_a_corpus_or_the_validation_set(tiny_world):
    def digests(folder):
        return {hashlib.sha256(s["png"]).hexdigest() for s in _samples(tiny_world, folder)}

    corpora = digests("pretrain") | digests("kb")
    for name in MINI_TASKS:
        test, val = digests(f"eval/{name}"), digests(f"val/{name}")
        assert val and not test & corpora and not val & corpora and not test & val, name


def test_clean_captions_name_the_shape_any_non_photo_style_and_the_colour_but_in_most_sketches(tiny_world):
    checked = {style: 0 for style in STYLES}
    sketch_colour, subject_only = [], []
    for sample in _samples(tiny_world, "kb"):
        meta, caption = json.loads(sample["json"]), sample["txt"].decode()
        if meta["noisy"]:
            continue
        words = caption.replace(",", " ").replace(".", " ").split()
        assert meta["shape"] in words, caption
        if meta["style"] == "sketch":  # a web sketch's alt-text rarely names a colour
            sketch_colour.append(meta["color"] in words)
        else:
            assert meta["color"] in words, caption
        named = {style for style, cues in STYLE_WORDS.items() if any(cue in caption for cue in cues)}
        if meta["style"] == "sketch" and meta["color"] not in words:  # or only its subject, as clip-art's alt-text
            subject_only.append(not named)
            named = named or {"sketch"}
        assert named == ({meta["style"]} if meta["style"] != "photo" else set()), (meta["style"], caption)
        checked[meta["style"]] += 1
    assert all(checked.values()), checked  # every style was seen
    assert _within(sum(sketch_colour), len(sketch_colour), SKETCH_COLOUR_RATE), (sum(sketch_colour), len(sketch_colour))
    assert _within(sum(subject_only), len(subject_only), SKETCH_SUBJECT_ONLY_RATE), \
        (sum(subject_only), len(subject_only))


def test_colour_cue_variant_keeps_the_first_worlds_coloured_sketches_and_captions(tmp_path):
    web = generate_world(tmp_path / "web", WorldConfig(workers=1, **{**SMALL, "kb_size": 400}))
    cue = generate_world(tmp_path / "cue", WorldConfig(workers=1, variant="colour-cue", **{**SMALL, "kb_size": 400}))
    assert web["config"]["variant"] == "web" and cue["config"]["variant"] == "colour-cue"
    for world, coloured in ((tmp_path / "web", False), (tmp_path / "cue", True)):
        sketches = [s for s in _samples(world, "kb") if json.loads(s["json"])["style"] == "sketch"]
        assert sketches
        for sample in sketches:
            meta = json.loads(sample["json"])
            pixels = np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=np.float32).reshape(-1, 3)
            ink = pixels[np.abs(pixels - (242, 242, 238)).max(axis=1) > 60]  # the outline: far from the paper
            assert (np.ptp(ink.mean(axis=0)) > 25) == coloured, (meta["color"], ink.mean(axis=0))
            if coloured and not meta["noisy"]:
                assert meta["color"] in sample["txt"].decode()
    with pytest.raises(ValueError, match="variant"):
        WorldConfig(variant="watercolour")


def test_cli_writes_a_world_with_the_config_defaults(tmp_path):
    from click.testing import CliRunner

    from react_vl.cli import main

    defaults = {param.name: param.default for param in main.commands["world"].params if param.name != "out"}
    assert defaults == {name: getattr(WorldConfig(), name) for name in defaults}  # one source of defaults
    result = CliRunner().invoke(main, ["world", "--out", str(tmp_path), "--seed", "5", "--pretrain-size", "20",
                                       "--kb-size", "20", "--eval-size", "8", "--val-size", "8", "--shard-size", "20",
                                       "--workers", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "world.json").read_text())
    assert summary["config"]["seed"] == 5 and summary["counts"]["kb"]["total"] == 20


def test_styles_look_different(tiny_world):
    def pixels(task):
        return np.stack([np.asarray(Image.open(io.BytesIO(s["png"])), dtype=np.float32)
                         for s in _samples(tiny_world, f"eval/{task}")])

    photo, sketch, night, pixel = (pixels(t) for t in ("mini-shape-photo", "mini-shape-sketch", "mini-color-night",
                                                       "mini-shape-pixel"))
    assert (sketch.min(axis=-1) > 200).mean() > 0.6  # mostly bare paper around a thin outline
    assert night.mean() < 0.6 * photo.mean() and night[..., 2].mean() > 1.5 * night[..., 0].mean()  # dark, blue
    blocks = pixel.reshape(len(pixel), 16, 4, 16, 4, 3)
    assert (blocks.max(axis=(2, 4)) == blocks.min(axis=(2, 4))).all()  # 4x4 blocks of one colour
    assert not (photo.reshape(blocks.shape).std(axis=(2, 4)) == 0).all()


def test_web_sketches_are_often_hatched_inside_and_web_nights_are_washed_out(tiny_world):
    sketch = np.stack([np.asarray(Image.open(io.BytesIO(s["png"])), dtype=np.float32)
                       for s in _samples(tiny_world, "eval/mini-shape-sketch")]).mean(axis=-1)
    # hatching: pale pencil strokes (between the dark outline and the paper) over a good part of the image
    # (an outline alone leaves 2-10% of the pixels pale where it is anti-aliased, a hatched one 6-32%)
    pale = ((sketch > 110) & (sketch < 200)).mean(axis=(1, 2))
    shaded = float((pale > 0.085).mean())
    assert SKETCH_SHADING_RATE - 0.2 < shaded < SKETCH_SHADING_RATE + 0.2 and (pale < 0.06).any(), pale.round(3)

    # night: every pixel keeps NIGHT_CHROMA of its distance to its own grey (then is darkened)
    rgb = np.array([[[215, 35, 35], [128, 128, 128]]], dtype=np.uint8)
    out = np.asarray(_desaturate(Image.fromarray(rgb), NIGHT_CHROMA), dtype=np.float32)
    grey = rgb[0, 0].astype(np.float32) @ np.array([0.299, 0.587, 0.114])
    assert np.allclose(out[0, 0], grey + NIGHT_CHROMA * (rgb[0, 0] - grey), atol=1) and (out[0, 1] == 128).all()
