"""The `react-vl` command: one subcommand per pipeline stage, each a thin layer over a Python function.

Every command only parses options and calls the stage's function; the work lives in the stage
modules (react_vl.world, .embed, .index, .retrieve, .materialize, .train, .evaluate, .demo).
"""

import sys

import click


def _not_built(stage: str, issue: int):
    click.echo(f"react-vl {stage}: this stage is not built yet (tracked in issue #{issue}).", err=True)
    sys.exit(2)


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
def world():
    """Generate the mini world: pretraining corpus, knowledge base and evaluation tasks as shards."""
    _not_built("world", 2)


# --- tasks -------------------------------------------------------------------------------------
@main.command()
def tasks():
    """List built-in tasks, or show one."""
    _not_built("tasks", 2)


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
@click.option("--caption-column", default="caption", help="Parquet corpora: the caption column.")
@click.option("--image-column", default="image", help="Parquet corpora: column with image bytes or paths.")
@click.option("--key-column", default="key", help="Parquet corpora: the key column (row number if absent).")
def embed(corpus, model_name, pretrained, out, batch_size, workers, dtype, device, caption_column, image_column,
          key_column):
    """Embed an image-text corpus into a clip-retrieval style knowledge base.

    CORPUS: webdataset shards (paths, brace patterns, globs, fsspec URLs), parquet files, or
    folders (of shards, or of images with sidecar .txt captions). Rerun the same command to resume;
    run it under `torchrun --nproc_per_node N` to split the shards between N processes.
    """
    from .data import ParquetColumns
    from .embed import embed_corpus
    summary = embed_corpus(list(corpus), model_name, pretrained, out, batch_size=batch_size, workers=workers,
                           dtype=dtype, device=device,
                           columns=ParquetColumns(caption_column, image_column, key_column))
    if summary:
        click.echo(f"{summary['count']} pairs in {out} ({summary['skipped_total']} skipped; "
                   f"see {out}/embed_summary.json)")


# --- index -------------------------------------------------------------------------------------
@main.command()
def index():
    """Build tuned FAISS indexes (image.index, text.index) over a knowledge base."""
    _not_built("index", 3)


# --- retrieve ----------------------------------------------------------------------------------
@main.command()
def retrieve():
    """Retrieve the knowledge-base pairs most relevant to a task's class-name prompts."""
    _not_built("retrieve", 3)


# --- materialize -------------------------------------------------------------------------------
@main.command()
@click.argument("retrieved", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for shard-NNNNNN.tar and summary.json.")
@click.option("--kb", default=None, type=click.Path(exists=True, file_okay=False),
              help="Knowledge base to take `url` from, for pairs with no local shard (URL corpora).")
@click.option("--maxcount", default=10000, help="Samples per output shard.")
@click.option("--no-download", is_flag=True, help="Only write the img2dataset input and command; do not run it.")
def materialize(retrieved, out, kb, maxcount, no_download):
    """Write retrieved pairs as webdataset shards ready for training.

    RETRIEVED: the retrieve output folder (R/) or its retrieved.parquet.
    """
    from .materialize import materialize as materialize_set
    summary = materialize_set(retrieved, out, kb=kb, maxcount=maxcount, run_img2dataset=not no_download)
    click.echo(f"{summary['count']} pairs in {len(summary['shards'])} shard(s) in {out} "
               f"({summary['missing']['total']} missing; see {out}/summary.json)")
    if summary["url_pairs"]:
        urls = summary["url_pairs"]
        click.echo(f"{urls['count']} pairs to download; img2dataset command:\n  {' '.join(urls['img2dataset_command'])}")


# --- customize ---------------------------------------------------------------------------------
@main.command()
def customize():
    """Customize (or pretrain) a CLIP model on image-text shards."""
    _not_built("customize", 4)


# --- evaluate ----------------------------------------------------------------------------------
@main.command()
def evaluate():
    """Evaluate models on tasks: zero-shot, retrieval, linear probe, side by side."""
    _not_built("evaluate", 5)


# --- demo / study ------------------------------------------------------------------------------
@main.command()
def demo():
    """Run the whole pipeline offline on the mini world and write a report."""
    _not_built("demo", 6)


@main.command()
def study():
    """The paper's ablations on the mini world, with seeds, mean and spread."""
    _not_built("study", 6)


# --- report ------------------------------------------------------------------------------------
@main.command()
@click.argument("demo_dir", type=click.Path(exists=True, file_okay=False))
def report(demo_dir):
    """Write DEMO_DIR/report.html: one self-contained page of a demo folder's results."""
    from .report import write_report

    click.echo(f"wrote {write_report(demo_dir)}")


if __name__ == "__main__":
    main()
