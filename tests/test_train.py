import io
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageDraw

from react_vl.distributed import init_distributed
from react_vl.gated import inject_gated_blocks
from react_vl.loss import caption_ids
from react_vl.models import load_model, text_tower_fingerprint
from react_vl.strategies import STRATEGIES, build_model, set_trainable
from react_vl.train import TrainConfig, train
from react_vl.train_data import RankBatches, Source, open_shard_set

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
FAST = dict(model="mini-vit-test", batch_size=16, workers=0, log_every=1, warmup=2, lr=2e-3)


def shape_shards(write_shards, out, n, shards=2, seed=0, prefix="shard", corrupt=0, text_model=None):
    """n coloured discs and squares with their captions, through conftest's shard writer (sample i in
    shard i % shards, key PREFIX{shard}_{index}); the first `corrupt` samples of every shard get
    broken PNG bytes. `text_model` (model, tokenizer, name): each sample also carries its caption's
    embedding by that model's text tower (KEY.text_emb.npy), declared in summary.json."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(["disc", "square"])
        image = Image.new("RGB", (32, 32), "white")
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "disc" else draw.rectangle)([6, 6, 26, 26], fill=COLOURS[colour])
        png = io.BytesIO()
        image.save(png, "PNG")
        caption = f"a {colour} {shape} ({prefix})"
        samples.append({"__key__": f"{prefix}{i % shards}_{i // shards:05d}", "txt": caption,
                        "png": png.getvalue()[:20] if i // shards < corrupt else png.getvalue()})
        if text_model:
            samples[-1]["text_emb.npy"] = _embedding(text_model, caption)
    names = [path.name for path in write_shards(out, samples, shards=shards, prefix=prefix)]
    if text_model:
        model, _, name = text_model
        summary = {"count": n, "shards": names,
                   "text_embeddings": {"model": name, "pretrained": None, "dim": model.visual.output_dim,
                                       "text_tower_sha256": text_tower_fingerprint(model)}}
        (out / "summary.json").write_text(json.dumps(summary))
    return out


def _embedding(text_model, caption: str) -> bytes:
    model, tokenizer, _ = text_model
    with torch.no_grad():
        embedding = model.encode_text(tokenizer([caption]), normalize=True)[0].numpy().astype(np.float16)
    buffer = io.BytesIO()
    np.save(buffer, embedding)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, write_shards):
    return shape_shards(write_shards, tmp_path_factory.mktemp("shards"), 96, shards=4)


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
def _batches(shard_specs, per_batch, rank=0, world_size=1, workers=0, start=0, cursors=None, n=4):
    _, _, preprocess = open_clip.create_model_and_transforms("mini-vit-test")
    env = init_distributed("cpu")
    sources = [Source(open_shard_set(spec, env), share) for spec, share in zip(shard_specs, per_batch)]
    batches = RankBatches(sources, preprocess, open_clip.get_tokenizer("mini-vit-test"), seed=3, start=start,
                          rank=rank, world_size=world_size, workers=workers, cursors=cursors, buffer=20)
    taken = [batches.next() for _ in range(n)]
    cursors = batches.cursors
    batches.close()
    return taken, cursors


def test_streams_split_the_shards_and_resume_where_they_stopped(shards, tmp_path, write_shards):
    one_rank, _ = _batches([shards], [16], workers=2, n=8)  # 2 streams, 8 samples each per micro-batch
    rank0, _ = _batches([shards], [16], rank=0, world_size=2, n=8)
    rank1, _ = _batches([shards], [16], rank=1, world_size=2, n=8)
    for batch, part0, part1 in zip(one_rank, rank0, rank1):  # 1 rank x 2 workers == 2 ranks x 1 stream
        assert batch["keys"] == part0["keys"] + part1["keys"]
        assert torch.equal(batch["images"], torch.cat([part0["images"], part1["images"]]))
    epoch = [key for b in one_rank[:6] for key in b["keys"]]  # 6 x 16 = the 96 samples of 4 equal shards
    assert len(epoch) == len(set(epoch)) == 96
    shards_of = [{key.split("_")[0] for b in part[:6] for key in b["keys"]} for part in (rank0, rank1)]
    assert len(shards_of[0]) == len(shards_of[1]) == 2 and not shards_of[0] & shards_of[1]  # disjoint shards
    assert [b["keys"] for b in one_rank[6:]] != [one_rank[i]["keys"] for i in range(2)]  # epoch 2: a new order
    # resume: from the cursors after 3 micro-batches, the same batches follow, across the epoch boundary
    _, cursors = _batches([shards], [16], workers=2, n=3)
    resumed, _ = _batches([shards], [16], workers=2, start=3, cursors=cursors, n=5)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in one_rank[3:]]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(resumed, one_rank[3:]))
    # a mixed-in general set gives its share of every micro-batch
    general = shape_shards(write_shards, tmp_path / "general", 40, shards=2, prefix="general")
    mixed, _ = _batches([shards, general], [12, 4], workers=2, n=3)
    general_ids = set(caption_ids([f"a {c} {s} (general)" for c in COLOURS for s in ("disc", "square")]).tolist())
    assert [sum(i in general_ids for i in b["text_ids"].tolist()) for b in mixed] == [4, 4, 4]


def test_shard_urls_of_any_kind_and_shard_lists_webdataset_opens(shards):
    import functools
    import http.server
    import threading

    local, _ = _batches([shards], [16], n=6)
    piped, _ = _batches([f"pipe:cat {shards}/shard-{{000000..000003}}.tar"], [16], n=6)  # counted on rank 0
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        served, _ = _batches([f"http://127.0.0.1:{server.server_port}/shard-{{000000..000003}}.tar"], [16], n=6)
    finally:
        server.shutdown()
    assert [b["keys"] for b in piped] == [b["keys"] for b in served] == [b["keys"] for b in local]
    listed, _ = _batches([sorted(str(p) for p in Path(shards).glob("*.tar"))], [16], n=6)  # a list of shards
    assert [b["keys"] for b in listed] == [b["keys"] for b in local]


# --- training ----------------------------------------------------------------------------------
def test_resume_reproduces_the_uninterrupted_run_and_refuses_other_setups(shards, tmp_path):
    full = train(TrainConfig(shards, tmp_path / "a", strategy="gated-image", steps=8, checkpoint_every=3,
                             **{**FAST, "workers": 2}))  # 8 x 16 > 96 samples: the resumed part crosses an epoch
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step_3.pt", "step_6.pt", "step_8.pt"]
    checkpoint = str(tmp_path / "a" / "checkpoints" / "step_3.pt")
    resumed = train(TrainConfig(shards, tmp_path / "b", strategy="gated-image", steps=8, resume=checkpoint,
                                **{**FAST, "workers": 2}))
    assert resumed["start_step"] == 3
    assert resumed["losses"] == pytest.approx(full["losses"][3:], abs=1e-5)
    gates = [v for g in full["final_gates"].values() for v in g.values()]
    assert gates and [v for g in resumed["final_gates"].values() for v in g.values()] == pytest.approx(gates, abs=1e-6)
    with pytest.raises(ValueError, match="strategy is 'gated-image' there, 'gated-image-text' here"):
        train(TrainConfig(shards, tmp_path / "c", strategy="gated-image-text", steps=6, resume=checkpoint,
                          **{**FAST, "workers": 2}))
    with pytest.raises(ValueError, match=r"1 process\(es\) x 2 loader worker\(s\) = 2 data streams; this run has "
                                         r"1 x 1 = 1.*--workers 2"):
        train(TrainConfig(shards, tmp_path / "d", strategy="gated-image", steps=6, resume=checkpoint, **FAST))


DDP_SCRIPT = """
import json, sys
import torch
from open_clip.loss import ClipLoss
from react_vl.distributed import init_distributed
from react_vl.loss import UniCLLoss, caption_ids
from react_vl.train import TrainConfig, train
from react_vl.train_data import RankBatches, Source, open_shard_set

shards, corrupt, out = sys.argv[1:4]
env = init_distributed("cpu")
common = dict(model="mini-vit-test", strategy="full", steps=2, batch_size=8, precision="fp32", workers=0, lr=1e-3,
              warmup=1, seed=5, checkpoint_every=1)
train(TrainConfig(shards, f"{out}/ddp", **common))
train(TrainConfig(shards, f"{out}/local", local_loss=True, gather_with_grad=True, **common))
train(TrainConfig(corrupt, f"{out}/corrupt", **{**common, "steps": 4}))
# one epoch of the data stream (6 micro-batches of 16): which samples this rank reads
batches = RankBatches([Source(open_shard_set(shards, env), 16)], lambda image: torch.zeros(1),
                      lambda captions: torch.zeros(len(captions), 1, dtype=torch.long), seed=3, start=0,
                      rank=env.rank, world_size=env.world_size, workers=0)
keys = [key for _ in range(6) for key in batches.next()["keys"]]
# --local-loss with distinct captions: open_clip's ClipLoss
g = torch.Generator().manual_seed(env.rank)
image, text = (torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1) for _ in range(2))
ids = caption_ids([f"caption {env.rank} {i}" for i in range(4)])
scale = torch.tensor(10.0)
ours = UniCLLoss(env.rank, env.world_size, local_loss=True, gather_with_grad=True)(image, text, scale, ids)
theirs = ClipLoss(local_loss=True, gather_with_grad=True, rank=env.rank, world_size=env.world_size)(image, text, scale)
with open(f"{out}/rank{env.rank}.json", "w") as f:
    json.dump({"keys": keys, "device": str(env.device), "backend": torch.distributed.get_backend(),
               "ours": ours.item(), "theirs": theirs.item()}, f)
"""


@pytest.mark.slow
def test_two_process_ddp_reads_disjoint_shards_and_steps_as_one_process(shards, tmp_path, write_shards,
                                                                        free_port):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    corrupt = shape_shards(write_shards, tmp_path / "corrupt", 32, shards=4, corrupt=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(free_port), str(script), str(shards), str(corrupt), str(tmp_path)],
                   check=True, env=env, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["device"], r["backend"]) for r in ranks] == [("cpu", "gloo")] * 2  # the batch-size sync ran there
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 48
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"]) and len(set(ranks[0]["keys"] + ranks[1]["keys"])) == 96
    assert not {k.split("_")[0] for k in ranks[0]["keys"]} & {k.split("_")[0] for k in ranks[1]["keys"]}
    assert all(r["ours"] == pytest.approx(r["theirs"], abs=1e-6) for r in ranks)
    # 2 ranks x 1 stream == 1 rank x 2 loader workers: the same global batches, the same step
    single = train(TrainConfig(shards, tmp_path / "one", model="mini-vit-test", strategy="full", steps=2, batch_size=8,
                               precision="fp32", workers=2, lr=1e-3, warmup=1, seed=5))
    b = torch.load(tmp_path / "one" / "model.pt")["state_dict"]
    for run in ("ddp", "local"):
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert (summary["args"]["world_size"], summary["args"]["streams"]) == (2, 2)
        assert summary["losses"] == pytest.approx(single["losses"], abs=1e-5)
        a = torch.load(tmp_path / run / "model.pt")["state_dict"]
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # the 2-rank checkpoint resumes in 1 process x 2 workers: the same streams continue where they stopped
    resumed = train(TrainConfig(shards, tmp_path / "resumed", model="mini-vit-test", strategy="full", steps=2,
                                batch_size=8, precision="fp32", workers=2, lr=1e-3, warmup=1, seed=5,
                                resume=str(tmp_path / "ddp" / "checkpoints" / "step_1.pt")))
    assert resumed["losses"] == pytest.approx(single["losses"][1:], abs=1e-5)
    # every shard has one corrupt sample; the ranks' skip counts are summed
    skipped = json.loads((tmp_path / "corrupt" / "summary.json").read_text())["skipped"]
    assert skipped["total"] == 4 and skipped["per_rank"] == [2, 2]


def test_loss_decreases_on_mini_world_and_outputs_load_back(tiny_world, tiny_trained_model, tmp_path):
    run = tiny_trained_model.parent  # pretrained with strategy full from random init (tests/conftest.py)
    summary = json.loads((run / "summary.json").read_text())
    losses = summary["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert {"steps", "time_s", "samples_per_s", "trainable_params", "final_gates", "strategy", "args"} <= set(summary)
    assert summary["strategy"] == "full" and summary["trainable_params"] == summary["total_params"]
    assert (run / "curves.png").stat().st_size > 0
    # customize the pretrained model with gated blocks: gates are logged per layer
    gated = train(TrainConfig(tiny_world / "pretrain", tmp_path / "gated", pretrained=str(tiny_trained_model), steps=4,
                              batch_size=16, workers=0, log_every=2, gated_layers=[1]))
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


def test_customize_command_takes_its_defaults_from_train_config_and_trains(shards, tmp_path):
    from dataclasses import fields

    from click.testing import CliRunner

    import react_vl.cli as cli

    options = {p.name: p.default for p in cli.customize.params}
    for config_field in fields(TrainConfig):
        if config_field.name not in ("shards", "out", "gated_layers"):
            assert options[config_field.name] == config_field.default, config_field.name
    result = CliRunner().invoke(cli.main, ["customize", str(shards), "--model", "mini-vit-test", "--out",
                                           str(tmp_path / "run"), "--strategy", "locked-text", "--steps", "2",
                                           "--batch-size", "16", "--workers", "0", "--grad-checkpointing",
                                           "--gated-layers", "1"])
    assert result.exit_code == 0, result.output
    args = json.loads((tmp_path / "run" / "summary.json").read_text())["args"]
    assert (args["strategy"], args["grad_checkpointing"], args["steps"], args["workers"]) == ("locked-text", True, 2, 0)


# --- caption embeddings from the shards --------------------------------------------------------
@pytest.fixture(scope="module")
def embedded_shards(tmp_path_factory, write_shards):
    """Shards carrying the captions' embeddings by the text tower of mini-vit-test as built with seed 0."""
    torch.manual_seed(0)  # as the trainer builds it: the same text tower
    model, _, tokenizer = build_model("mini-vit-test", None, "gated-image")
    model.eval()
    return shape_shards(write_shards, tmp_path_factory.mktemp("embedded"), 48, shards=2,
                        text_model=(model, tokenizer, "mini-vit-test"))


def test_cached_caption_embeddings_give_the_text_towers_loss(embedded_shards, tmp_path, write_shards):
    # general pairs without embeddings: the text tower runs for them
    general = shape_shards(write_shards, tmp_path / "general", 40, shards=2, prefix="general")
    options = dict(strategy="gated-image", steps=3, mix_shards=str(general), mix_ratio=0.5, precision="fp32",
                   seed=0, **FAST)
    cached = train(TrainConfig(embedded_shards, tmp_path / "cached", **options))
    tower = train(TrainConfig(embedded_shards, tmp_path / "tower", text_embeddings=False, **options))
    assert cached["args"]["text_embeddings_used"] == [str(embedded_shards)]
    assert tower["args"]["text_embeddings_used"] == []
    assert cached["losses"] == pytest.approx(tower["losses"], abs=2e-3)  # float16 embeddings vs the fp32 tower
    assert cached["losses"][0] != cached["losses"][-1]
    # with a trained text tower the embeddings are not used
    text_trained = train(TrainConfig(embedded_shards, tmp_path / "text", strategy="gated-image-text", steps=1,
                                     seed=0, **FAST))
    assert text_trained["args"]["text_embeddings_used"] == []


def test_foreign_or_missing_caption_embeddings_are_refused_or_skipped(embedded_shards, tmp_path, write_shards):
    import shutil

    summary = json.loads((embedded_shards / "summary.json").read_text())
    for name, record, message in [
        ("other-model", {"model": "ViT-B-32", "dim": 512}, r"512-d from 'ViT-B-32'; this run's text tower is 32-d "
                                                          r"'mini-vit-test'.*--no-text-embeddings"),
        ("other-weights", {"text_tower_sha256": "0" * 64}, "other mini-vit-test text-tower weights"),
    ]:
        folder = shutil.copytree(embedded_shards, tmp_path / name)
        (folder / "summary.json").write_text(json.dumps({**summary, "text_embeddings": {
            **summary["text_embeddings"], **record}}))
        with pytest.raises(ValueError, match=f"{folder}: its caption embeddings.*" + message):
            train(TrainConfig(folder, tmp_path / f"run-{name}", steps=1, **FAST))
        train(TrainConfig(folder, tmp_path / f"run-{name}-tower", steps=1, text_embeddings=False, **FAST))
    # samples without the embedding in a set that declares them: skipped and counted; all without: an error
    partial = shutil.copytree(embedded_shards, tmp_path / "partial")
    shape_shards(write_shards, partial, 16, shards=1, prefix="plain")
    (partial / "summary.json").write_text(json.dumps({**summary, "count": 64, "shards": summary["shards"] + [
        "plain-000000.tar"]}))
    run = train(TrainConfig(partial, tmp_path / "run-partial", steps=4, **FAST))  # 4 x 16: one epoch
    assert run["skipped"]["counts"] == {"no caption embedding": 16}
    lacking = shape_shards(write_shards, tmp_path / "lacking", 32, shards=1)
    (lacking / "summary.json").write_text(json.dumps({**summary, "count": 32, "shards": ["shard-000000.tar"]}))
    with pytest.raises(ValueError, match="empty batch at step 0.*no caption embedding"):
        train(TrainConfig(lacking, tmp_path / "run-lacking", steps=1, **FAST))


def test_bad_input_gives_clear_errors_and_skips_corrupt_samples(shards, tmp_path, write_shards):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no shard"):
        train(TrainConfig(tmp_path / "empty", tmp_path / "r0", steps=1, **FAST))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "junk-000000.tar").write_bytes(b"this is not a tar file" * 50)
    with pytest.raises(ValueError, match="no readable image-text samples"):  # counted (on rank 0) for --epochs
        train(TrainConfig(tmp_path / "junk", tmp_path / "r1", epochs=1, **FAST))
    with pytest.raises(ValueError, match=r"data stream 0 of 1 read no image-text sample in epoch 0 from its 1 "
                                         r"shard\(s\) \['pipe:cat /nonexistent/x.tar'\]: skipped \{'unreadable shard'"):
        train(TrainConfig("pipe:cat /nonexistent/x.tar", tmp_path / "r2", steps=1, train_num_samples=10, **FAST))
    with pytest.raises(ValueError, match=r"4 shard\(s\) for 8 data streams \(1 process\(es\) x 8 loader worker\(s\)\); "
                                         r".*--workers 4 or fewer, or materialize with a smaller --maxcount"):
        train(TrainConfig(shards, tmp_path / "r3", steps=1, **{**FAST, "workers": 8}))
    with pytest.raises(ValueError, match=r"--batch-size 15 must be a multiple of the data streams: 1 process\(es\) "
                                         r"x 2 loader worker\(s\) = 2"):
        train(TrainConfig(shards, tmp_path / "r4", steps=1, **{**FAST, "workers": 2, "batch_size": 15}))
    corrupt = shape_shards(write_shards, tmp_path / "corrupt", 32, shards=1, corrupt=3)
    summary = train(TrainConfig(corrupt, tmp_path / "r5", strategy="full", steps=2, **FAST))
    assert summary["skipped"]["total"] == 3 and list(summary["skipped"]["counts"]) == ["undecodable: OSError"]
    assert len(summary["skipped"]["listed"]["undecodable: OSError"]) == 3  # where: shard and key
    with pytest.raises(FloatingPointError, match="loss is nan at step .*checkpoints .* are kept"):
        train(TrainConfig(corrupt, tmp_path / "r6", model="mini-vit-test", strategy="full", steps=6, batch_size=16,
                          workers=0, lr=1e30, warmup=1, grad_clip=0, checkpoint_every=1))
    assert (tmp_path / "r6" / "checkpoints" / "step_1.pt").is_file()
