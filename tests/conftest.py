"""Shared fixtures: a small mini world generated once per test session (`tiny_world`, and its
config), a model pretrained on it, a webdataset shard writer, a free port for torchrun and
headless Chromium for the page tests.
Test modules take these as fixtures rather than importing from each other."""

import shutil
import socket
from pathlib import Path

import pytest
import webdataset as wds

from react_vl.world import WorldConfig, generate_world

# Small but with every style in every corpus: 2% of 2,000 pretraining pairs is ~40 sketches. Its
# pretraining mix is its own, so the tests' 80-step model does not move when the demo's world does.
TINY_WORLD = WorldConfig(seed=0, pretrain_size=2_000, kb_size=4_000, eval_size=80, val_size=80, shard_size=1_000,
                         pretrain_styles={"photo": 0.94, "sketch": 0.02, "night": 0.02, "pixel": 0.02}, workers=2)


@pytest.fixture(scope="session")
def tiny_world_config() -> WorldConfig:
    """The config of `tiny_world`: a demo or study given it over a copy of that folder reuses its shards."""
    return TINY_WORLD


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, tiny_world_config):
    """Path of a generated world (layout in docs/DESIGN.md); its world.json holds the config and counts."""
    out = tmp_path_factory.mktemp("world")
    generate_world(out, tiny_world_config)
    return out


def _write_shards(folder: Path, samples: list[dict], shards: int = 1, prefix: str = "shard",
                  first: int = 0) -> list[Path]:
    """`samples` (dicts of __key__ and member name -> bytes or str) as webdataset shards
    folder/PREFIX-NNNNNN.tar, numbered from `first`, dealt round-robin: sample i in shard i % shards."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}-{first + i:06d}.tar" for i in range(shards)]
    writers = [wds.TarWriter(str(path)) for path in paths]
    for i, sample in enumerate(samples):
        writers[i % shards].write(sample)
    for writer in writers:
        writer.close()
    return paths


@pytest.fixture(scope="session")
def write_shards():
    """The one shard writer of the tests: write_shards(folder, samples, shards=1, prefix="shard", first=0)."""
    return _write_shards


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a headless Chromium for the page tests (report, serve); they skip without one."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("headless Chromium not installed (apt-get install -y chromium; .ci/run installs it)")
    return path


@pytest.fixture
def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now, for torchrun's --master_port (never a fixed one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- customization (issue 4) -------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_trained_model(tiny_world, tmp_path_factory):
    """model.pt of mini-vit-test pretrained (strategy full, from random init) on tiny_world's pretrain shards.

    80 steps of batch 64: well above chance on colours and on night retrieval (test_retrieve). RUN/summary.json
    beside it.
    """
    from react_vl.train import TrainConfig, train

    run = tmp_path_factory.mktemp("tiny_trained")
    train(TrainConfig(tiny_world / "pretrain", run, model="mini-vit-test", strategy="full", steps=80, batch_size=64,
                      lr=1e-3, warmup=4, log_every=5, checkpoint_every=80, seed=0, workers=1))
    return run / "model.pt"
