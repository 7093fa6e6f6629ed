"""PEVL's released checkpoints: files written in the layout of PEVL's model definitions (``PEVL_pretrain`` with its
two id queues, ``PEVL_Grounding``/``PEVL_Vrd``/``PEVL_VCR`` without) load by key map with every key accounted for,
the map inverts, the position-token ids are checked, and fine-tuning and pretraining start from such a file.

    .venv/bin/python -m pytest -q tests/pretrain/test_pevl_importer.py
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from finetune import prompt_grounding
from finetune.loop import load_weights
from pretrain.build import load_init_checkpoint
from pretrain.config import ConfigError, resolve_path
from pretrain.importers.pevl import (
    PevlCheckpointError,
    accounted_keys,
    check_position_token_ids,
    import_pevl_state,
    pevl_state,
    pevl_token_ids,
)
from pretrain.models.albef import build_albef
from pretrain.models.encoded import TOWERS
from pretrain.schema import ModelConfig
from pretrain.text.positions import with_position_tokens
from pretrain.text.tokenizer import build_tokenizer
from tests.pretrain.conftest import TINY_MODEL

BERT_DIR = resolve_path(TINY_MODEL["bert_dir"])
QUEUE = 64


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_albef(TINY_MODEL["vision"], TINY_MODEL["image_size"], BERT_DIR, TINY_MODEL["fusion_layer"],
                       embed_dim=TINY_MODEL["embed_dim"], vision_overrides=TINY_MODEL["vision_overrides"],
                       text_overrides=TINY_MODEL["text_overrides"])


def released_layout(model, first_stage: bool) -> dict[str, torch.Tensor]:
    """What ``PEVL_pretrain(...).state_dict()`` (first stage) or ``PEVL_Grounding`` holds, written by hand from those
    definitions: ALBEF's towers and their ``_m`` copies, ``temp`` 0-d, transformers 4.8's ``position_ids`` in both
    BERTs, the queues, and the first stage's ``idx_queue`` / ``image_idx_queue``."""
    state = {name: value.clone() for name, value in model.state_dict().items()}
    state["temp"] = state["temp"].reshape(())
    momentum = tiny_model(seed=1).state_dict()
    for name, value in momentum.items():
        tower, _, rest = name.partition(".")
        if tower in TOWERS:
            state[f"{tower}_m.{rest}"] = value.clone()
    for prefix in ("text_encoder", "text_encoder_m"):
        state[f"{prefix}.bert.embeddings.position_ids"] = torch.arange(512)[None]
    embed_dim = TINY_MODEL["embed_dim"]
    state.update(image_queue=torch.randn(embed_dim, QUEUE), text_queue=torch.randn(embed_dim, QUEUE),
                 queue_ptr=torch.zeros(1, dtype=torch.long))
    if first_stage:
        state.update(idx_queue=torch.full((1, QUEUE), -100), image_idx_queue=torch.full((1, QUEUE), -100))
    return state


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("released")
    model = tiny_model()
    files = {}
    for name, first_stage in (("pevl_pretrain.pth", True), ("grounding.pth", False)):
        state = released_layout(model, first_stage)
        # PEVL's scripts save {'model', 'optimizer', 'lr_scheduler', 'config', 'epoch'}; the weights are under 'model'.
        torch.save({"model": state, "config": {"image_res": 32, "exp_decay_ratio": 0.15}, "epoch": 9},
                   folder / name)
        files[name] = (str(folder / name), state)
    return {"model": model, "files": files}


@pytest.mark.parametrize("name", ["pevl_pretrain.pth", "grounding.pth"])
def test_every_key_of_a_released_file_is_accounted_for_and_the_map_inverts(released, name):
    path, state = released["files"][name]
    imported = import_pevl_state(torch.load(path, weights_only=True))
    assert accounted_keys(imported) == set(state)
    assert set(imported.ignored) == ({"idx_queue", "image_idx_queue"} if name == "pevl_pretrain.pth" else set()) | {
        "text_encoder.bert.embeddings.position_ids", "text_encoder_m.bert.embeddings.position_ids"}
    model = tiny_model(seed=5)
    model.load_state_dict(imported.model)  # strict: the backbone, every key
    assert torch.equal(model.visual_encoder.pos_embed, released["model"].visual_encoder.pos_embed)
    assert set(imported.queues) == {"image_queue", "text_queue", "queue_ptr"}
    back = pevl_state(imported.model, imported.momentum, imported.queues, first_stage=name == "pevl_pretrain.pth")
    assert set(back) == set(state)
    assert all(torch.equal(back[key], state[key]) for key in state)


def test_position_token_ids_are_checked_against_pevls():
    tokenizer = with_position_tokens(build_tokenizer(BERT_DIR, max_length=16), unrelated=True)
    embeddings = torch.zeros(30522, 4)
    check_position_token_ids(tokenizer, embeddings, unrelated=True)
    assert pevl_token_ids()["[pos_511]"] == 717 and pevl_token_ids(unrelated=True)["[unrel]"] == 719
    shifted = with_position_tokens(build_tokenizer(BERT_DIR, max_length=16), first_unused=201)
    with pytest.raises(PevlCheckpointError, match=r"gives @@ id 206, PEVL's checkpoints were trained with id 205"):
        check_position_token_ids(shifted, embeddings)
    with pytest.raises(PevlCheckpointError, match="rows"):
        check_position_token_ids(with_position_tokens(build_tokenizer(BERT_DIR, max_length=16)), embeddings[:700])


def test_fine_tuning_and_pretraining_start_from_a_released_file(released, tmp_path):
    path, state = released["files"]["pevl_pretrain.pth"]
    model = tiny_model(seed=7)
    tokenizer = build_tokenizer(BERT_DIR, max_length=16)
    task = prompt_grounding.build_task(model, tokenizer, prompt_grounding.Options())
    config = SimpleNamespace(model=ModelConfig(**TINY_MODEL))
    notes = []
    load_weights(task, prompt_grounding.SPEC, config, path, SimpleNamespace(note=notes.append))
    assert torch.equal(task.model.text_encoder.bert.embeddings.word_embeddings.weight,
                       state["text_encoder.bert.embeddings.word_embeddings.weight"])
    assert "0 new task keys" in notes[0]

    fresh = tiny_model(seed=8)
    imported = load_init_checkpoint(fresh, {}, path)
    assert torch.equal(fresh.itm_head.weight, state["itm_head.weight"])
    assert torch.equal(imported.momentum["text_proj.weight"], state["text_proj_m.weight"])
    broken = copy.deepcopy(state)
    broken["text_encoder.bert.extra.weight"] = torch.zeros(1)
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(ConfigError, match="text_encoder.bert.extra.weight"):
        load_init_checkpoint(tiny_model(), {}, str(tmp_path / "broken.pth"))


def test_a_start_file_that_lacks_backbone_keys_is_refused(released, tmp_path):
    path, state = released["files"]["pevl_pretrain.pth"]
    short = {key: value for key, value in state.items() if key != "itm_head.weight"}
    torch.save({"model": short}, tmp_path / "short.pth")
    with pytest.raises(ConfigError, match=r"missing: \['model.itm_head.weight'\]"):
        load_init_checkpoint(tiny_model(), {}, str(tmp_path / "short.pth"))
