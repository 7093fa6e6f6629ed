"""PEVL pretraining on 2 CPU ranks: the first stage (ITC + ITM + generalised MLM with the soft loss) under ZeRO-3
bf16 with momentum distillation on the grounding shards, and the second stage (ITC + ITM + soft loss with every
position token masked) under ZeRO-0 on referring-expression shards; the recipe's defaults and its configs.

    .venv/bin/python -m pytest -q tests/pretrain/test_pevl.py
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from data_shards.__main__ import main as data_shards_main
from pretrain.config import load_config
from pretrain.methods import resolve_objectives
from pretrain.objectives.position import PositionMLM
from pretrain.schema import PretrainConfig
from tests.pretrain.conftest import REPO, logged_steps, run_pretrain, write_ds_config, write_experiment


@pytest.fixture(scope="module")
def pevl_shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pevl_world")
    assert data_shards_main(["synth", "--out", str(root / "world"), "--num-images", "60", "--seed", "0"]) == 0
    annotations, images = root / "world" / "annotations", str(root / "world" / "images")
    urls = {}
    for name, fmt in (("pretrain_pevl_grounding", "pevl"), ("refcoco_train", "refcoco")):
        assert data_shards_main(["build", "--input", str(annotations / f"{name}.json"), "--format", fmt,
                                 "--image-root", images, "--output", str(root / name / f"{name}-%06d.tar"),
                                 "--samples-per-shard", "8", "--workers", "1", "--seed", "0"]) == 0
        count = len(list((root / name).glob("*.tar")))
        urls[name] = str(root / name / f"{name}-{{000000..{count - 1:06d}}}.tar")
    return urls


def test_the_recipe_and_its_configs_resolve():
    for name in ("pevl.yaml", "pevl_second_stage.yaml", "pevl_demo.yaml"):
        config = load_config(PretrainConfig, str(REPO / "pretrain" / "configs" / name), [])
        specs = {spec.name: spec for spec in resolve_objectives(config)}
        assert config.method == "pevl" and set(specs) == {"itc", "itm", "position_mlm"}
        assert specs["position_mlm"].cls is PositionMLM
    second = load_config(PretrainConfig, str(REPO / "pretrain" / "configs" / "pevl_second_stage.yaml"), [])
    options = {spec.name: spec for spec in resolve_objectives(second)}["position_mlm"].options
    assert (options.masking, options.mlm, options.probability) == ("all", False, 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("stage, ds_config", [("first", "zero3_bf16.json"), ("second", "zero0_fp32.json")])
def test_pevl_trains_on_two_ranks(tmp_path, pevl_shards, stage, ds_config):
    model = {"max_text_length": 48}
    if stage == "first":
        shards = {"train": pevl_shards["pretrain_pevl_grounding"]}
        objectives = {"itc": {"queue_size": 64}, "itm": {}, "position_mlm": {"probability": 0.15}}
        terms = ("itc", "itm", "mlm", "soft")
    else:
        shards = {"train": pevl_shards["refcoco_train"]}
        objectives = {"itc": {"queue_size": 64}, "itm": {},
                      "position_mlm": {"masking": "all", "mlm": False, "probability": 0.0, "decay": 0.25}}
        terms = ("itc", "itm", "soft")
    experiment = write_experiment(tmp_path, shards, model=model, objectives=objectives)
    config = yaml.safe_load(experiment.read_text())
    del config["objectives"]["mlm"]  # the pevl recipe runs position_mlm instead of ALBEF's mlm
    experiment.write_text(yaml.safe_dump({**config, "method": "pevl"}))
    run_pretrain(experiment, write_ds_config(tmp_path, ds_config), ranks=2, extra=["--max-steps", "2"])
    steps = logged_steps(tmp_path / "run")
    assert sorted(steps) == [1, 2]
    for record in steps.values():
        assert set(terms) <= set(record) and ("mlm" in record) == (stage == "first")
        assert all(math.isfinite(record[term]) for term in terms)
        assert record["loss"] == pytest.approx(sum(record[term] for term in terms), rel=1e-5)
        # Untrained, every bin is about equally likely: the soft loss (x2) is near 2 log(vocabulary).
        assert 0.5 * 2 * math.log(30522) < record["soft"] < 1.5 * 2 * math.log(30522)
    task_state = torch.load(tmp_path / "run" / "checkpoints" / "global_step2" / "task_state.pt", weights_only=False)
    assert task_state["method"] == "pevl" and set(task_state["objectives"]) == {"itc", "itm", "position_mlm"}
    keys = (tmp_path / "run" / "logs" / "keys_rank000.jsonl").read_text()
    assert keys  # the batches came from the shards of this stage
