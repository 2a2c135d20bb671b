import io
import json
import os
import random
import subprocess
import sys
import textwrap

import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from react_vl.gated import inject_gated_blocks
from react_vl.loss import caption_ids
from react_vl.models import load_model
from react_vl.strategies import STRATEGIES, build_model, set_trainable
from react_vl.train import PairBatches, Source, resolve_shards, train

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
FAST = dict(batch_size=16, workers=0, log_every=1, warmup=2, lr=2e-3)


def write_shards(out, n, shards=2, seed=0, prefix="shard", corrupt=0):
    """Coloured discs and squares with their captions; `corrupt` samples get broken PNG bytes."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(out / f"{prefix}-{s:06d}.tar")) as sink:
            for i in range(n // shards):
                colour, shape = rng.choice(list(COLOURS)), rng.choice(["disc", "square"])
                image = Image.new("RGB", (32, 32), "white")
                draw = ImageDraw.Draw(image)
                (draw.ellipse if shape == "disc" else draw.rectangle)([6, 6, 26, 26], fill=COLOURS[colour])
                png = io.BytesIO()
                image.save(png, "PNG")
                data = png.getvalue()[:20] if s == 0 and i < corrupt else png.getvalue()
                sink.write({"__key__": f"{prefix}{s}_{i:05d}", "png": data, "txt": f"a {colour} {shape} ({prefix})"})
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), 96)


def _parts(model):
    return {n.split(".")[0] if "gated_attn_block" not in n else "gated" for n, p in model.named_parameters()
            if p.requires_grad}


# --- model setup -------------------------------------------------------------------------------
def test_gated_model_from_trainer_setup_is_identity_at_init():
    torch.manual_seed(0)
    base, _, tokenizer = load_model("mini-vit")
    torch.manual_seed(0)
    gated, _, _ = build_model("mini-vit", None, "gated-image")
    images, text = torch.randn(3, 3, 64, 64), tokenizer(["a sketch of a star", "a red disc", "x"])
    with torch.no_grad():
        assert torch.equal(base.encode_image(images), gated.encode_image(images))
        assert torch.equal(base.encode_text(text), gated.encode_text(text))
    assert gated.react_vl["gated_layers"] == [] and len([n for n, _ in gated.named_parameters() if "gated" in n]) == 3 * 14


@pytest.mark.parametrize("strategy, parts", [
    ("gated-image", {"gated", "logit_scale"}),
    ("gated-image-text", {"gated", "logit_scale", "transformer", "token_embedding", "positional_embedding",
                          "ln_final", "text_projection"}),
    ("locked-text", {"visual", "logit_scale"}),
    ("locked-image", {"logit_scale", "transformer", "token_embedding", "positional_embedding", "ln_final",
                      "text_projection"}),
    ("full", {"visual", "logit_scale", "transformer", "token_embedding", "positional_embedding", "ln_final",
              "text_projection"}),
])
def test_trainable_sets_per_strategy(strategy, parts):
    model, _, _ = build_model("mini-vit-test", None, strategy)
    counts = set_trainable(model, strategy)
    assert _parts(model) == parts
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    set_trainable(model, strategy, train_logit_scale=False)
    assert _parts(model) == parts - {"logit_scale"}


def test_strategy_errors_are_clear():
    model, _, _ = load_model("mini-vit-test")
    with pytest.raises(ValueError, match="needs gated blocks"):
        set_trainable(model, "gated-image")
    with pytest.raises(ValueError, match="unknown strategy 'lora'.*gated-image"):
        set_trainable(model, "lora")
    assert set(STRATEGIES) == {"gated-image", "gated-image-text", "locked-text", "locked-image", "full"}
    with pytest.raises(TypeError, match="VisionTransformer"):
        build_model("RN50", None, "gated-image")


def test_layers_before_the_first_gated_block_record_no_graph():
    """The frozen early layers store no activations: autograd records nothing for them."""
    model, _, tokenizer = build_model("mini-vit", None, "gated-image")  # gated layers 3, 4, 5
    outputs = {}
    for i, block in enumerate(model.visual.transformer.resblocks):
        block.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out))
    for strategy, first_recorded in (("gated-image", 3), ("locked-text", 0)):
        set_trainable(model, strategy)
        image_features, text_features, _ = model(torch.randn(2, 3, 64, 64), tokenizer(["a", "b"]))[:3]
        assert [outputs[i].grad_fn is not None for i in range(6)] == [i >= first_recorded for i in range(6)]
        assert image_features.requires_grad and not text_features.requires_grad


# --- data stream -------------------------------------------------------------------------------
def _stream(sources, start=0, rank=0, world_size=1, workers=0, n=4):
    tokenizer = open_clip.get_tokenizer("mini-vit-test")
    _, _, preprocess = open_clip.create_model_and_transforms("mini-vit-test")
    dataset = PairBatches(sources, preprocess, tokenizer, seed=3, start=start, rank=rank, world_size=world_size,
                          buffer=20)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return [b for _, b in zip(range(n), loader)]


def test_stream_is_a_function_of_position_whatever_the_workers_ranks_or_start(shards, tmp_path):
    source = Source(resolve_shards(shards), 96, 8)
    single = _stream([source], n=14)  # 14 x 8 > 96: crosses into epoch 2, reshuffled
    ids = [b["text_ids"] for b in single]
    assert [b["micro"] for b in _stream([source], workers=2, n=14)] == list(range(14))
    assert all(torch.equal(a["text_ids"], b["text_ids"]) for a, b in zip(single, _stream([source], workers=2, n=14)))
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(single[5:], _stream([source], start=5, n=9)))
    halves = zip(_stream([source], rank=0, world_size=2, n=14), _stream([source], rank=1, world_size=2, n=14))
    assert all(torch.equal(torch.cat([a["text_ids"], b["text_ids"]]), i) for (a, b), i in zip(halves, ids))
    first_epoch = torch.cat(ids[:12])
    assert len(set(first_epoch.tolist())) < 96 and len(first_epoch) == 96  # captions repeat, samples do not
    assert not torch.equal(torch.cat(ids[12:14]), first_epoch[:16])  # epoch 2 comes in a new order

    general = write_shards(tmp_path / "general", 40, shards=1, prefix="general")
    mixed = _stream([Source(resolve_shards(shards), 96, 6), Source(resolve_shards(general), 40, 2)], n=3)
    general_ids = set(caption_ids([f"a {c} {s} (general)" for c in COLOURS for s in ("disc", "square")]).tolist())
    assert [sum(i in general_ids for i in b["text_ids"].tolist()) for b in mixed] == [2, 2, 2]


# --- training ----------------------------------------------------------------------------------
def test_resume_reproduces_the_uninterrupted_run_and_refuses_other_setups(shards, tmp_path):
    full = train(shards, "mini-vit-test", None, tmp_path / "a", strategy="gated-image", steps=6,
                 checkpoint_every=3, **FAST)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step_3.pt", "step_6.pt"]
    resumed = train(shards, "mini-vit-test", None, tmp_path / "b", strategy="gated-image", steps=6,
                    resume=str(tmp_path / "a" / "checkpoints" / "step_3.pt"), **FAST)
    assert resumed["start_step"] == 3
    assert resumed["losses"] == pytest.approx(full["losses"][3:], abs=1e-5)
    gates = [v for g in full["final_gates"].values() for v in g.values()]
    assert gates and [v for g in resumed["final_gates"].values() for v in g.values()] == pytest.approx(gates, abs=1e-6)
    with pytest.raises(ValueError, match="strategy is 'gated-image' there, 'gated-image-text' here"):
        train(shards, "mini-vit-test", None, tmp_path / "c", strategy="gated-image-text", steps=6,
              resume=str(tmp_path / "a" / "checkpoints" / "step_3.pt"), **FAST)


DDP_SCRIPT = """
import sys
from react_vl.train import train
train(sys.argv[1], "mini-vit-test", None, sys.argv[2], strategy="full", steps=2, batch_size=8, precision="fp32",
      workers=0, lr=1e-3, warmup=1, seed=5)
"""


def test_two_process_ddp_step_equals_single_process_step(shards, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
                    str(script), str(shards), str(tmp_path / "ddp")], check=True, env=env, timeout=240)
    single = train(shards, "mini-vit-test", None, tmp_path / "one", strategy="full", steps=2, batch_size=8,
                   precision="fp32", workers=0, lr=1e-3, warmup=1, seed=5)
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["args"]["world_size"] == 2
    assert ddp["losses"] == pytest.approx(single["losses"], abs=1e-5)
    a = torch.load(tmp_path / "ddp" / "model.pt")["state_dict"]
    b = torch.load(tmp_path / "one" / "model.pt")["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_loss_decreases_on_mini_world_and_outputs_load_back(tiny_world, tiny_trained_model, tmp_path):
    run = tiny_trained_model.parent  # pretrained with strategy full from random init (tests/conftest.py)
    summary = json.loads((run / "summary.json").read_text())
    losses = summary["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert {"steps", "time_s", "samples_per_s", "trainable_params", "final_gates", "strategy", "args"} <= set(summary)
    assert summary["strategy"] == "full" and summary["trainable_params"] == summary["total_params"]
    assert (run / "curves.png").stat().st_size > 0
    # customize the pretrained model with gated blocks: gates are logged per layer
    gated = train(tiny_world / "pretrain", None, str(tiny_trained_model), tmp_path / "gated", steps=4,
                  batch_size=16, workers=0, log_every=2, gated_layers_spec=[1])
    log = [json.loads(line) for line in (tmp_path / "gated" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 4] and set(log[-1]["gates"]["1"]) == {"attn", "dense"}
    assert gated["model"] == "mini-vit-test" and gated["gated_layers"] == [1]
    loaded, _, _ = load_model(None, str(tmp_path / "gated" / "model.pt"))
    plain, _, _ = load_model("mini-vit-test")
    inject_gated_blocks(plain, [1])
    plain.load_state_dict(torch.load(tmp_path / "gated" / "model.pt")["state_dict"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), plain.encode_image(images))
        assert loaded.visual.transformer.resblocks[1].gated_attn_block.alpha_attn != 0


def test_bad_input_gives_clear_errors_and_skips_corrupt_samples(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shards found"):
        train(tmp_path / "empty", "mini-vit-test", None, tmp_path / "r0", steps=1, **FAST)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "junk-000000.tar").write_bytes(b"this is not a tar file" * 50)
    with pytest.raises(ValueError, match="no readable image-text samples"):
        train(tmp_path / "junk", "mini-vit-test", None, tmp_path / "r1", steps=1, **FAST)
    corrupt = write_shards(tmp_path / "corrupt", 32, shards=1, corrupt=3)
    summary = train(corrupt, "mini-vit-test", None, tmp_path / "r2", strategy="full", steps=2, **FAST)
    assert summary["skipped"] == {"undecodable: OSError": 3}
    with pytest.raises(FloatingPointError, match="loss is nan at step .*checkpoints .* are kept"):
        train(corrupt, "mini-vit-test", None, tmp_path / "r3", strategy="full", steps=6, batch_size=16,
              workers=0, lr=1e30, warmup=1, grad_clip=0, checkpoint_every=1)
    assert (tmp_path / "r3" / "checkpoints" / "step_1.pt").is_file()
