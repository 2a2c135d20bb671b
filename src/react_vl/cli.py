"""The `react-vl` command: one subcommand per pipeline stage, each a thin layer over a Python function.

Every command only parses options and calls the stage's function; the work lives in the stage
modules (react_vl.world, .embed, .index, .retrieve, .materialize, .train, .evaluate, .demo).
"""

import json
import shlex

import click

from .demo import DemoConfig, run_demo
from .experiment import BASE_CACHE
from .train_config import TrainConfig
from .world import VARIANTS, WorldConfig


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="react-vl")
def main():
    """react-vl: customize CLIP models with retrieval-augmented knowledge (REACT, CVPR 2023).

    Pipeline: embed a corpus -> index it -> retrieve pairs for a task's class names ->
    materialize them as shards -> customize the model -> evaluate base vs customized.
    `react-vl demo` runs all of it offline on the generated mini world.
    """


# --- world -------------------------------------------------------------------------------------
@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the world into (WORLD/).")
@click.option("--seed", default=WorldConfig.seed, help="World seed: same seed, byte-identical shards.")
@click.option("--pretrain-size", default=WorldConfig.pretrain_size,
              help="Pairs in the pretraining corpus (photo-dominated).")
@click.option("--kb-size", default=WorldConfig.kb_size,
              help="Pairs in the knowledge-base corpus (every style, rare ones a few percent).")
@click.option("--eval-size", default=WorldConfig.eval_size, help="Evaluation (test) images per task, classes balanced.")
@click.option("--val-size", default=WorldConfig.val_size,
              help="Validation images per task, drawn like the test images from other seeds: for choosing settings.")
@click.option("--noise-rate", default=WorldConfig.noise_rate,
              help="Share of corpus captions that are mismatched or irrelevant junk.")
@click.option("--shard-size", default=WorldConfig.shard_size, help="Pairs per webdataset shard.")
@click.option("--variant", default=WorldConfig.variant, type=click.Choice(VARIANTS),
              help="How the rare styles look: 'web' (monochrome pencil sketches whose captions rarely name a "
                   "colour, dark grainy nights) or 'colour-cue' (the first world: sketches in the object's colour).")
@click.option("--workers", default=None, type=int, help="Generator processes [default: one per CPU core].")
def world(out, seed, pretrain_size, kb_size, eval_size, val_size, noise_rate, shard_size, variant, workers):
    """Generate the mini world: pretraining corpus, knowledge base and evaluation tasks as shards."""
    from .world import generate_world

    config = WorldConfig(seed=seed, pretrain_size=pretrain_size, kb_size=kb_size, eval_size=eval_size,
                         val_size=val_size, noise_rate=noise_rate, shard_size=shard_size, variant=variant,
                         workers=workers)
    summary = generate_world(out, config)
    click.echo(f"{out}: {summary['shards']['total']} shards ({summary['shards']['reused']} reused), "
               f"{summary['pairs_per_second']} pairs/s; counts in {out}/world.json")


# --- tasks -------------------------------------------------------------------------------------
@main.command()
@click.argument("name", required=False)
def tasks(name):
    """List built-in tasks, or show one (NAME: a built-in name or a .yaml/.json task file)."""
    from .tasks import get_task, list_tasks

    if name is None:
        for task_name in list_tasks():
            task = get_task(task_name)
            click.echo(f"{task_name:20s} {len(task.classnames):5d} classes  {len(task.templates):3d} templates  "
                       f"{task.metric}" + (f"  ({task.role}: {task.attribute}, {task.style})" if task.role else ""))
        return
    try:
        task = get_task(name)
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(json.dumps(task.to_dict(), indent=2))


precision_option = click.option(
    "--precision", default="auto", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    help="Autocast precision; auto = bf16 (fp16 on GPUs without bf16; fp32 on CPUs without native bf16).")


# --- embed -------------------------------------------------------------------------------------
@main.command()
@click.argument("corpus", nargs=-1, required=True)
@click.option("--model", "model_name", default=None, help="open_clip model name (e.g. ViT-B-32, mini-vit).")
@click.option("--pretrained", default=None, help="open_clip pretrained tag or local checkpoint; none = random init.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Knowledge-base folder to write (or resume).")
@click.option("--batch-size", default=256, help="Pairs per forward pass.")
@click.option("--workers", default=4, help="DataLoader worker processes that read and decode shards.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", help="Stored embedding dtype.")
@click.option("--device", default="auto", help="cpu, cuda, cuda:N or auto.")
@precision_option
@click.option("--caption-column", default="caption", help="Parquet corpora: the caption column.")
@click.option("--image-column", default="image", help="Parquet corpora: column with image bytes or paths.")
@click.option("--key-column", default="key", help="Parquet corpora: the key column (row number if absent).")
def embed(corpus, model_name, pretrained, out, batch_size, workers, dtype, device, precision, caption_column,
          image_column, key_column):
    """Embed an image-text corpus into a clip-retrieval style knowledge base.

    CORPUS: webdataset shards (paths, brace patterns, globs, fsspec URLs), parquet files, or
    folders (of shards, or of images with sidecar .txt captions). Rerun the same command to resume;
    run it under `torchrun --nproc_per_node N` to split the shards between N processes.
    """
    from .data import ParquetColumns
    from .embed import embed_corpus
    summary = embed_corpus(list(corpus), model_name, pretrained, out, batch_size=batch_size, workers=workers,
                           dtype=dtype, device=device, precision=precision,
                           columns=ParquetColumns(caption_column, image_column, key_column))
    if summary:
        click.echo(f"{summary['count']} pairs in {out} ({summary['skipped_total']} skipped, "
                   f"{summary['decode_warnings_total']} decode warnings; see {out}/embed_summary.json)")


# --- index -------------------------------------------------------------------------------------
@main.command()
@click.argument("kb", type=click.Path(exists=True, file_okay=False))
@click.option("--memory-budget", default="4GB",
              help="RAM one index may keep while searching (e.g. 4GB, 512MB); picks the index type. Inverted "
                   "lists put on disk do not count.")
@click.option("--target-recall", default=0.95, help="Recall@k against exact search that the search parameters are tuned for.")
@click.option("--k", default=10, help="The k of the recall@k target.")
@click.option("--queries", "n_queries", default=1000, help="Held-out caption queries used to measure recall and latency.")
@click.option("--kind", "kinds", type=click.Choice(["image", "text"]), multiple=True, default=("image", "text"),
              help="Which index to build (repeatable).")
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="IVF indexes: blocks the vectors are added in, then merged into one on-disk index "
                   "(default: one when the index fits the budget, else enough to fit it).")
@click.option("--processes", type=click.IntRange(min=1), default=1, help="Blocks filled at a time, one process each.")
@click.option("--model", "model_name", default=None,
              help="For a folder without kb.json (clip-retrieval, LAION): the open_clip model that made its "
                   "embeddings, recorded in kb.json so queries use it.")
@click.option("--pretrained", default=None, help="With --model: its pretrained tag.")
def index(kb, memory_budget, target_recall, k, n_queries, kinds, shards, processes, model_name, pretrained):
    """Build tuned FAISS indexes (image.index, text.index) over a knowledge base.

    KB: a folder written by `react-vl embed` (or clip-retrieval). Writes KB/{image,text}.index and
    KB/{image,text}.index.json (factory, tuned parameters, recall, latency, size); an index built
    in blocks keeps its inverted lists in KB/{image,text}.ivfdata, memory-mapped when searching.
    A KB without caption embeddings gets the image index only.
    """
    from .index import build_indexes
    from .kb import record_model
    try:
        if model_name:
            record_model(kb, model_name, pretrained)
        elif pretrained:
            raise click.UsageError("--pretrained needs --model")
        infos = build_indexes(kb, memory_budget, target_recall, k, tuple(kinds), n_queries, shards, processes)
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    if "text" in kinds and "text" not in infos:
        click.echo(f"{kb} has no caption embeddings (text_emb/): text.index not built, retrieve runs t2i only")
    for kind, info in infos.items():
        where = f", lists on disk in {info['blocks']} block(s)" if info["on_disk"] else ""
        click.echo(f"{kind}.index: {info['factory']} [{info['params'] or 'exact'}] recall@{k} "
                   f"{info[f'recall_at_{k}']:.3f}, {info['latency_ms_per_query']:.3f} ms/query, "
                   f"{info['size_bytes'] / 2**20:.1f} MiB{where}")


# --- retrieve ----------------------------------------------------------------------------------
@main.command()
@click.argument("kb", type=click.Path(exists=True, file_okay=False))
@click.option("--task", required=True, help="Built-in task name or a task .yaml/.json file.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for retrieved.parquet and summary.json.")
@click.option("--mode", type=click.Choice(["t2t", "t2i", "both"]), default="both",
              help="Search captions (t2t), images (t2i) or both, merged.")
@click.option("--k", type=int, default=None, help="Hits per query [default: --per-class, else 100].")
@click.option("--per-class", type=int, default=None, help="Keep each class's best N pairs.")
@click.option("--model", default=None, help="Model expected to have embedded the KB; refused if it differs.")
@click.option("--dedup-threshold", type=float, default=0.94, help="Image cosine above which results are one image.")
@click.option("--no-dedup", is_flag=True, help="Keep near-duplicate images.")
@click.option("--min-clip-score", type=float, default=None, help="Drop pairs whose image-caption cosine is below this.")
@click.option("--eval-set", type=click.Path(exists=True), default=None,
              help="Evaluation images (.npy of embeddings, or a webdataset folder) whose near-duplicates are dropped.")
@click.option("--eval-threshold", type=float, default=0.95, help="Image cosine counted as an evaluation near-duplicate.")
@click.option("--hits-per-chunk", type=int, default=4_000_000,
              help="Hits (query x k x mode) searched and held at a time: bounds memory.")
def retrieve(kb, task, out, mode, k, per_class, model, dedup_threshold, no_dedup, min_clip_score, eval_set,
             eval_threshold, hits_per_chunk):
    """Retrieve the knowledge-base pairs most relevant to a task's class-name prompts.

    KB: an indexed knowledge base (`react-vl index`). Writes OUT/retrieved.parquet and OUT/summary.json;
    resumes a killed run from OUT/parts/. Runs as it is under torchrun (the classes are split
    between the processes): torchrun --nproc_per_node 8 -m react_vl.cli retrieve KB --task ... --out R
    """
    from .distributed import world_info_from_env
    from .retrieve import retrieve as retrieve_pairs
    try:
        summary = retrieve_pairs(kb, task, out, mode=mode, k=k, per_class=per_class, model=model,
                                 dedup_threshold=None if no_dedup else dedup_threshold,
                                 min_clip_score=min_clip_score, eval_set=eval_set, eval_threshold=eval_threshold,
                                 hits_per_chunk=hits_per_chunk)
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    if world_info_from_env()[0] == 0:
        short = summary["short_classes"]["count"]
        click.echo(f"{summary['retrieved']} pairs for {summary['task']} in {out} (removed: {summary['removed']}; "
                   f"{short} classes short of --per-class; see {out}/summary.json)")


# --- materialize -------------------------------------------------------------------------------
@main.command()
@click.argument("retrieved", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for shard-NNNNNN.tar and summary.json.")
@click.option("--kb", default=None, type=click.Path(exists=True, file_okay=False),
              help="Knowledge base for caption embeddings and `url`s [default: the one R/summary.json names].")
@click.option("--maxcount", default=10000, help="Samples per output shard.")
@click.option("--workers", default=1, help="Processes writing output shards in parallel.")
@click.option("--no-download", is_flag=True, help="Only write the img2dataset input and command; do not run it.")
@click.option("--processes-count", default=None, type=int, help="img2dataset processes [default: one per CPU core].")
@click.option("--thread-count", default=64, help="img2dataset download threads per process.")
@click.option("--resize-mode", default="keep_ratio",
              type=click.Choice(["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]),
              help="img2dataset resize mode (keep_ratio: the smaller side to --image-size).")
@click.option("--image-size", default=256, help="img2dataset image size.")
def materialize(retrieved, out, kb, maxcount, workers, no_download, processes_count, thread_count, resize_mode,
                image_size):
    """Write retrieved pairs as webdataset shards ready for training; rerun to resume.

    RETRIEVED: the retrieve output folder (R/) or its retrieved.parquet. Pairs with only a URL
    are downloaded by img2dataset into OUT/downloaded, a training-shard folder as it is.
    """
    from .materialize import DownloadOptions
    from .materialize import materialize as materialize_set
    download = DownloadOptions(thread_count=thread_count, resize_mode=resize_mode, image_size=image_size)
    download.processes_count = processes_count or download.processes_count
    try:
        summary = materialize_set(retrieved, out, kb=kb, maxcount=maxcount, run_img2dataset=not no_download,
                                  workers=workers, download=download)
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{summary['count']} pairs in {len(summary['shards'])} shard(s) in {out} "
               f"({summary['missing']['total']} missing; see {out}/summary.json)")
    if summary["url_pairs"]:
        urls = summary["url_pairs"]
        click.echo(f"{urls['count']} pairs to download; img2dataset command:\n  {shlex.join(urls['img2dataset_command'])}")


# --- customize ---------------------------------------------------------------------------------
@main.command()
@click.argument("shards")
@click.option("--model", "model", default=TrainConfig.model, help="open_clip model name (e.g. ViT-B-32, mini-vit); "
              "may be omitted when --pretrained is a react-vl checkpoint.")
@click.option("--pretrained", default=TrainConfig.pretrained, help="open_clip pretrained tag or checkpoint path; "
              "omit to train from random init (how the mini world's base model is pretrained, with --strategy full).")
@click.option("--out", required=True, type=click.Path(), help="Run folder: model.pt, checkpoints/, log.jsonl, "
              "summary.json, curves.png.")
@click.option("--strategy", default=TrainConfig.strategy, type=click.Choice(
    ["gated-image", "gated-image-text", "locked-text", "locked-image", "full"]), help="Which weights train.")
@click.option("--gated-layers", default=None, help="Image-tower layers that get gated blocks: a count of last "
              "layers ('6') or indices ('3,4,5'); default the last 6, or half of a shallower tower.")
@click.option("--steps", type=int, default=TrainConfig.steps, help="Optimizer steps (overrides --epochs).")
@click.option("--epochs", type=float, default=TrainConfig.epochs, help="Passes over SHARDS.")
@click.option("--train-num-samples", type=int, default=TrainConfig.train_num_samples, help="Samples in SHARDS, "
              "when neither SHARDS/summary.json nor img2dataset's _stats.json files say (else rank 0 counts them).")
@click.option("--batch-size", type=int, default=TrainConfig.batch_size, help="Global batch per micro-step, over "
              "all processes; a multiple of processes x --workers.")
@click.option("--accum-steps", type=int, default=TrainConfig.accum_steps, help="Micro-steps accumulated per "
              "optimizer step.")
@click.option("--lr", type=float, default=TrainConfig.lr, help="Peak learning rate; default 5e-4 for gated "
              "strategies and random init, 5e-5 when tuning pretrained base weights.")
@click.option("--gate-lr-scale", type=float, default=TrainConfig.gate_lr_scale, help="Learning-rate multiplier for "
              "the gate alphas.")
@click.option("--weight-decay", type=float, default=TrainConfig.weight_decay, help="AdamW weight decay (never on "
              "gains, biases, gates, logit scale).")
@click.option("--warmup", type=int, default=TrainConfig.warmup, help="Linear warm-up steps before the cosine "
              "decay; default 5% of the steps.")
@click.option("--grad-clip", type=float, default=TrainConfig.grad_clip, help="Gradient-norm clip; 0 turns it off.")
@precision_option
@click.option("--augment/--no-augment", default=TrainConfig.augment, help="The paper's augmentation (RandAugment, "
              "random resized crop 0.08-1, colour jitter 0.4, random erasing 0.25).")
@click.option("--train-logit-scale/--freeze-logit-scale", default=TrainConfig.train_logit_scale, help="Train the "
              "temperature (the public REACT code does) or keep the base model's.")
@click.option("--mix-shards", default=TrainConfig.mix_shards, help="A second (general) shard set mixed into every "
              "batch, to bound forgetting.")
@click.option("--mix-ratio", type=float, default=TrainConfig.mix_ratio, help="Share of every batch taken from "
              "--mix-shards.")
@click.option("--text-embeddings/--no-text-embeddings", default=TrainConfig.text_embeddings, help="With a locked "
              "text tower, take the captions' knowledge-base embeddings stored in the shards instead of running "
              "the text tower (shards without them run it).")
@click.option("--local-loss", is_flag=True, default=TrainConfig.local_loss, help="Each process computes the loss "
              "of its own rows only (local images vs all texts and back), as open_clip's --local-loss.")
@click.option("--gather-with-grad", is_flag=True, default=TrainConfig.gather_with_grad, help="Gather the features "
              "with gradients (open_clip's --gather-with-grad); with --local-loss a step equals a one-process step.")
@click.option("--grad-checkpointing", is_flag=True, default=TrainConfig.grad_checkpointing, help="Recompute the "
              "trained blocks' activations in the backward pass instead of storing them.")
@click.option("--torch-compile", is_flag=True, default=TrainConfig.torch_compile, help="torch.compile the model.")
@click.option("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every, help="Write "
              "RUN/checkpoints/step_N.pt every N steps.")
@click.option("--keep-checkpoints", type=int, default=TrainConfig.keep_checkpoints, help="How many of the latest "
              "checkpoints to keep.")
@click.option("--resume", default=TrainConfig.resume, help="Checkpoint path, or 'latest' for the newest in "
              "RUN/checkpoints (a fresh start when there is none).")
@click.option("--log-every", type=int, default=TrainConfig.log_every, help="Steps between log.jsonl records.")
@click.option("--seed", type=int, default=TrainConfig.seed, help="Seed of the init, data order and augmentation.")
@click.option("--workers", type=int, default=TrainConfig.workers, help="Data loader processes per rank (each one "
              "data stream with its own shards) [default: min(8, CPUs per process, shards per process)].")
@click.option("--shuffle-buffer", type=int, default=TrainConfig.shuffle_buffer, help="Samples in each stream's "
              "shuffle buffer.")
@click.option("--device", default=TrainConfig.device, help="auto, cpu, cuda or cuda:N (torchrun sets the rank's GPU).")
def customize(shards, gated_layers, **options):
    """Customize (or pretrain) a CLIP model on image-text webdataset SHARDS (a folder, a brace pattern, a glob
    or URLs: pipe:, http(s), s3:// ...).

    Runs under torchrun or srun as it is: torchrun --nproc-per-node 8 -m react_vl.cli customize ...
    """
    from .train import train

    layers = None
    if gated_layers:
        layers = [int(i) for i in gated_layers.split(",")] if "," in gated_layers else int(gated_layers)
    train(TrainConfig(shards, gated_layers=layers, **options))


# --- evaluate ----------------------------------------------------------------------------------
@main.command()
@click.argument("model_args", metavar="[MODEL]...", nargs=-1)
@click.option("--model", "model_options", multiple=True,
              help="Model spec LABEL=NAME@PRETRAINED, repeatable; the first is the base for deltas. NAME: open_clip "
                   "model (empty for a react-vl checkpoint), PRETRAINED: tag or checkpoint path (empty: random). "
                   "E.g. base=mini-vit@runs/base.pt, gated=@runs/g/model.pt, ViT-B-32@openai.")
@click.option("--task", "task_names", multiple=True, help="Task name or task file, repeatable (zero-shot + probe).")
@click.option("--data", default=None, help="Mini world WORLD/ (uses WORLD/eval/<task>), shards, class folders, "
                                           "or clip_benchmark:DATASET[:ROOT]; TASK=PATH (repeatable) per task.",
              multiple=True)
@click.option("--split", default="eval", type=click.Choice(["eval", "val"]),
              help="Mini world split: eval (test sets) or val (validation sets, for choosing settings).")
@click.option("--retrieval", multiple=True, help="Captioned set for recall@k: JSON [{image, captions}], CSV "
                                                 "(image, caption) or captioned shards; repeatable.")
@click.option("--probe-shots", default="", help="Linear-probe shots per class, comma separated, e.g. 1,5,full "
                                                "(empty: no probe).")
@click.option("--probe-seeds", default=3, help="Seeds per few-shot probe (mean and spread).")
@click.option("--no-language-init", is_flag=True, help="Start probe heads at zero instead of the class-prompt "
                                                       "text embeddings.")
@click.option("--gate-scale", "gate_scales", default="", callback=lambda ctx, param, value: _gate_scales(value),
              help="Also evaluate every gated model with its gates scaled by each lambda in [0, 1], comma "
                   "separated, e.g. 0,0.25,0.5,0.75,1 (0: the base, 1: the trained model), as LABEL@LAMBDA; "
                   "with --split val, the lambda the rule chooses is printed and written to OUT/gate_scale.json.")
@click.option("--out", default="EVAL", type=click.Path(file_okay=False), help="Folder for results, tables, chart.")
@click.option("--batch-size", default=64, help="Images per forward pass.")
@click.option("--workers", default=2, help="DataLoader worker processes decoding images.")
@click.option("--device", default="auto", help="cpu, cuda, cuda:N or auto.")
def evaluate(model_args, model_options, task_names, data, split, retrieval, probe_shots, probe_seeds,
             no_language_init, gate_scales, out, batch_size, workers, device):
    """Evaluate models on tasks: zero-shot, retrieval, linear probe, side by side.

    Models come as MODEL arguments and/or --model options (same LABEL=NAME@PRETRAINED syntax).
    Writes OUT/results.json, table.md/csv/json (deltas against the first model) and chart.png;
    image features are cached in OUT/feature_cache.
    """
    from .evaluate import evaluate as evaluate_models
    per_task = dict(d.split("=", 1) for d in data if "=" in d)
    shared = [d for d in data if "=" not in d]
    shots = [s if s == "full" else int(s) for s in probe_shots.split(",") if s]
    results = evaluate_models(list(model_args) + list(model_options), list(task_names),
                              data=per_task or (shared[0] if shared else None), out=out, retrieval=retrieval,
                              probe_shots=shots, probe_seeds=probe_seeds, language_init=not no_language_init,
                              batch_size=batch_size, workers=workers, device=device, split=split,
                              gate_scales=gate_scales)
    click.echo(open(f"{results['out']}/table.md").read())
    if results["gate_scale_curve"]:
        _report_gate_scale(results, out)
    skipped = sum(len(reasons) for reasons in results["skipped"].values())
    click.echo(f"details: {out}/results.json, chart: {out}/chart.png; {skipped} unreadable samples skipped, "
               f"{results['cache_hits']} feature sets from the cache")


def _gate_scales(value: str) -> list[float]:
    try:
        scales = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers in [0, 1], e.g. 0,0.5,1; got {value!r}")
    if any(not 0 <= lam <= 1 for lam in scales):
        raise click.BadParameter(f"every gate scale must be in [0, 1] (0: the base, 1: the trained model); got {value!r}")
    return scales


def _report_gate_scale(results: dict, out: str) -> None:
    """On the validation split: the lambda chosen per gated model (OUT/gate_scale.json); else a hint."""
    from .experiment import choose_gate_scale
    from .utils import write_json

    roles = {task: role for task, role in results["roles"].items() if role}
    if results["split"] != "val" or "target" not in roles.values():
        click.echo("gate scale: choose lambda on the validation sets (--split val, tasks with target and control "
                   "roles), never on the test sets")
        return
    reference = next(iter(results["models"]))
    base = {task: 100 * by_model[reference]["score"] for task, by_model in results["zero_shot"].items()}
    choices = {label: choose_gate_scale(curve, base, roles) for label, curve in results["gate_scale_curve"].items()}
    write_json(choices, f"{out}/gate_scale.json")
    for label, choice in choices.items():
        click.echo(f"gate scale for {label}: {choice['chosen']} ({choice['rule']}, against {reference})")


# --- demo / study ------------------------------------------------------------------------------
def base_model_options(command):
    """--world-variant, --base-steps and --base-batch: the demo and the study train, or reuse from the
    cache, the same base on the same world."""
    command = click.option("--world-variant", default=WorldConfig.variant, type=click.Choice(VARIANTS),
                           help="The mini world's variant: 'web' (rare styles as the web shows them) or "
                                "'colour-cue' (sketches in the object's colour: a base that lacks the shape "
                                "concept can name sketches by colour words).")(command)
    command = click.option("--base-batch", default=DemoConfig.base_batch,
                           help="Pretraining batch size of the base model.")(command)
    return click.option("--base-steps", default=DemoConfig.base_steps,
                        help="Pretraining steps of the base model.")(command)


@main.command()
@click.option("--out", default="react-vl-demo", type=click.Path(file_okay=False),
              help="Demo folder: world/, base/, kb/, retrieved/, shards/, runs/, eval/, summary.json, report.html.")
@click.option("--seed", default=DemoConfig.seed, help="Seed of the world, the base model and the customization runs.")
@base_model_options
@click.option("--steps", default=DemoConfig.steps, help="Customization steps per strategy.")
@click.option("--mix-ratio", default=DemoConfig.mix_ratio, type=click.FloatRange(0, 1, max_open=True),
              help="Share of every customization batch drawn from the pretraining corpus (bounds forgetting).")
@click.option("--no-random-control", is_flag=True,
              help="Skip the control run on a random knowledge-base subset of the retrieved size.")
@click.option("--cache-dir", default=BASE_CACHE, help="Where trained base models are kept for reuse; "
              "'' turns the cache off.")
@click.option("--workers", default=DemoConfig.workers, type=int, help="Data-loading worker processes.")
def demo(out, seed, base_steps, base_batch, world_variant, steps, mix_ratio, no_random_control, cache_dir,
         workers):
    """Run the whole pipeline offline on the mini world and write a report.

    Generates the mini world, pretrains a small CLIP from scratch (cached: a second demo reuses
    it), embeds and indexes the knowledge base, retrieves pairs for the target tasks, customizes
    the base model (gated-image, locked-text, and gated-image on a random subset as a control)
    and evaluates base vs customized on target and control tasks. Sized for a 2-core CPU.
    """
    config = DemoConfig(world=WorldConfig(seed=seed, variant=world_variant), seed=seed, base_steps=base_steps,
                        base_batch=base_batch, steps=steps, mix_ratio=mix_ratio, random_control=not no_random_control,
                        workers=workers)
    run_demo(out, config, cache_dir=cache_dir or None)


@main.command()
@click.option("--out", default="react-vl-study", type=click.Path(file_okay=False),
              help="Study folder: world, base, KB, data/, runs/<key>/, study.json, study.md, study.png. Rerun to resume.")
@click.option("--quick", is_flag=True, help="Fewer points on the size, layer and mixing curves, 1 seed, and no "
                                            "concept ablation (it trains a second base: name it to add it).")
@click.option("--seeds", default=None, type=click.IntRange(min=1),
              help="Customization seeds per ablation point (mean ± std over them) [default: 3, 1 with --quick].")
@click.option("--ablation", "ablations", multiple=True,
              type=click.Choice(["strategy", "fair-strategy", "subset", "mode", "size", "layers", "forgetting",
                                 "schedule", "concept", "methods"]),
              help="Run only these ablations (repeatable) [default: all but methods, which runs only when named: "
                   "REACT, REAL, Neural Priming, SWAT, WiSE-FT and gate scaling side by side].")
@base_model_options
def study(out, quick, seeds, ablations, base_steps, base_batch, world_variant):
    """The paper's ablations on the mini world, with seeds, mean and spread.

    Strategy table (with trainable parameters), retrieved vs random vs oracle subsets of equal
    size, retrieval mode (t2t/t2i/both), retrieval size, number of gated layers, and forgetting
    (control tasks in every row, gate values per layer, mixing general pairs, fewer steps), and
    the customization schedule chosen on the world's validation sets. The world, base model
    (shared with `react-vl demo` through its cache), KB and retrieval are made once; seeds vary
    the customization. A killed study resumes: finished runs are kept; study.json records
    every run's seconds.
    """
    from .study import StudyConfig, default_ablations, run_study

    config = StudyConfig(world=WorldConfig(variant=world_variant), base_steps=base_steps, base_batch=base_batch)
    run_study(out, quick=quick, config=config, seeds=seeds if seeds is not None else 1 if quick else 3,
              ablations=ablations or default_ablations(quick))


# --- report ------------------------------------------------------------------------------------
@main.command()
@click.argument("demo_dir", type=click.Path(exists=True, file_okay=False))
def report(demo_dir):
    """Write DEMO_DIR/report.html: one self-contained page of a demo folder's results."""
    from .report import write_report

    click.echo(f"wrote {write_report(demo_dir)}")


# --- serve -------------------------------------------------------------------------------------
@main.command()
@click.argument("kb", type=click.Path(exists=True, file_okay=False))
@click.option("--retrieved", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A retrieved set (R/ of `react-vl retrieve`) to show with report cards and curate; repeatable.")
@click.option("--host", default="127.0.0.1", help="Address to listen on; other than localhost, anyone who reaches "
                                                  "it can search and curate (a warning is printed).")
@click.option("--port", default=1234, help="Port to listen on (clip-back's default).")
@click.option("--allow-image-urls", is_flag=True,
              help="Accept image_url queries, which make the server download the URL.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where the memory-mapped metadata copies go [default: KB/serve-cache].")
@click.option("--runs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A training run (RUN/ of `react-vl customize`) or a folder of runs, for lineage: which runs "
                   "were trained on a pair (GET /api/lineage/ID, POST /api/lineage {ids}); repeatable.")
def serve(kb, retrieved, host, port, allow_image_urls, cache_dir, runs):
    """Serve KB over HTTP: clip-retrieval's kNN protocol (its ClipClient and front work against
    it) and a page at http://HOST:PORT/ to search it, view retrieved sets and curate them."""
    from .serve import serve as serve_kb

    serve_kb(kb, list(retrieved), host=host, port=port, allow_image_urls=allow_image_urls, cache_dir=cache_dir,
             runs=list(runs))


if __name__ == "__main__":
    main()
