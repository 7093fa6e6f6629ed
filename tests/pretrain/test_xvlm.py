"""The ``xvlm`` method end to end: its recipe and configs, the region batches its stream adapter makes from real
region shards, X-VLM's optimizer groups (lr_mult, its no-decay rule) and linear schedule, and 3-step runs on 2 CPU
ranks under ZeRO-0 and ZeRO-3 whose checkpoints export and hand the box head to fine-tuning.

Run: ``.venv/bin/python -m pytest -q tests/pretrain/test_xvlm.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from data_shards.__main__ import main as data_shards_main
from data_shards.boxes import TransformConfig
from data_shards.loader import StreamingLoader
from finetune import grounding
from finetune.loop import load_weights
from finetune.schema import FinetuneConfig
from pretrain.build import build_backbone, new_parameter_names
from pretrain.config import ConfigError, from_mapping, load_config
from pretrain.engine import lr_schedule
from pretrain.methods import METHODS, resolve_objectives
from pretrain.objectives import OBJECTIVES
from pretrain.schema import ModelConfig, OptimConfig, PretrainConfig
from pretrain.task import parameter_groups
from pretrain.xvlm_recipe import RegionBatch, RegionStreamOptions
from tests.pretrain.conftest import REPO, TINY_MODEL, logged_steps, run_pretrain, write_ds_config, write_experiment

XVLM_OBJECTIVES = ["itc", "itm", "span_mlm", "region_itc", "region_itm", "region_mlm", "box"]


@pytest.fixture(scope="session")
def region_shards(tiny_shards) -> str:
    """The tiny world's X-VLM region file as 4 shards (the world tiny_shards synthesised)."""
    root = Path(tiny_shards["train"]).parents[1]
    output = root / "regions"
    if not output.exists():
        assert data_shards_main(["build", "--input", str(root / "world" / "annotations" / "pretrain_xvlm_regions.json"),
                                 "--format", "xvlm", "--image-root", str(root / "world" / "images"), "--output",
                                 str(output / "regions-%06d.tar"), "--samples-per-shard", "16", "--workers", "1",
                                 "--seed", "0"]) == 0
    count = len(list(output.glob("*.tar")))
    return str(output / f"regions-{{000000..{count - 1:06d}}}.tar")


def xvlm_config(*overrides: str) -> PretrainConfig:
    streams = "data.streams={regions: {train: [{urls: 'r-{0..1}.tar'}]}}"
    return load_config(PretrainConfig, None, ["method=xvlm", streams, *overrides])


def test_the_xvlm_recipe_runs_x_vlms_terms_and_checks_its_stream():
    specs = resolve_objectives(xvlm_config())
    assert [spec.name for spec in specs] == XVLM_OBJECTIVES
    assert specs[0].options.momentum_distillation is False
    assert all(spec.cls is OBJECTIVES[spec.name] for spec in specs)
    stream = METHODS["xvlm"].streams["regions"]
    assert stream.transform == {"region_crop": True, "flip_text": "skip", "randaugment_geometric": False}
    # the shipped configs are valid as they are
    for name in ("xvlm_4m.yaml", "xvlm_clip_vit.yaml", "xvlm_demo.yaml"):
        config = load_config(PretrainConfig, str(REPO / "pretrain" / "configs" / name))
        assert [spec.name for spec in resolve_objectives(config)] == XVLM_OBJECTIVES


def test_the_x_vlm_fine_tuning_and_domain_configs_are_valid():
    import importlib

    domain = load_config(PretrainConfig, str(REPO / "pretrain" / "configs" / "xvlm_grounding_domain.yaml"))
    assert [spec.name for spec in resolve_objectives(domain)] == ["box"]
    assert domain.model.init_checkpoint and domain.data.streams["regions"].probability == 1.0
    configs = sorted((REPO / "finetune" / "configs").glob("*xvlm*.yaml"))
    assert len(configs) == 11
    for path in configs:
        config = load_config(FinetuneConfig, str(path))
        task = importlib.import_module(f"finetune.{config.task}")
        options = dict(config.options)
        if config.task == "vqa":
            options["answer_list"] = "answers.json"  # read when the task is built, not here
        from_mapping(task.SPEC.options, options, "options")
        assert config.model.itm_head == "mlp", path.name
        if "synth" not in path.name:
            assert (config.optim.schedule, config.optim.lr_mult, config.optim.no_decay) == ("linear", 2.0, "xvlm")


@pytest.mark.parametrize("overrides, message", [
    (["data.streams.regions.options={max_region: 3}"],
     r"unknown key data.streams.regions.options.'max_region' in RegionStreamOptions"),
    (["data.streams.regions.options={min_perc_in_image: 1.5}"],
     r"data.streams.regions.options.min_perc_in_image: must lie in \[0, 1\)"),
    (["data.streams={}"], r"data.streams lists none, method 'xvlm' reads \['regions'\]"),
    (["method=albef", "data.streams={}", "objectives.box={}"],
     r"objectives.box reads the data stream\(s\) \['regions'\], which data.streams lacks"),
])
def test_bad_xvlm_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_objectives(xvlm_config(*overrides))


def test_region_batches_from_shards_hold_exactly_their_texts_with_boxes_inside(region_shards):
    model_config = from_mapping(ModelConfig, dict(TINY_MODEL))
    _, tokenizer = build_backbone(model_config)
    options = RegionStreamOptions(texts_per_batch=10, max_regions=3)
    transform = TransformConfig(image_size=32, region_crop=True, flip_text="skip", randaugment_geometric=False)
    loader = StreamingLoader(region_shards, transform, batch_size=4, num_workers=0, mode="resampled",
                             shuffle_buffer=8, seed=0, decoder="pil", postprocess=RegionBatch(tokenizer, options, 30))
    batches = [batch for batch, _ in zip(loader, range(3), strict=False)]
    for batch in batches:
        assert batch["image"].shape == (4, 3, 32, 32)
        assert batch["input_ids"].shape[0] == 10 and batch["attention_mask"].shape == batch["input_ids"].shape
        boxes, index, is_image = batch["boxes"], batch["image_index"], batch["is_image"]
        assert boxes.shape == (10, 4) and index.dtype == torch.long and bool((index < 4).all())
        assert bool((boxes >= 0).all()) and bool((boxes <= 32).all()) and bool((boxes[:, 2:] > boxes[:, :2]).all())
        # image captions (the synthetic records all have one) have the whole image as their box
        assert torch.equal(boxes[is_image], torch.tensor([[0.0, 0.0, 32.0, 32.0]]).expand(int(is_image.sum()), 4))
        # each image contributes at most max_regions texts, and region texts come with their attribute
        assert bool((torch.bincount(index, minlength=4) <= 3).all())
        region_texts = [text for text, image in zip(batch["text"], is_image.tolist(), strict=True) if not image]
        assert all(text.split()[0] in ("small", "large") for text in region_texts)
    assert len({tuple(batch["__key__"]) for batch in batches}) == 3


def test_lr_mult_groups_the_new_parameters_and_x_vlms_rule_skips_their_decay():
    model, _ = build_backbone(from_mapping(ModelConfig, {**TINY_MODEL, "itm_head": "mlp"}))
    text_report = type("Report", (), {"missing": (), "expected_missing": tuple(
        name[len("text_encoder."):] for name, _ in model.named_parameters() if ".crossattention." in name)})()
    new = new_parameter_names(model, {"vision": None, "text": text_report})
    assert "model.temp" in new and "model.itm_head.1.weight" in new and "model.vision_proj.weight" in new
    assert "model.visual_encoder.blocks.0.attn.qkv.weight" in new  # a tower given no weights starts untrained
    assert "model.text_encoder.bert.encoder.layer.2.crossattention.self.query.weight" in new
    assert "model.text_encoder.bert.encoder.layer.0.attention.self.query.weight" not in new

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

    groups = parameter_groups(Holder(), 0.01, rule="xvlm", new=new, new_lr=2e-4)
    assert [(group["weight_decay"], group.get("lr")) for group in groups] == [
        (0.01, None), (0.0, None), (0.01, 2e-4), (0.0, 2e-4)]
    names = {id(p): name for name, p in Holder().named_parameters()}
    grouped = [{names[id(p)] for p in group["params"]} for group in groups]
    assert "model.text_encoder.bert.encoder.layer.0.attention.output.LayerNorm.weight" in grouped[1]
    assert "model.itm_head.1.weight" in grouped[2]           # X-VLM decays its heads' LayerNorm weights
    assert "model.itm_head.0.bias" in grouped[3] and "model.temp" in grouped[2]
    assert "model.text_encoder.bert.embeddings.word_embeddings.weight" in grouped[0]
    assert sum(len(group) for group in grouped) == len(names)
    # ALBEF's grouping is what it was: two groups, 1-D tensors and biases without decay
    albef = parameter_groups(Holder(), 0.02)
    assert len(albef) == 2 and "model.itm_head.1.weight" in {names[id(p)] for p in albef[1]["params"]}


def test_the_linear_schedule_rises_from_zero_and_falls_to_zero_in_every_group():
    parameters = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": parameters[:1]}, {"params": parameters[1:], "lr": 2e-4}], lr=1e-4)
    schedule = lr_schedule(optimizer, OptimConfig(lr=1e-4, schedule="linear", warmup_steps=10), 10, 110)
    rates = []
    for _ in range(111):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    assert rates[0] == [0.0, 0.0]
    assert rates[5] == pytest.approx([0.5e-4, 1e-4]) and rates[10] == pytest.approx([1e-4, 2e-4])
    assert rates[60] == pytest.approx([0.5e-4, 1e-4]) and rates[110] == pytest.approx([0.0, 0.0])


# 3 steps whose region draws (seed 3, probability 0.5: random.Random("streams:3")) are: step 1 yes, 2 yes, 3 no.
REGION_STEPS = {1: True, 2: True, 3: False}


@pytest.mark.parametrize("ds_config", ["zero0_fp32.json", "zero3_bf16.json"])
def test_three_xvlm_steps_on_two_ranks(tmp_path, tiny_shards, region_shards, ds_config):
    import random

    draws = random.Random("streams:3")
    assert {step: draws.random() < 0.5 for step in (1, 2, 3)} == REGION_STEPS
    model = {**TINY_MODEL, "itm_head": "mlp", "local_attn_depth": 1}
    experiment = write_experiment(tmp_path, tiny_shards, model=model, distillation={"alpha": 0.0},
                                  optim={"lr": 1e-3, "warmup_steps": 2, "epochs": 2, "schedule": "linear",
                                         "lr_mult": 2.0, "no_decay": "xvlm"})
    config = yaml.safe_load(experiment.read_text())
    config["method"] = "xvlm"
    config["data"]["streams"] = {"regions": {"train": [{"urls": region_shards}], "probability": 0.5, "batch_size": 2,
                                             "options": {"texts_per_batch": 6, "max_regions": 4}}}
    config["objectives"] = {"itc": {"momentum_distillation": False}, "region_mlm": {"probability": 0.5}}
    experiment.write_text(yaml.safe_dump(config))
    run_pretrain(experiment, write_ds_config(tmp_path, ds_config), ranks=2, extra=["--max-steps", "3"])
    steps = logged_steps(tmp_path / "run")
    assert sorted(steps) == [1, 2, 3]
    region_terms = {"region_itc", "region_itm", "region_mlm", "box_l1", "box_giou"}
    for step, record in steps.items():
        terms = {"itc", "itm", "mlm"} | (region_terms if REGION_STEPS[step] else set())
        assert terms == set(record) & ({"itc", "itm", "mlm"} | region_terms)
        assert all(torch.isfinite(torch.tensor(record[term])) for term in terms)
        assert record["loss"] == pytest.approx(sum(record[term] for term in terms), rel=1e-4)
    # The tiny model loads no unimodal weights, so every parameter is new and trains at lr x lr_mult (2e-3); the
    # logged lr is that group's: the linear warm-up over 2 steps ends step 1 at half, step 2 at the peak, and
    # step 3 starts the fall to 0 at the schedule's 16th step (2 epochs of 64 samples, 2 ranks x micro-batch 4).
    assert [steps[step]["lr"] for step in (1, 2, 3)] == pytest.approx([1e-3, 2e-3, 2e-3 * 13 / 14])

    checkpoints = tmp_path / "run" / "checkpoints"
    task_state = torch.load(checkpoints / "global_step3" / "task_state.pt", weights_only=False)
    assert task_state["method"] == "xvlm" and task_state["momentum"] == {}
    exported = tmp_path / "xvlm.safetensors"
    subprocess.run([sys.executable, "-m", "pretrain.export", str(checkpoints), str(exported)], cwd=REPO, check=True,
                   env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}, capture_output=True)
    weights = load_file(str(exported))
    assert weights["objectives.box.head.layers.0.weight"].shape == (128, 64)
    assert weights["itm_head.3.weight"].shape == (2, 128) and "image_queue" not in weights

    # box grounding starts from the pretrained box head (the checkpoint directory or the exported file)
    finetune_config = load_config(FinetuneConfig, str(REPO / "finetune" / "configs" / "grounding_box_xvlm_synth.yaml"),
                                  [f"model={json.dumps(model)}"])
    options = from_mapping(grounding.Options, finetune_config.options, "options")
    for source in (checkpoints, exported):
        backbone, tokenizer = build_backbone(finetune_config.model)
        task = grounding.build_task(backbone, tokenizer, options)
        load_weights(task, grounding.SPEC, finetune_config, str(source), type("Log", (), {"note": print})())
        for index in (0, 1, 3):
            pretrained = weights[f"objectives.box.head.layers.{index}.weight"]
            assert torch.equal(task.box_head.layers[index].weight, pretrained)
