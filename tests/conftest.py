"""Shared fixtures. `tiny_world` is a small mini world generated once per test session."""

import pytest

from react_vl.world import WorldConfig, generate_world

# Small but with every style in every corpus: 2% of 2,000 pretraining pairs is ~40 sketches.
TINY_WORLD = WorldConfig(seed=0, pretrain_size=2_000, kb_size=4_000, eval_size=80, val_size=80, shard_size=1_000, workers=2)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Path of a generated world (layout in docs/DESIGN.md); its world.json holds the config and counts."""
    out = tmp_path_factory.mktemp("world")
    generate_world(out, TINY_WORLD)
    return out


# --- customization (issue 4) -------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_trained_model(tiny_world, tmp_path_factory):
    """model.pt of mini-vit-test pretrained (strategy full, from random init) on tiny_world's pretrain shards.

    40 steps of batch 64: colour zero-shot well above chance, shape still near it. RUN/summary.json
    beside it.
    """
    from react_vl.train import TrainConfig, train

    run = tmp_path_factory.mktemp("tiny_trained")
    train(TrainConfig(tiny_world / "pretrain", run, model="mini-vit-test", strategy="full", steps=40, batch_size=64,
                      lr=1e-3, warmup=4, log_every=5, checkpoint_every=40, seed=0, workers=1))
    return run / "model.pt"
