"""ViCHA trains end to end: concept tokens, hierarchical ITC and MAE beside ALBEF's three terms, on 2 CPU ranks
under ZeRO-3 (bf16, momentum copies of every tower including the concept encoder), from shards built with
``--format vicha``; under ZeRO-0 (fp32, one rank) a resumed run repeats the uninterrupted one's losses: the MAE
masks, the MLM masks and the concept draws all come back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from data_shards.__main__ import main as data_shards_main
from tests.pretrain.conftest import REPO, TINY_MODEL, logged_steps, run_pretrain, write_ds_config, write_experiment

pytestmark = pytest.mark.slow

VICHA_MODEL = dict(TINY_MODEL, concepts={"layers": 2, "max_length": 12, "sample_fraction": 0.3})
VICHA_OBJECTIVES = {"itc": {"queue_size": 64}, "itm": {}, "mlm": {},
                    "hitc": {"weight": 0.1, "image_layers": [1, 2], "text_layers": [1, 2]},
                    "mim": {"decoder_width": 32, "decoder_heads": 2}}
TERMS = ("itc", "itm", "mlm", "hitc", "mim")


@pytest.fixture(scope="module")
def vicha_shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vicha_world")
    assert data_shards_main(["synth", "--out", str(root / "world"), "--num-images", "80", "--seed", "0"]) == 0
    assert data_shards_main(["build", "--input", str(root / "world" / "annotations" / "pretrain_vicha_kwords.json"),
                             "--format", "vicha", "--image-root", str(root / "world" / "images"), "--output",
                             str(root / "shards" / "vicha-%06d.tar"), "--samples-per-shard", "8", "--workers", "1",
                             "--seed", "0"]) == 0
    count = len(list((root / "shards").glob("*.tar")))
    return {"train": str(root / "shards" / f"vicha-{{000000..{count - 1:06d}}}.tar")}


def _experiment(directory, shards, **run):
    path = write_experiment(directory, shards, model=VICHA_MODEL, objectives=VICHA_OBJECTIVES,
                            run={"output_dir": str(directory / "run"), **run})
    path.write_text("method: vicha\n" + path.read_text())
    return path


def test_vicha_trains_under_zero3_with_momentum_concepts_and_exports_every_head(tmp_path, vicha_shards):
    experiment = _experiment(tmp_path, vicha_shards)
    run_pretrain(experiment, write_ds_config(tmp_path, "zero3_bf16.json"), ranks=2, extra=["--max-steps", "2"])
    steps = logged_steps(tmp_path / "run")
    assert sorted(steps) == [1, 2]
    for record in steps.values():
        assert all(torch.isfinite(torch.tensor(record[term])) for term in TERMS)
        weighted = sum(record[term] for term in TERMS) - 0.9 * record["hitc"]
        assert record["loss"] == pytest.approx(weighted, rel=2e-3)  # bf16 terms, summed in bf16
    checkpoints = tmp_path / "run" / "checkpoints"
    task_state = torch.load(checkpoints / "global_step2" / "task_state.pt", weights_only=False)
    assert task_state["method"] == "vicha" and set(task_state["objectives"]) == set(TERMS)
    assert "concept_encoder_m.proj.weight" in task_state["momentum"]
    exported = tmp_path / "vicha.safetensors"
    subprocess.run([sys.executable, "-m", "pretrain.export", str(checkpoints), str(exported)], cwd=REPO, check=True,
                   env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}, capture_output=True)
    weights = load_file(str(exported))
    assert weights["concept_encoder.proj.weight"].shape == (64, 64)
    assert weights["concept_encoder.text.bert.encoder.layer.1.attention.self.query.weight"].shape == (64, 64)
    assert "concept_encoder_m.text.bert.embeddings.word_embeddings.weight" in weights
    assert weights["objectives.hitc.vision_proj_hidden.1.weight"].shape == (32, 64)
    assert weights["objectives.mim.mae_proj.weight"].shape == (16 * 16 * 3, 32)
    assert "objectives.mim.decoder_pos_embed" not in weights  # fixed, not saved


def test_vicha_under_zero0_resumes_to_the_same_losses(tmp_path, vicha_shards):
    experiment = _experiment(tmp_path, vicha_shards, save_every=1)
    ds_config = write_ds_config(tmp_path, "zero0_fp32.json")
    run_pretrain(experiment, ds_config, ranks=1, extra=["--max-steps", "3"])
    uninterrupted = logged_steps(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("global_step2")
    run_pretrain(experiment, ds_config, ranks=1, extra=["--max-steps", "3", "--resume", "auto"])
    resumed = logged_steps(tmp_path / "run")
    assert sorted(resumed) == [1, 2, 3]
    for term in (*TERMS, "loss"):
        assert resumed[3][term] == pytest.approx(uninterrupted[3][term], rel=1e-6, abs=1e-7)
