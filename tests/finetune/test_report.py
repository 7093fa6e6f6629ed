"""The fine-tuning summary: entries from each run's results.json, targets judged, other sections kept."""

from __future__ import annotations

import json

from finetune import report


def _write(directory, name, metric, split):
    (directory / name).mkdir(parents=True)
    (directory / name / "results.json").write_text(json.dumps({"metric": metric, "test": split, "seconds": 12.5}))


def test_summary_entries_and_targets(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write(runs, "vqa", "accuracy", {"accuracy": 40.0, "chance": 10.0})
    _write(runs, "ve", "accuracy", {"accuracy": 50.0, "chance": 33.3})
    _write(runs, "grounding_box", "accuracy", {"accuracy": 61.0, "chance": 2.0, "chance_random_proposal": 20.0})
    _write(runs, "captioning", "cider", {"cider": 0.8, "chance": 0.1})
    _write(runs, "retrieval", "r_mean", {"r_mean": 30.0, "chance": 5.3, "txt_r1": 6.0, "img_r1": 4.0,
                                         "chance_r1": 1.0, "txt_r1_img_r1_mean": 5.0})
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"pretrain": {"steps": 3}}))
    assert report.main([str(runs), "--summary", str(summary)]) == 0
    written = json.loads(summary.read_text())
    assert written["pretrain"] == {"steps": 3}
    entries = written["finetune"]
    assert entries["vqa"] == {"metric": "accuracy", "value": 40.0, "chance": 10.0, "split": "test", "seconds": 12.5,
                              "target": ">= chance + 25", "met": True}
    assert [entries[name]["met"] for name in ("ve", "grounding_box", "captioning", "retrieval")] == [
        False, True, False, True]
    assert entries["grounding_box"]["chance"] == 20.0
    assert "captioning         cider          0.80     0.10       12  CIDEr >= 1.0: NOT met" in capsys.readouterr().out


def test_missing_metric_is_named(tmp_path, capsys):
    _write(tmp_path, "nlvr2", "accuracy", {"acc": 1.0})
    assert report.main([str(tmp_path), "--summary", str(tmp_path / "s.json")]) == 2
    assert "lack the task's metric 'accuracy'" in capsys.readouterr().err
