"""Two CPU processes (gloo, `ddp` strategy) through the real CLI: the MAE smoke recipe started by
Lightning's launcher, the DINO smoke recipe by `torchrun --standalone --nproc_per_node 2 -m ssl_vit`,
and the DINO smoke recipe as two "nodes" of one process each on this machine (two `torchrun --nnodes 2`
agents meeting through a c10d rendezvous on 127.0.0.1, `--trainer.num_nodes 2`).

Every sample's ``.cls`` label is its own index, so the labels a rank reads name the samples it read.
A recording callback (``tests/dist_callbacks.py``, imported by the ranks through ``PYTHONPATH``)
writes per rank: the labels of each batch, the DINO centre after each step, the parameters at the
start and the end, and every file the process opened for writing. Each run is 2 epochs of 2 steps.
"""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import List, NamedTuple

import pytest
import torch
from dist_helpers import ROOT, Shards, clean_env, free_port, torchrun, write_indexed_shards

from ssl_vit.data.pipeline import ShardStream
from ssl_vit.data.shard_info import load_shard_info

pytestmark = pytest.mark.slow  # processes, CLI training or end-to-end chains: `make test` only

NUM_SAMPLES, SHARD_SIZE, BATCH, WORLD, EPOCHS = 13, 5, 4, 2, 2  # 13 samples: 3 are read twice per epoch
TIMEOUT = 300


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Shards:
    """13 samples (label = index) in shards of 5, 5 and 3."""
    return write_indexed_shards(tmp_path_factory.mktemp("dist_data"), NUM_SAMPLES, SHARD_SIZE)


def fit_args(recipe: str, shards: Shards, run: Path, record: Path, nodes: int = 1) -> List[str]:
    """``fit`` arguments: the smoke recipe on 2 CPU devices (on one node, or one on each of ``nodes``),
    a CSV logger, the recorder."""
    recorder = {"class_path": "dist_callbacks.Recorder", "init_args": {"folder": str(record)}}
    logger = {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(run)}}
    return [
        "fit", "--config", str(ROOT / "ssl_vit" / "recipes" / "smoke" / recipe), "--data.train", shards.pattern,
        "--trainer.devices", str(WORLD // nodes), "--trainer.num_nodes", str(nodes), "--trainer.strategy", "ddp", "--trainer.max_epochs", str(EPOCHS),
        "--trainer.default_root_dir", str(run), "--trainer.log_every_n_steps", "1",
        "--trainer.logger", json.dumps(logger), f"--trainer.callbacks+={json.dumps(recorder)}",
    ]


def launch(command: List[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def launch_nodes(commands: List[List[str]]) -> None:
    """Start every command (one per node) at once; wait for all, and fail with their output."""
    processes = [subprocess.Popen(c, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for c in commands]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    for command, process, output in zip(commands, processes, outputs):
        assert process.returncode == 0, f"{' '.join(command)}\n{output[-6000:]}"


def load_records(record: Path) -> List[dict]:
    records = [torch.load(record / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [r["rank"] for r in records] == list(range(WORLD)) and all(r["world_size"] == WORLD for r in records)
    assert records[0]["pid"] != records[1]["pid"]
    return records


def expected_labels(shards: Shards, rank: int, epoch: int) -> List[int]:
    """The labels ``rank`` must read in ``epoch``: the layout the stream documents (its shard order and
    reader range), resolved to labels with the labels read from the tars."""
    stream = ShardStream(load_shard_info(shards.pattern), None, BATCH, train=True, rank=rank, world_size=WORLD, num_workers=0)
    stream.set_epoch(epoch)
    sequence = [label for index in stream.shard_order() for label in shards.labels[index]]
    start, count = stream.reader_range(0)
    return sorted(sequence[(start + i) % NUM_SAMPLES] for i in range(count))


def check_data(records: List[dict], shards: Shards) -> None:
    """Ranks read disjoint samples that cover the data, up to the documented padding, every epoch."""
    quota = -(-NUM_SAMPLES // (WORLD * BATCH)) * BATCH  # samples per rank per epoch: 8
    padding = WORLD * quota - NUM_SAMPLES  # read twice: 3
    for epoch in range(EPOCHS):
        seen = []
        for rank, record in enumerate(records):
            batches = [b["labels"] for b in record["batches"] if b["epoch"] == epoch]
            assert [len(b) for b in batches] == [BATCH] * (quota // BATCH)  # whole batches, same count
            labels = sorted(sum(batches, []))
            assert len(set(labels)) == quota  # no sample twice within a rank
            assert labels == expected_labels(shards, rank, epoch)
            seen.append(set(labels))
        assert set.union(*seen) == set(range(NUM_SAMPLES))
        assert len(seen[0] & seen[1]) == padding
    # the shard order is reshuffled per epoch: the ranks' shares differ between the epochs
    assert {tuple(b["labels"]) for b in records[0]["batches"][:2]} != {tuple(b["labels"]) for b in records[0]["batches"][2:]}


def check_parameters(records: List[dict]) -> None:
    """Same parameters on every rank after training, and training changed them."""
    steps = EPOCHS * (-(-NUM_SAMPLES // (WORLD * BATCH)))
    assert all(r["end_step"] == steps and len(r["batches"]) == steps for r in records)
    start, end0, end1 = records[0]["params_start"], records[0]["params_end"], records[1]["params_end"]
    assert end0.keys() == end1.keys() == start.keys() and len(end0) > 10
    for key in end0:
        assert torch.equal(end0[key], end1[key]), f"{key} differs between the ranks"
    changed = [k for k in end0 if end0[k].is_floating_point() and not torch.equal(end0[k], start[k])]
    assert len(changed) > len(end0) // 2, "training did not change the parameters"


def check_single_writer(records: List[dict], run: Path, images: int) -> None:
    """Rank 1 writes nothing under the run directory; rank 0 writes one checkpoint, one config.yaml,
    one metrics.csv and each reconstruction picture once."""
    def under_run(paths: List[str]) -> List[str]:
        return [os.path.relpath(p, run) for p in paths if Path(p).is_relative_to(run)]

    for rank, record in enumerate(records):  # the audit hook saw the recorder's own marker file
        assert any(Path(p).name == f"started_rank{rank}" for p in record["written"])
    assert under_run(records[1]["written"]) == []
    written = Counter(under_run(records[0]["written"]))
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert all(f in written for f in files), (files, written)
    names = Counter(Path(f).name for f in files)
    assert sum(n for f, n in names.items() if f.endswith(".ckpt")) == 1, files
    assert names["config.yaml"] == 1 and names["metrics.csv"] == 1, files
    pictures = sorted(f for f in files if f.endswith(".png"))
    assert [Path(f).name for f in pictures] == [f"epoch_{e:03d}.png" for e in range(images)]
    assert all(written[f] == 1 for f in pictures)
    metrics = (run / next(f for f in files if f.endswith("metrics.csv"))).read_text().splitlines()
    assert metrics[0].count("train/loss") >= 1 and len(metrics) > 1


class Run(NamedTuple):
    recipe: str
    records: List[dict]
    run: Path


def launch_run(launcher: str, recipe: str, shards: Shards, tmp: Path) -> Run:
    """One 2-process run of a smoke recipe. ``launcher``: ``"lightning"`` (the `ddp` strategy's launcher
    re-executes the command for rank 1) or ``"torchrun"`` (``torchrun --standalone``: Lightning
    detects torchelastic and starts no process)."""
    run, record = tmp / "run", tmp / "record"
    args = fit_args(recipe, shards, run, record, nodes=WORLD if launcher == "nodes" else 1)
    if launcher == "nodes":
        endpoint = f"127.0.0.1:{free_port()}"
        launch_nodes([
            [*torchrun(), "--nnodes", str(WORLD), "--node_rank", str(node), "--nproc_per_node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "ssl_vit_nodes",
             "--rdzv-conf", f"is_host={int(node == 0)}", "-m", "ssl_vit", *args]
            for node in range(WORLD)
        ])
    elif launcher == "torchrun":
        launch([*torchrun(), "--standalone", "--nproc_per_node", str(WORLD), "-m", "ssl_vit", *args])
    else:
        launch([sys.executable, "-m", "ssl_vit", *args])
    records = load_records(record)
    environment = {"lightning": "LightningEnvironment", "torchrun": "TorchElasticEnvironment",
                   "nodes": "TorchElasticEnvironment"}[launcher]
    assert {r["environment"] for r in records} == {environment}
    return Run(recipe, records, run)


# Each launcher runs one recipe (the launch is independent of the recipe; two runs keep the file short).
@pytest.fixture(scope="module")
def mae_run(shards, tmp_path_factory) -> Run:
    return launch_run("lightning", "mae.yaml", shards, tmp_path_factory.mktemp("mae_ddp"))


@pytest.fixture(scope="module")
def dino_run(shards, tmp_path_factory) -> Run:
    return launch_run("torchrun", "dino.yaml", shards, tmp_path_factory.mktemp("dino_torchrun"))


@pytest.fixture(scope="module")
def nodes_run(shards, tmp_path_factory) -> Run:
    return launch_run("nodes", "dino.yaml", shards, tmp_path_factory.mktemp("dino_nodes"))


@pytest.fixture(params=["mae_run", "dino_run", "nodes_run"])
def ddp_run(request) -> Run:
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["dino_run", "nodes_run"])
def any_dino_run(request) -> Run:
    return request.getfixturevalue(request.param)


def test_ranks_read_disjoint_samples_that_cover_the_data(ddp_run, shards):
    check_data(ddp_run.records, shards)


def test_parameters_are_identical_on_both_ranks(ddp_run):
    check_parameters(ddp_run.records)


def test_rank_zero_alone_writes_checkpoints_and_logs(ddp_run):
    check_single_writer(ddp_run.records, ddp_run.run, images=EPOCHS if ddp_run.recipe == "mae.yaml" else 0)


def test_dino_centre_is_identical_on_both_ranks_after_every_step(any_dino_run):
    records = any_dino_run.records
    centres = [torch.stack(r["centres"]) for r in records]  # [steps, 1, K] per rank
    assert centres[0].shape[0] == len(records[0]["batches"]) == EPOCHS * 2
    assert torch.equal(centres[0], centres[1])  # bit-identical after every step
    assert (centres[0][1:] - centres[0][:-1]).abs().amax(dim=(1, 2)).min() > 0  # it moves every step
    # the ranks' teacher inputs differ, so a centre that was not averaged would differ
    assert all(a["labels"] != b["labels"] for a, b in zip(records[0]["batches"], records[1]["batches"]))


def test_ranks_draw_different_random_numbers(mae_run):
    """seed_everything seeds every rank alike; ScheduledModule.on_fit_start gives each its own stream
    (MAE masks, drop path), as the reference MAE's seed + rank."""
    rngs = [[b["rng"] for b in r["batches"]] for r in mae_run.records]
    assert all(a != b for a, b in zip(*rngs))
