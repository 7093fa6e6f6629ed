"""Fixtures for fine-tuning tests: a tiny synthetic world with every task's splits in shards, a tiny
pretrained-layout checkpoint (random weights, ALBEF key layout, exported as safetensors), and helpers
that write a task config and run an entry point in-process or under the ``deepspeed`` launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from data_shards.__main__ import main as data_shards_main
from pretrain.config import resolve_path
from pretrain.models.albef import build_albef, to_albef_state_dict
from tests.pretrain.conftest import TINY_MODEL, free_port

REPO = Path(__file__).resolve().parents[2]

# split name -> (annotation file stem, build format, extra build arguments)
SPLITS = {
    "retrieval_train": ("retrieval_train", "coco"), "retrieval_test": ("retrieval_test", "coco"),
    "vqa_train": ("vqa_train", "vqa"), "vqa_test": ("vqa_test", "vqa"),
    "nlvr2_train": ("nlvr2_train", "nlvr2"), "nlvr2_test": ("nlvr2_test", "nlvr2"),
    "ve_train": ("ve_train", "ve"), "ve_test": ("ve_test", "ve"),
    "refcoco_train": ("refcoco_train", "refcoco"), "refcoco_test": ("refcoco_test", "refcoco"),
    "caption_train": ("caption_train", "caption"), "caption_test": ("caption_test", "caption"),
}


@pytest.fixture(scope="session")
def finetune_world(tmp_path_factory) -> dict:
    """60 synthetic images; every task split as shards (4 shards for train splits, 1 for test splits).

    Returns ``{split: url pattern, "annotations": folder of the source annotation files}``.
    """
    root = tmp_path_factory.mktemp("finetune_world")
    assert data_shards_main(["synth", "--out", str(root / "world"), "--num-images", "60", "--seed", "0"]) == 0
    annotations, images = root / "world" / "annotations", str(root / "world" / "images")
    urls = {"annotations": str(annotations)}
    for split, (stem, fmt) in SPLITS.items():
        records = len(json.loads((annotations / f"{stem}.json").read_text()))
        per_shard = max(1, -(-records // 4)) if split.endswith("train") else max(records, 1)
        extra = ["--detections", str(annotations / "refcoco_dets.json")] if fmt == "refcoco" else []
        code = data_shards_main(["build", "--input", str(annotations / f"{stem}.json"), "--format", fmt,
                                 "--image-root", images, "--output", str(root / split / f"{split}-%06d.tar"),
                                 "--samples-per-shard", str(per_shard), "--workers", "1", "--seed", "0", *extra])
        assert code == 0, split
        count = len(list((root / split).glob("*.tar")))
        urls[split] = str(root / split / f"{split}-{{000000..{count - 1:06d}}}.tar")
    return urls


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A pretraining checkpoint of the tiny test model in the exported (ALBEF) layout, random weights."""
    torch.manual_seed(0)
    model = build_albef(TINY_MODEL["vision"], TINY_MODEL["image_size"], resolve_path(TINY_MODEL["bert_dir"]),
                        TINY_MODEL["fusion_layer"], embed_dim=TINY_MODEL["embed_dim"],
                        vision_overrides=TINY_MODEL["vision_overrides"], text_overrides=TINY_MODEL["text_overrides"])
    state = to_albef_state_dict(model.state_dict())
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"
    save_file({name: tensor.detach().clone().contiguous() for name, tensor in state.items()}, str(path))
    return str(path)


def write_finetune_config(directory: Path, task: str, data: dict, options: dict | None = None, **sections) -> Path:
    """A tiny config for ``task``: the test model, 1 epoch of 16 samples, evaluation batch 8."""
    config = {
        "task": task,
        "model": dict(TINY_MODEL),
        "data": {"num_workers": 0, "shuffle_buffer": 8, "train_samples": 16, "randaugment": False, **data},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "epochs": 1},
        "options": options or {},
        "run": {"output_dir": str(directory / "run"), "seed": 0, "log_every": 1, "eval_batch_size": 8},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_micro_batch_config(directory: Path, micro_batch: int = 4, name: str = "zero0_fp32.json") -> Path:
    config = json.loads((REPO / "ds_configs" / name).read_text())
    config["train_micro_batch_size_per_gpu"] = micro_batch
    path = directory / f"ds_{micro_batch}_{name}"
    path.write_text(json.dumps(config))
    return path


def run_finetune(task: str, config: Path, checkpoint: str, ds_config: Path, *, ranks: int = 1,
                 extra: list[str] = (), timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m finetune.<task>`` as a subprocess: one plain process (ranks=1) or ``deepspeed --num_gpus``."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    arguments = ["--config", str(config), "--checkpoint", checkpoint, "--deepspeed_config", str(ds_config), *extra]
    if ranks == 1:
        command = [sys.executable, "-m", f"finetune.{task}", *arguments]
    else:
        command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
                   str(free_port()), "--module", f"finetune.{task}", *arguments]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"finetune.{task} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


def read_results(config: Path) -> dict:
    output_dir = yaml.safe_load(config.read_text())["run"]["output_dir"]
    return json.loads((Path(output_dir) / "results.json").read_text())
