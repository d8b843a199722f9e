"""The SLURM path as two nodes on this machine: two torchrun agents (``--nnodes 2 --node_rank
0|1``), rendezvous on 127.0.0.1, two processes each. Four ranks must form one process group,
take disjoint shares that cover everything, and give what one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import free_port
from taxoclip.data.captions import build_captions
from taxoclip.data.features import load_features
from taxoclip.data.shards import ShardOptions, write_shards
from taxoclip.data.sources import load_source
from taxoclip.models.extraction import extract_features
from taxoclip.train.log import load_history

TOWER = "timm:test_efficientnet"


def two_nodes(*arguments: str, nodes: int = 2, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """``taxoclip ARGUMENTS`` under two torchrun agents, as `scripts/slurm` starts one per node."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = []
    for node in range(2):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(nodes),
            "--node_rank",
            str(node if nodes == 2 else 0),
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port if nodes == 2 else free_port()),
            "-m",
            "taxoclip",
            *arguments,
        ]
        agents.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for agent in agents:
        out, err = agent.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(agent.args, agent.returncode, out, err))
    for result in done:
        assert result.returncode == 0, result.stderr[-3000:]
    return done


def test_features_on_two_nodes_form_one_group_of_four(image_folder, tmp_path):
    dataset = load_source(image_folder)
    shards = tmp_path / "shards"
    write_shards(dataset, shards, build_captions(dataset.classes), ShardOptions(max_count=4, progress=False))
    single = extract_features(shards, TOWER, tmp_path / "one", pretrained=False, workers=0, progress=False)
    two_nodes(
        "features",
        str(shards),
        "--tower",
        TOWER,
        "--random-weights",
        "-o",
        str(tmp_path / "four"),
        "--workers",
        "0",
        "-q",
    )
    four = load_features(tmp_path / "four")
    # Four ranks, each with its own units, none twice, all covered ...
    shares = four.meta["ranks"]
    assert [share["rank"] for share in shares] == [0, 1, 2, 3]
    units = sorted(u.removesuffix(".tar") for u in (p.name for p in shards.glob("*.tar")))
    taken = [u for share in shares for u in share["units"]]
    assert all(share["units"] for share in shares)
    assert sorted(taken) == units and len(set(taken)) == len(taken)
    # ... and the same cache as one process.
    assert four.keys == single.keys and np.array_equal(four.labels, single.labels)
    assert np.allclose(np.asarray(four.features, np.float32), np.asarray(single.features, np.float32), atol=1e-2)


def test_lit_on_two_nodes_matches_one_process(colour_features, tiny_text_tower, tmp_path):
    arguments = [
        "train",
        "lit",
        "--features",
        str(colour_features),
        "--text-tower",
        tiny_text_tower,
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--warmup",
        "2",
        "--lr",
        "3e-3",
        "--text-lr",
        "1e-3",
        "-q",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "taxoclip", *arguments, "-o", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    agents = two_nodes(*arguments, "-o", str(tmp_path / "four"))
    # One group of four: 96 photos, 3 global batches of 32 an epoch, 8 photos a rank a step ...
    assert [row["samples_by_rank"] for row in load_history(tmp_path / "four")] == [[24, 24, 24, 24]] * 2
    assert json.loads((tmp_path / "four" / "config.json").read_text())["training"]["world_size"] == 4
    # ... only the first node's rank 0 wrote ...
    assert sum(a.stdout.count("model, metrics.csv and plots in") for a in agents) == 1
    # ... and the weights are one process's on the same global batches.
    one, four = (load_file(str(Path(tmp_path / d / "model.safetensors"))) for d in ("one", "four"))
    for key in one:
        assert torch.allclose(one[key], four[key], atol=1e-4, rtol=1e-3), key
