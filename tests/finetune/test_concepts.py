"""Every fine-tuning task reads visual concepts (ViCHA) when the backbone has a concept encoder: the loop's batch
adapter adds each image's concept tokens (NLVR2: one list per image), and each task's forward and prediction
feed them to the image tower; a checkpoint and a config that disagree on concepts, or data without them, fail
with a message saying what to do.

Run: ``.venv/bin/python -m pytest -q tests/finetune/test_concepts.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from data_shards.__main__ import main as data_shards_main
from data_shards.boxes import TransformConfig
from data_shards.reader import ShardReader
from data_shards.transforms import PilTransform, collate
from finetune import captioning, grounding, nlvr2, retrieval, ve, vqa
from finetune.checkpoints import CheckpointError, check_concepts
from finetune.loop import EvalContext, task_adapter
from finetune.schema import FinetuneConfig
from pretrain.config import from_mapping
from tests.pretrain.vicha_helpers import tiny_backbone, tiny_model_config

TASKS = {  # task module, annotation file, build format, options
    "retrieval": (retrieval, "retrieval_train", "coco", {}),
    "vqa": (vqa, "vqa_train", "vqa", {"answer_list": "ANSWERS"}),
    "nlvr2": (nlvr2, "nlvr2_train", "nlvr2", {}),
    "ve": (ve, "ve_train", "ve", {}),
    "grounding": (grounding, "refcoco_train", "refcoco", {}),
    "grounding_box": (grounding, "refcoco_train", "refcoco", {"mode": "box"}),
    "captioning": (captioning, "caption_train", "caption", {}),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_concepts")
    assert data_shards_main(["synth", "--out", str(root / "world"), "--num-images", "20", "--seed", "2"]) == 0
    annotations = root / "world" / "annotations"
    for name in {entry[1] for entry in TASKS.values()} | {"retrieval_val"}:
        records = json.loads((annotations / f"{name}.json").read_text())
        for index, record in enumerate(records):
            if "images" in record:
                record["kwords1"], record["kwords2"] = ["circle", "red"], ["square", "blue", f"w{index}"]
            else:
                record["kwords"] = ["triangle", "green", f"w{index}"]
        (root / f"{name}.json").write_text(json.dumps(records))
    return root


def _shards(world, name, fmt):
    output = world / "shards" / name
    if not output.exists():
        extra = ["--detections", str(world / "world" / "annotations" / "refcoco_dets.json")] if fmt == "refcoco" else []
        assert data_shards_main(["build", "--input", str(world / f"{name}.json"), "--format", fmt, "--image-root",
                                 str(world / "world" / "images"), "--output", str(output / "s-%06d.tar"),
                                 "--samples-per-shard", "200", "--workers", "1", *extra]) == 0
    return str(output / "s-000000.tar")


def _config(concept_layers=2):
    model = tiny_model_config(depth=2, text_layers=2, concept_layers=concept_layers, image_size=32)
    return FinetuneConfig(task="retrieval", model=model)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_trains_and_predicts_with_each_images_concepts(world, task):
    module, name, fmt, options = TASKS[task]
    options = {key: str(world / "world" / "annotations" / "vqa_answer_list.json") if value == "ANSWERS" else value
               for key, value in options.items()}
    spec = module.SPEC
    options = from_mapping(spec.options, options, "options")
    model, tokenizer = tiny_backbone(depth=2, text_layers=2, concept_layers=2)
    task_module = spec.build(model, tokenizer, options).train()
    render = PilTransform(TransformConfig(image_size=32, train=False, **(spec.transform or {})))
    samples = [render(sample) for sample, _ in zip(ShardReader(_shards(world, name, fmt), rank=0, world_size=1,
                                                               shard_shuffle=False), range(4), strict=False)]
    batch = task_adapter(spec, tokenizer, options, True, _config())(collate(samples))
    rows = 2 * len(samples) if fmt == "nlvr2" else len(samples)
    assert batch["concept_ids"].shape[0] == rows

    calls = []
    original = model.concept_encoder.forward
    model.concept_encoder.forward = lambda *args: calls.append(args[0].shape[0]) or original(*args)
    losses = task_module(batch)
    assert torch.isfinite(losses["loss"]) and calls and calls[0] == rows
    losses["loss"].backward()
    assert model.concept_encoder.proj.weight.grad is not None
    if hasattr(task_module, "predict"):
        task_module.eval()
        eval_batch = task_adapter(spec, tokenizer, options, False, _config())(collate(samples))
        with torch.no_grad() if task != "grounding" else torch.enable_grad():
            assert len(task_module.predict(eval_batch)) == len(samples)


def test_retrieval_evaluation_gives_each_image_all_its_concepts(world):
    model, tokenizer = tiny_backbone(depth=2, text_layers=2, concept_layers=2)
    spec, options = retrieval.SPEC, retrieval.Options(k_test=2)
    module = spec.build(model, tokenizer, options)
    seen = []
    original = model.concept_encoder.forward
    model.concept_encoder.forward = lambda ids, mask: seen.append(ids) or original(ids, mask)
    context = EvalContext(module=module, urls=_shards(world, "retrieval_val", "coco"), split="val", options=options,
                          tokenizer=tokenizer, image_size=32, batch_size=8,
                          adapter=task_adapter(spec, tokenizer, options, False, _config()), transform={})
    metrics = retrieval.evaluate(context)
    assert 0 <= metrics["r_mean"] <= 100
    first = tokenizer(["triangle green w0"])["input_ids"][0]
    assert torch.equal(seen[0][0, :len(first)], first)            # every concept, in order, no draw


def test_concept_mismatches_and_missing_concepts_are_explained(world):
    model, _ = tiny_backbone(depth=2, text_layers=2, concept_layers=2)
    state = model.state_dict()
    with pytest.raises(CheckpointError, match=r"reads visual concepts \(a 2-layer concept encoder\); set "
                                              r"model.concepts.layers: 2"):
        check_concepts(state, False, "ckpt")
    plain = {name: value for name, value in state.items() if not name.startswith("concept_encoder.")}
    with pytest.raises(CheckpointError, match="reads no visual concepts, but the config sets model.concepts.layers"):
        check_concepts(plain, True, "ckpt")
    check_concepts(state, True, "ckpt")
    _, tokenizer = tiny_backbone(depth=2, text_layers=2)
    adapter = task_adapter(ve.SPEC, tokenizer, ve.Options(), True, _config())
    render = PilTransform(TransformConfig(image_size=32, train=False))
    sample = next(iter(ShardReader(_shards(world, "ve_train", "ve"), rank=0, world_size=1, shard_shuffle=False)))
    sample["json"] = {key: value for key, value in sample["json"].items() if key != "concepts"}
    with pytest.raises(ValueError, match=r"has no json.concepts, but this model reads visual concepts"):
        adapter(collate([render(sample)]))
