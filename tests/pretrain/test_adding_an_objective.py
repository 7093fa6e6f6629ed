"""Adding an objective is one new class plus one config entry: a toy objective defined here trains beside
ALBEF's three on 2 CPU ranks under ZeRO-0 and ZeRO-3, its term logged and its head saved.

``ToyTerm`` owns a head (its own parameters), has options of its own, asks for an intermediate ViT state,
and is listed with ``class_path`` since it is not in ``pretrain.objectives.OBJECTIVES``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from finetune.checkpoints import backbone_state, open_checkpoint
from pretrain.models.encoded import Wants
from pretrain.objectives.base import Needs, Objective
from tests.pretrain.conftest import REPO, logged_steps, run_pretrain, write_ds_config, write_experiment

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class ToyConfig:
    scale: float = 1.0


class ToyTerm(Objective):
    """Predict each image's mean pixel from the [CLS] state after the first ViT block; term ``toy``."""

    Config = ToyConfig
    terms = ("toy",)

    def __init__(self, config: ToyConfig, build):
        super().__init__(config, build)
        self.head = nn.Linear(build.model.visual_encoder.width, 1)

    def needs(self) -> Needs:
        return Needs(wants=Wants(image_layers=frozenset({1})))

    def forward(self, encoded, encoded_m, batch, step):
        prediction = self.head(encoded.image_layers[1][:, 0]).squeeze(-1).float()
        return {"toy": self.config.scale * F.mse_loss(prediction, batch["image"].float().mean(dim=(1, 2, 3)))}


# ZeRO-3 with ALBEF's momentum distillation (export consolidates the partitions into ALBEF's layout); ZeRO-0
# with in-batch ITC and no distillation, so that export and fine-tuning also meet a checkpoint without
# momentum copies or queues.
@pytest.mark.parametrize("ds_config, momentum", [("zero3_bf16.json", True), ("zero0_fp32.json", False)])
def test_a_toy_objective_trains_beside_albefs_three(tmp_path, tiny_shards, ds_config, momentum):
    objectives = {"itc": {"queue_size": 64, "momentum_distillation": momentum}, "itm": {}, "mlm": {},
                  "toy": {"class_path": "tests.pretrain.test_adding_an_objective:ToyTerm", "weight": 0.5,
                          "scale": 2.0}}
    experiment = write_experiment(tmp_path, tiny_shards, objectives=objectives,
                                  distillation={"alpha": 0.4 if momentum else 0.0})
    run_pretrain(experiment, write_ds_config(tmp_path, ds_config), ranks=2, extra=["--max-steps", "3"])
    steps = logged_steps(tmp_path / "run")
    assert sorted(steps) == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "global_step3"
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 3
    for record in steps.values():
        assert all(torch.isfinite(torch.tensor(record[term])) for term in ("loss", "itc", "itm", "mlm", "toy"))
        assert {"itc", "itm", "mlm", "toy"} <= set(record)
        weighted = record["itc"] + record["itm"] + record["mlm"] + 0.5 * record["toy"]
        assert record["loss"] == pytest.approx(weighted, rel=1e-5)

    checkpoints = tmp_path / "run" / "checkpoints"
    task_state = torch.load(checkpoints / "global_step3" / "task_state.pt", weights_only=False)
    assert task_state["method"] == "albef"
    assert task_state["objectives"]["toy"] == {"class": "tests.pretrain.test_adding_an_objective:ToyTerm",
                                               "weight": 0.5, "start_step": 0}
    exported = tmp_path / "exported.safetensors"
    subprocess.run([sys.executable, "-m", "pretrain.export", str(checkpoints), str(exported)], cwd=REPO, check=True,
                   env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}, capture_output=True)
    weights = load_file(str(exported))
    assert weights["objectives.toy.head.weight"].shape == (1, 64)
    # ALBEF's layout, fp32 whatever the engine's precision, consolidated from every rank's partition.
    assert weights["temp"].shape == () and weights["visual_encoder.pos_embed"].dtype == torch.float32
    assert weights["visual_encoder.blocks.0.attn.qkv.weight"].shape == (192, 64)
    assert "text_encoder.bert.encoder.layer.2.crossattention.self.query.weight" in weights
    assert not any(name.startswith("model.") for name in weights)
    assert (tmp_path / "exported.yaml").read_text().startswith("method: albef")
    assert ("text_encoder_m.cls.predictions.transform.dense.weight" in weights) == momentum
    assert ("text_queue" in weights) == momentum
    if momentum:
        assert weights["text_queue"].shape == (32, 64)
    assert bool(task_state["momentum"]) == momentum

    if momentum:  # a checkpoint of the ALBEF-only task that came before (its task state's layout) exports the same
        older = {"step": 3, "momentum": task_state["momentum"], **task_state["objective_state"]["itc"]}
        torch.save(older, checkpoints / "global_step3" / "task_state.pt")
        subprocess.run([sys.executable, "-m", "pretrain.export", str(checkpoints), str(tmp_path / "older.safetensors")],
                       cwd=REPO, check=True, env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)},
                       capture_output=True)
        older_weights = load_file(str(tmp_path / "older.safetensors"))
        assert older_weights.keys() == weights.keys()
        assert all(torch.equal(older_weights[name], weights[name]) for name in weights)

    # Fine-tuning reads this checkpoint, whichever it is: the backbone, without the pretraining-only heads.
    for source in (checkpoints, exported):
        backbone = backbone_state(open_checkpoint(str(source)), num_patches=None)
        assert "itm_head.weight" in backbone and not any(name.startswith("objectives.") for name in backbone)
