"""The pretraining summary: steps, losses and zero-shot retrieval from a run, the box head's zero-shot grounding from
a grounding evaluation, merged into the summary JSON beside its other sections."""

from __future__ import annotations

import json

import pytest

from pretrain import report


def _run(directory):
    directory.mkdir()
    retrieval = {"txt_r1": 6.0, "txt_r5": 20.0, "txt_r10": 30.0, "img_r1": 4.0, "img_r5": 15.0, "img_r10": 25.0,
                 "r_mean": 16.7, "chance_r1": 1.0, "images": 100}
    (directory / "results.json").write_text(json.dumps({"steps": 3, "seconds": 9.5, "final_loss": {"loss": 2.0},
                                                        "zero_shot_retrieval": retrieval}))
    return directory


def test_zero_shot_grounding_joins_the_pretraining_section(tmp_path, capsys):
    run = _run(tmp_path / "run")
    grounding = tmp_path / "grounding.json"
    grounding.write_text(json.dumps({"metric": "accuracy", "val": {"accuracy": 50.0},
                                     "test": {"accuracy": 45.0, "chance": 2.0, "chance_random_proposal": 15.0}}))
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"finetune": {"retrieval": {}}}))
    assert report.main([str(run), "--summary", str(summary), "--zero-shot-grounding", str(grounding)]) == 0
    written = json.loads(summary.read_text())
    assert written["finetune"] == {"retrieval": {}}
    section = written["pretrain"]
    assert section["zero_shot_grounding"] == {"value": 45.0, "chance": 15.0, "split": "test"}
    assert "images" not in section["zero_shot_retrieval"] and section["zero_shot_retrieval"]["txt_r1"] == 6.0
    out = capsys.readouterr().out
    assert "mean R@1 5.00 = 5.0x chance" in out
    assert "Acc@0.5 45.0, chance 15.0 (3.0x chance)" in out


def test_a_grounding_file_without_accuracy_is_named(tmp_path):
    run = _run(tmp_path / "run")
    grounding = tmp_path / "grounding.json"
    grounding.write_text(json.dumps({"metric": "accuracy", "val": {"loss": 1.0}}))
    with pytest.raises(ValueError, match="no grounding accuracy in its val results"):
        report.summarize(str(run), str(tmp_path / "summary.json"), None, str(grounding))
