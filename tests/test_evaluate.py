import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from react_vl.cli import main
from react_vl.evaluate import (class_prompt_cosine, evaluate, extract_features, image_text_retrieval,
                               open_eval_data, parse_model_spec, text_classifier, zero_shot)
from react_vl.gated import inject_gated_blocks
from react_vl.models import load_model, save_model

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TASK = SimpleNamespace(name="colors", classnames=list(COLORS), templates=["a {} square.", "a photo of {}."],
                       metric="accuracy")


def _png(color, seed) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def make_shards(write_shards):
    """make_shards(folder, per_class=4, shards=2, label_offset=0): colour squares as webdataset shards
    eval-NNNNNN.tar (KEY.png, KEY.txt caption, KEY.json label, round-robin over shards); the folder."""
    def make(folder: Path, per_class=4, shards=2, label_offset=0) -> Path:
        classes = [(label, name) for _ in range(per_class) for label, name in enumerate(COLORS)]
        write_shards(folder, [{"__key__": f"{n:05d}", "png": _png(COLORS[name], n), "txt": f"a {name} square.",
                               "json": json.dumps({"label": label + label_offset})}
                              for n, (label, name) in enumerate(classes)], shards, prefix="eval")
        return folder

    return make


class OracleModel(torch.nn.Module):
    """Knows the answer: images -> one-hot of the dominant channel, texts -> one-hot of the colour word."""

    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(100.0)))

    def encode_image(self, images, normalize=False):
        return torch.nn.functional.one_hot(images.mean(dim=(2, 3)).argmax(1), 3).float()

    def encode_text(self, tokens, normalize=False):
        return torch.nn.functional.one_hot(tokens, 3).float()


def oracle_tokenizer(texts):
    return torch.tensor([next(i for i, name in enumerate(COLORS) if name in text) for text in texts])


def oracle_zero_shot(features):
    return zero_shot(OracleModel(), text_classifier(OracleModel(), oracle_tokenizer, TASK, "cpu"), TASK, features)


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def test_model_spec_syntax():
    assert parse_model_spec("base=mini-vit@runs/base.pt") == parse_model_spec("base=mini-vit@runs/base.pt")
    spec = parse_model_spec("gated=@runs/g/model.pt")
    assert (spec.label, spec.name, spec.pretrained) == ("gated", None, "runs/g/model.pt")
    spec = parse_model_spec("ViT-B-32@openai")
    assert (spec.label, spec.name, spec.pretrained) == ("ViT-B-32@openai", "ViT-B-32", "openai")
    assert parse_model_spec("rand=mini-vit").pretrained is None
    with pytest.raises(ValueError, match="neither a model nor weights"):
        parse_model_spec("x=@")


def test_oracle_scores_perfectly_on_shards_read_by_two_workers(tmp_path, make_shards):
    shards = make_shards(tmp_path / "eval", per_class=5)
    features = extract_features(OracleModel(), open_eval_data(str(shards), to_tensor), batch_size=4, workers=2)
    assert len(features.keys) == 15 and features.skipped == []
    report = oracle_zero_shot(features)
    assert report["score"] == 1.0 and report["top1"] == 1.0
    assert report["confusion_matrix"] == [[5, 0, 0], [0, 5, 0], [0, 0, 5]]
    assert set(report["per_class_accuracy"].values()) == {1.0}
    assert report["class_prompt_cosine"] == 0.0  # one-hot class embeddings: orthogonal
    recall = image_text_retrieval(OracleModel(), oracle_tokenizer, features, "cpu")
    # the oracle sees colours only: the 5 images (and captions) of a colour tie, so R@1 is down to tie-breaking
    # but R@5 finds every image's own caption and every caption's own image
    assert recall["image_to_text_R@5"] == 1.0 and recall["text_to_image_R@5"] == 1.0
    assert recall["captions"] == 15


def test_class_prompt_cosine_is_the_mean_over_distinct_class_pairs():
    collapsed = torch.nn.functional.normalize(torch.ones(4, 3), dim=0)
    assert class_prompt_cosine(collapsed) == pytest.approx(1.0)
    # columns e0, e0, e1: pair cosines 1, 0, 0
    assert class_prompt_cosine(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])) == pytest.approx(1 / 3)


def test_corrupt_samples_and_shards_are_skipped_and_counted(tmp_path, make_shards, write_shards):
    shards = make_shards(tmp_path / "eval", per_class=2, shards=1)
    write_shards(shards, [{"__key__": "bad", "png": b"not a png", "json": json.dumps({"label": 0})}], prefix="eval",
                 first=1)
    (shards / "eval-000002.tar").write_bytes(b"\x00" * 100 + b"garbage")
    features = extract_features(OracleModel(), open_eval_data(str(shards), to_tensor), workers=0)
    assert len(features.keys) == 6
    assert len(features.skipped) == 2
    assert any("unreadable image" in reason and "bad" in reason for reason in features.skipped)
    assert any("eval-000002.tar" in reason for reason in features.skipped)
    with pytest.raises(FileNotFoundError, match="eval-000003.tar"):  # a missing shard is named, not skipped
        open_eval_data(str(shards / "eval-{000000..000004}.tar"), to_tensor)


def test_class_folders_match_names_and_mismatches_say_where(tmp_path):
    for name in ["Red", "green", "blue"]:
        (tmp_path / "folders" / name).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "folders" / name / f"{i}.png").write_bytes(_png(COLORS[name.lower()], i))
    features = extract_features(OracleModel(), open_eval_data(str(tmp_path / "folders"), to_tensor, TASK.classnames),
                                workers=0)
    assert oracle_zero_shot(features)["score"] == 1.0
    (tmp_path / "folders" / "purple").mkdir()
    with pytest.raises(ValueError, match=r"folders.*4 folders; not a class: \['purple'\]"):
        open_eval_data(str(tmp_path / "folders"), to_tensor, TASK.classnames)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_eval_data(str(tmp_path / "nowhere"), to_tensor)


def test_labels_beyond_the_task_classes_are_an_error(tmp_path, make_shards):
    shards = make_shards(tmp_path / "eval", per_class=1, shards=1, label_offset=1)
    features = extract_features(OracleModel(), open_eval_data(str(shards), to_tensor), workers=0)
    with pytest.raises(ValueError, match="go up to 3 but the task has 3 classes"):
        oracle_zero_shot(features)


@pytest.mark.parametrize("layout", ["json", "csv"])
def test_captioned_set_gives_recall_both_ways(tmp_path, layout):
    entries = []
    for i, name in enumerate(COLORS):
        (tmp_path / f"{name}.png").write_bytes(_png(COLORS[name], i))
        entries.append({"image": f"{name}.png", "captions": [f"{name} block", f"something {name}"]})
    if layout == "json":
        (tmp_path / "captions.json").write_text(json.dumps(entries))
    else:
        rows = [f"{e['image']},{caption}" for e in entries for caption in e["captions"]]
        (tmp_path / "captions.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    features = extract_features(OracleModel(), open_eval_data(str(tmp_path / f"captions.{layout}"), to_tensor),
                                workers=0)
    recall = image_text_retrieval(OracleModel(), oracle_tokenizer, features, "cpu")
    assert recall["image_to_text_R@1"] == 1.0 and recall["text_to_image_R@1"] == 1.0
    assert (recall["images"], recall["captions"]) == (3, 6)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, _, _ = load_model("mini-vit-test")
        save_model(folder / f"m{seed}.pt", model, "mini-vit-test")
    return folder


def test_side_by_side_writes_tables_with_deltas_and_reuses_cached_features(tmp_path, two_checkpoints, make_shards):
    data = {"colors": str(make_shards(tmp_path / "eval", per_class=6))}
    models = [f"base=mini-vit-test@{two_checkpoints / 'm0.pt'}", f"same=@{two_checkpoints / 'm0.pt'}",
              f"other=@{two_checkpoints / 'm1.pt'}"]
    results = evaluate(models, [TASK], data=data, out=tmp_path / "EVAL", probe_shots=[2, "full"], probe_seeds=2,
                       workers=0)
    assert results["cache_hits"] == 1  # "same" has the same weights as "base"
    zero = results["zero_shot"]["colors"]
    assert zero["same"] == zero["base"] and zero["base"]["count"] == 18
    row = results["table"][0]
    assert row["measure"] == "zero-shot accuracy" and row["Δ same"] == 0.0
    assert row["Δ other"] == pytest.approx(row["other"] - row["base"], abs=1e-4)
    assert {r["measure"] for r in results["table"]} >= {"image to text R@1", "linear probe 2-shot",
                                                        "linear probe full-shot"}
    for name in ("results.json", "table.md", "table.csv", "table.json", "chart.png"):
        assert (tmp_path / "EVAL" / name).stat().st_size > 0
    assert "| task | role | measure | base | same | other | Δ same | Δ other |" in (tmp_path / "EVAL" / "table.md").read_text()
    again = evaluate(models, [TASK], data=data, out=tmp_path / "EVAL", workers=0)
    assert again["cache_hits"] == 3 and again["zero_shot"] == results["zero_shot"]


@pytest.fixture(scope="module")
def gated_checkpoint(two_checkpoints):
    """m0's weights plus gated blocks with open gates (as customization leaves them)."""
    model, _, _ = load_model(None, str(two_checkpoints / "m0.pt"))
    inject_gated_blocks(model, 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".gated_attn_block.alpha" in name:
                param.fill_(1.0)
    return save_model(two_checkpoints / "gated.pt", model, "mini-vit-test")


def test_gate_scales_give_the_curve_from_the_base_to_the_trained_model(tmp_path, two_checkpoints, gated_checkpoint,
                                                                         make_shards):
    data = {"colors": str(make_shards(tmp_path / "eval", per_class=6))}
    models = [f"base=@{two_checkpoints / 'm0.pt'}", f"gated=@{gated_checkpoint}"]
    results = evaluate(models, [TASK], data=data, out=tmp_path / "EVAL", workers=0, gate_scales=[0, 0.5, 1])
    assert list(results["models"]) == ["base", "gated", "gated@0", "gated@0.5", "gated@1"]  # the base has no gates
    assert [results["models"][m]["gate_scale"] for m in results["models"]] == [None, None, 0.0, 0.5, 1.0]
    zero = results["zero_shot"]["colors"]
    assert zero["gated@0"] == zero["base"] and zero["gated@1"] == zero["gated"]
    assert results["cache_hits"] == 1  # gated@1 is the saved model: its features; gated@0 and @0.5 are new
    assert len(list((tmp_path / "EVAL" / "feature_cache").glob("*.npz"))) == 4
    assert results["gate_scale_curve"] == {"gated": {lam: {"colors": round(100 * zero[f"gated@{lam:g}"]["score"], 2)}
                                                     for lam in (0.0, 0.5, 1.0)}}
    row = results["table"][0]
    assert row["Δ gated@0"] == 0.0 and row["Δ gated@1"] == row["Δ gated"]
    header = (tmp_path / "EVAL" / "table.md").read_text().splitlines()[0]
    assert "| gated@0 | gated@0.5 | gated@1 |" in header and "| Δ gated@0.5 |" in header
    with pytest.raises(ValueError, match="gate scale must be in"):
        evaluate(models, [TASK], data=data, out=tmp_path / "EVAL", workers=0, gate_scales=[2])


def test_cli_evaluate_chooses_the_gate_scale_on_the_validation_sets(tiny_world, two_checkpoints, gated_checkpoint,
                                                                    tmp_path):
    args = ["evaluate", "--model", f"base=@{two_checkpoints / 'm0.pt'}", "--model", f"gated=@{gated_checkpoint}",
            "--task", "mini-shape-sketch", "--task", "mini-shape-photo", "--data", str(tiny_world),
            "--out", str(tmp_path / "EVAL"), "--workers", "0", "--gate-scale", "0,0.5,1"]
    result = CliRunner().invoke(main, args + ["--split", "val"])
    assert result.exit_code == 0, result.output
    choice = json.loads((tmp_path / "EVAL" / "gate_scale.json").read_text())["gated"]
    assert [c["gate_scale"] for c in choice["candidates"]] == [0.0, 0.5, 1.0]
    assert choice["candidates"][0]["target_change"] == 0.0  # lambda 0 is the base
    assert choice["chosen"] in (0.0, 0.5, 1.0)
    assert f"gate scale for gated: {choice['chosen']} (largest mean target gain" in result.output
    on_test = CliRunner().invoke(main, args + ["--out", str(tmp_path / "TEST")])
    assert on_test.exit_code == 0 and "choose lambda on the validation sets" in on_test.output
    assert not (tmp_path / "TEST" / "gate_scale.json").exists()
    bad = CliRunner().invoke(main, args[:-1] + ["0,1.5"])
    assert bad.exit_code == 2 and "every gate scale must be in [0, 1]" in bad.output


def test_cli_evaluate_prints_the_table(tmp_path, two_checkpoints, make_shards, monkeypatch):
    import react_vl.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "_resolve_task", lambda task, data: TASK if task == "colors" else task)
    make_shards(tmp_path / "eval" / "colors", per_class=2, shards=1)
    result = CliRunner().invoke(main, ["evaluate", "--model", f"base=@{two_checkpoints / 'm0.pt'}",
                                       "--task", "colors", "--data", str(tmp_path), "--out", str(tmp_path / "EVAL"),
                                       "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "| colors |  | zero-shot accuracy |" in result.output
    assert (tmp_path / "EVAL" / "results.json").is_file()


def test_mini_world_tasks_by_name_with_retrieval_on_their_captions(tiny_world, two_checkpoints, tmp_path):
    tasks = ["mini-shape-photo", "mini-color-photo"]
    results = evaluate([f"base=@{two_checkpoints / 'm0.pt'}"], tasks, data=tiny_world, out=tmp_path / "EVAL")
    for task in tasks:
        report = results["zero_shot"][task]["base"]
        assert report["count"] == 80 and len(report["confusion_matrix"]) == len(report["per_class_accuracy"])
        assert results["retrieval"][task]["base"]["captions"] >= 80
    assert [(row["task"], row["role"]) for row in results["table"]][:2] == [(t, "control") for t in tasks]


def test_val_split_reads_the_validation_sets_and_never_falls_back_to_the_test_sets(tiny_world, two_checkpoints,
                                                                                   make_shards, tmp_path):
    model = [f"base=@{two_checkpoints / 'm0.pt'}"]
    results = {split: evaluate(model, ["mini-shape-photo"], data=tiny_world, out=tmp_path / split, split=split)
               for split in ("eval", "val")}
    assert list(results["val"]["skipped"]) == [str(tiny_world / "val" / "mini-shape-photo")]
    assert results["val"]["zero_shot"]["mini-shape-photo"]["base"]["count"] == 80
    assert list(results["eval"]["skipped"]) == [str(tiny_world / "eval" / "mini-shape-photo")]
    make_shards(tmp_path / "data" / "eval" / "colors", per_class=2, shards=1)
    with pytest.raises(FileNotFoundError, match=r"no 'val' split for task colors: .*data/val/colors"):
        evaluate(model, [TASK], data=tmp_path / "data", out=tmp_path / "EVAL", split="val")


def test_trained_model_beats_chance_on_a_control_task(tiny_world, tiny_trained_model, tmp_path):
    results = evaluate([f"trained=@{tiny_trained_model}"], ["mini-color-photo"], data=tiny_world, out=tmp_path / "EVAL")
    report = results["zero_shot"]["mini-color-photo"]["trained"]
    assert report["top1"] > 1.5 / len(report["per_class_accuracy"])


def test_clip_benchmark_data_needs_the_package_or_says_where_the_data_is_missing(tmp_path):
    try:
        import clip_benchmark  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install clip-benchmark"):
            open_eval_data("clip_benchmark:cifar10", to_tensor)
    else:
        with pytest.raises(FileNotFoundError, match=f"cifar10.*{tmp_path}"):
            open_eval_data(f"clip_benchmark:cifar10:{tmp_path}", to_tensor)
