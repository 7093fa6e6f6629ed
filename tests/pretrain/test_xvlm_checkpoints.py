"""Released X-VLM checkpoints in and out (pretrain/importers/xvlm.py), on files written in the released layouts
(tests/pretrain/xvlm_released.py: Swin, CLIP-ViT and DeiT image towers; pretraining and fine-tuned files):
every key accounted for, the imported weights load strictly into the configured model, exporting gives the released
state back, Swin tables and ViT position embeddings are resized when the resolution or window changes, and
fine-tuning reads the imported files.

Run: ``.venv/bin/python -m pytest -q tests/pretrain/test_xvlm_checkpoints.py``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from finetune import captioning, grounding, nlvr2, retrieval, vqa
from finetune.checkpoints import CheckpointError, backbone_state, load_matching, open_checkpoint
from pretrain.build import build_backbone, load_init_checkpoint
from pretrain.config import ConfigError, from_mapping
from pretrain.importers.xvlm import XVLMImportError, export_xvlm, import_xvlm, main
from pretrain.models.albef import from_albef_state_dict
from pretrain.models.swin import fit_vision_state, resize_relative_position_table
from pretrain.objectives.base import BuildContext
from pretrain.objectives.region import RegionITC
from pretrain.objectives.region_box import Box, BoxConfig
from pretrain.schema import ModelConfig
from tests.pretrain.conftest import TINY_MODEL
from tests.pretrain.xvlm_released import SwinShape, TextShape, ViTShape, released_state

TEXT = TextShape()
SWIN = SwinShape()
CLIP = ViTShape(clip=True)
DEIT = ViTShape()
TOWERS = {  # image tower shape -> our model section
    "swin": (SWIN, {"vision": "swin_tiny_patch4_window7_224", "image_size": 64,
                    "vision_overrides": {"embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2], "window_size": 4}}),
    "clip": (CLIP, {"vision": "vit_base_patch16_clip_quickgelu_224", "image_size": 32,
                    "vision_overrides": {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 8}}),
    "deit": (DEIT, {"vision": "vit_tiny_patch16_224", "image_size": 32,
                    "vision_overrides": {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 8}}),
}


def model_config(kind: str, **changes) -> ModelConfig:
    return from_mapping(ModelConfig, {**TINY_MODEL, **TOWERS[kind][1], "itm_head": "mlp", "embed_dim": 32, **changes})


def loaded_backbone(kind: str, state: dict, **changes):
    """Our backbone for that tower, with the imported state loaded STRICTLY (momentum and queues: none)."""
    model, _ = build_backbone(model_config(kind, **changes))
    model_state, momentum, queues = from_albef_state_dict(state, num_patches=model.visual_encoder.num_patches)
    model_state = fit_vision_state(model.visual_encoder, model_state)
    backbone = {name: value for name, value in model_state.items() if not name.startswith("objectives.")}
    model.load_state_dict(backbone, strict=True)
    assert momentum == {} and queues == {}
    return model


@pytest.mark.parametrize("kind", ["swin", "clip", "deit"])
def test_a_pretraining_file_imports_loads_strictly_and_exports_back(kind):
    released = released_state(TEXT, TOWERS[kind][0])
    ours, report = import_xvlm({"model": released, "config": {"use_swin": kind == "swin"}})
    assert report.vision == kind and not report.unplaced
    assert set(report.mapped) | set(report.dropped) == set(released)   # every key accounted for
    assert set(report.dropped.values()) == {"recomputed buffer"}
    assert {name for name in ours if name.startswith("objectives.")} == {
        f"objectives.box.head.layers.{index}.{part}" for index in (0, 1, 3) for part in ("weight", "bias")}
    model = loaded_backbone(kind, ours)
    # export from what the model holds (its state dict in this project's layout) gives the released state back
    state = {name: value for name, value in model.state_dict().items()}
    state |= {name: value for name, value in ours.items() if name.startswith("objectives.")}
    back = export_xvlm(state, kind, model.visual_encoder)
    assert set(back) == set(released)
    for name, value in released.items():
        assert back[name].shape == value.shape and torch.equal(back[name].to(value.dtype), value), name


def test_unknown_keys_are_listed_and_allowed_only_on_request():
    released = released_state(TEXT, DEIT) | {"momentum_queue.weight": torch.zeros(2),
                                             "itm_head_m.0.weight": torch.zeros(1)}
    with pytest.raises(XVLMImportError, match=r"no place in this project's model:\n  momentum_queue.weight\n  itm_"):
        import_xvlm(released)
    _, report = import_xvlm(released, allow_unplaced=True)
    assert report.unplaced == ["momentum_queue.weight", "itm_head_m.0.weight"] and "UNPLACED (2)" in report.summary()
    with pytest.raises(XVLMImportError, match="no X-VLM image tower"):
        import_xvlm({"text_encoder.bert.embeddings.word_embeddings.weight": torch.zeros(1)})


def xvlm_rule(table: torch.Tensor, window: int) -> torch.Tensor:
    """X-VLM's interpolate_relative_pos_embed, with SciPy's interpolating bicubic spline (what its interp2d ran)."""
    interpolate = pytest.importorskip("scipy.interpolate")
    source_count, heads = table.shape
    source, target = int(source_count ** 0.5), 2 * window - 1
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (source // 2)) / (1.0 - q) > target // 2:
            right = q
        else:
            left = q
    distances, current = [], 1
    for i in range(source // 2):
        distances.append(current)
        current += q ** (i + 1)
    x = [-d for d in reversed(distances)] + [0] + distances
    t = target // 2.0
    dx = np.arange(-t, t + 0.1, 1.0)
    columns = []
    for head in range(heads):
        z = table[:, head].view(source, source).float().numpy()
        spline = interpolate.RectBivariateSpline(x, x, z, kx=3, ky=3, s=0)
        columns.append(torch.tensor(spline(np.clip(dx, x[0], x[-1]), np.clip(dx, x[0], x[-1]))).reshape(-1, 1))
    return torch.cat(columns, dim=1).float()


def test_swin_tables_follow_x_vlms_rule_when_the_window_changes():
    table = torch.randn(49, 3)
    resized = resize_relative_position_table(table, 12)                      # window 4 -> 12: 49 -> 529 rows
    assert resized.shape == (529, 3)
    torch.testing.assert_close(resized, xvlm_rule(table, 12), atol=1e-4, rtol=1e-4)
    # the table's centre (offset 0) keeps its value; the same window leaves it as it is
    torch.testing.assert_close(resized.view(23, 23, 3)[11, 11], table.view(7, 7, 3)[3, 3], atol=1e-5, rtol=0)
    assert resize_relative_position_table(table, 4) is table


def test_a_224_px_swin_file_loads_at_another_resolution_and_window():
    """X-VLM issue #35: a checkpoint of one resolution/window in a model of another fails unless resized."""
    released = released_state(TEXT, SWIN)
    ours, _ = import_xvlm(released)
    overrides = {**TOWERS["swin"][1]["vision_overrides"], "window_size": 8}
    model = loaded_backbone("swin", ours, image_size=128, vision_overrides=overrides)
    table = model.visual_encoder.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (225, 1)  # window 8: (2 * 8 - 1) ** 2
    source = released["vision_encoder.layers.0.blocks.0.attn.relative_position_bias_table"]
    expected = resize_relative_position_table(source, 8)
    assert torch.equal(table.detach(), expected)
    # and a ViT's position embeddings are interpolated (32 -> 64 px: 4 x 4 -> 8 x 8 patches)
    vit = loaded_backbone("clip", import_xvlm(released_state(TEXT, CLIP))[0], image_size=64)
    assert vit.visual_encoder.pos_embed.shape == (1, 65, 64)


def test_imported_weights_compute_what_the_released_ones_define():
    """CLIP's separate q/k/v become timm's fused qkv: the first block's attention output is the same."""
    released = released_state(TEXT, CLIP)
    model = loaded_backbone("clip", import_xvlm(released)[0])
    x = torch.randn(1, 17, 64)
    prefix = "vision_encoder.encoder.layers.0.self_attn."
    q, k, v = (x @ released[f"{prefix}{p}_proj.weight"].T + released[f"{prefix}{p}_proj.bias"] for p in "qkv")
    split = lambda t: t.view(1, 17, 2, 32).transpose(1, 2)  # noqa: E731
    attention = ((split(q) @ split(k).transpose(-1, -2)) / 32 ** 0.5).softmax(-1) @ split(v)
    expected = attention.transpose(1, 2).reshape(1, 17, 64) @ released[f"{prefix}out_proj.weight"].T
    expected = expected + released[f"{prefix}out_proj.bias"]
    with torch.no_grad():
        torch.testing.assert_close(model.visual_encoder.blocks[0].attn(x), expected, atol=1e-5, rtol=1e-5)


FINETUNED = [  # released layout, task module, its options, extra model settings
    ("retrieval", retrieval, {}, {}),
    ("bbox", grounding, {"mode": "box"}, {}),
    ("vqa", vqa, {"answer_list": None}, {}),
    ("captioning", captioning, {}, {}),
]


@pytest.mark.parametrize("layout, module, options, extra", FINETUNED)
def test_fine_tuned_files_load_into_their_tasks(tmp_path, layout, module, options, extra):
    released = released_state(TEXT, SWIN, layout=layout)
    ours, report = import_xvlm(released)
    assert not report.unplaced and set(report.mapped) | set(report.dropped) == set(released)
    path = tmp_path / f"{layout}.safetensors"
    save_file({name: value.contiguous().clone() for name, value in ours.items()}, str(path))
    model, tokenizer = build_backbone(model_config("swin", **extra))
    if layout == "vqa":
        answers = tmp_path / "answers.json"
        answers.write_text('["yes", "no"]')
        options = {"answer_list": str(answers)}
    task_options = from_mapping(module.SPEC.options, options, "options")
    task = module.SPEC.build(model, tokenizer, task_options)
    state = backbone_state(open_checkpoint(str(path)), model.visual_encoder.num_patches,
                           keep_objectives=getattr(task, "pretrained_objectives", ()))
    state = fit_vision_state(model.visual_encoder, state)
    state = task.backbone_to_task(state) if hasattr(task, "backbone_to_task") else {
        f"model.{name}": value for name, value in state.items()}
    report = load_matching(task, state, new=module.SPEC.new_keys, unused=module.SPEC.unused_keys)
    if layout == "bbox":  # the fine-tuned box head is the task's, not a new one
        assert not any(name.startswith("box_head.") for name in report.expected_missing)
        assert torch.equal(task.box_head.layers[3].weight, released["bbox_head.3.weight"])
    if layout == "vqa":
        assert torch.equal(task.state_dict()["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"],
                           released["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"])
    if layout == "captioning":
        assert torch.equal(task.model.text_encoder.bert.encoder.layer[2].crossattention.self.key.weight,
                           released["text_decoder.bert.encoder.layer.2.crossattention.self.key.weight"])


def test_an_nlvr2_file_loads_with_x_vlms_head_and_names_what_does_not_fit_albefs():
    """X-VLM's NLVR2 file: the doubled fusion encoder and an MLP head (options.head: mlp); ALBEF's head does not fit,
    and the loader says which keys."""
    ours, report = import_xvlm(released_state(TEXT, SWIN, layout="nlvr"))
    assert not report.unplaced
    for head in ("mlp", "albef"):
        model, tokenizer = build_backbone(model_config("swin"))
        task = nlvr2.SPEC.build(model, tokenizer, from_mapping(nlvr2.Options, {"head": head}, "options"))
        state = task.backbone_to_task(fit_vision_state(model.visual_encoder, from_albef_state_dict(ours)[0]))
        if head == "mlp":
            report = load_matching(task, state, new=nlvr2.SPEC.new_keys, unused=nlvr2.SPEC.unused_keys)
            assert not report.expected_missing and torch.equal(task.cls_head[1].weight, state["cls_head.1.weight"])
        else:
            with pytest.raises(CheckpointError, match=r"unexpected \(4\): cls_head.1.bias, cls_head.1.weight"):
                load_matching(task, state, new=nlvr2.SPEC.new_keys, unused=nlvr2.SPEC.unused_keys)


def test_the_command_line_imports_and_exports(tmp_path, capsys):
    released = released_state(TEXT, DEIT)
    source = tmp_path / "xvlm.th"
    torch.save({"model": released, "config": {"use_swin": False}}, source)
    assert main(["import", str(source), str(tmp_path / "ours.safetensors")]) == 0
    assert "image tower: deit" in capsys.readouterr().out
    ours = load_file(str(tmp_path / "ours.safetensors"))
    loaded_backbone("deit", ours)
    # export reads the experiment config a pretraining export carries in its metadata
    config = yaml.safe_dump({"method": "xvlm", "model": dataclasses.asdict(model_config("deit"))})
    save_file(ours, str(tmp_path / "export.safetensors"), metadata={"format": "pt", "config": config})
    assert main(["export", str(tmp_path / "export.safetensors"), str(tmp_path / "back.th")]) == 0
    back = torch.load(tmp_path / "back.th", weights_only=True)["model"]
    assert set(back) == set(released) and all(torch.equal(back[name], released[name]) for name in released)
    assert main(["import", str(tmp_path / "missing.th"), str(tmp_path / "x.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_pretraining_run_can_start_from_an_imported_file(tmp_path):
    """model.init_checkpoint (X-VLM's domain pretraining starts from a pretrained X-VLM): backbone and box head."""
    released = released_state(TEXT, DEIT)
    save_file({name: value.contiguous().clone() for name, value in import_xvlm(released)[0].items()},
              str(tmp_path / "xvlm.safetensors"))
    model, tokenizer = build_backbone(model_config("deit"))
    context = BuildContext(model=model, tokenizer=tokenizer, global_batch=2, steps_per_epoch=1, distillation_alpha=0)
    objectives = {"box": Box(BoxConfig(), context), "region_itc": RegionITC(RegionITC.Config(), context)}
    untrained = load_init_checkpoint(model, objectives, str(tmp_path / "xvlm.safetensors")).untrained
    assert torch.equal(objectives["box"].head.layers[0].weight, released["bbox_head.0.weight"])
    assert torch.equal(model.itm_head[3].weight, released["itm_head.3.weight"])
    qkv = released["vision_encoder.blocks.1.attn.qkv.weight"]
    assert torch.equal(model.visual_encoder.blocks[1].attn.qkv.weight, qkv)
    assert untrained == frozenset()
    model, _ = build_backbone(model_config("deit", embed_dim=16))
    with pytest.raises(ConfigError, match=r"does not fit the configured model:\n  unexpected: \[\]\n  shape mismatch: "
                                          r"\['model.text_proj.bias \[32\] vs \[16\]'"):
        load_init_checkpoint(model, {}, str(tmp_path / "xvlm.safetensors"))
