"""``python -m finetune.report RUNS_DIR --summary FILE``: the fine-tuning table beside chance.

Every folder of ``RUNS_DIR`` holding a ``results.json`` (written by ``python -m finetune.<task>``) is one
entry, named after the folder (``retrieval``, ``vqa``, ``grounding_gradcam``, ...). The entry's value is
the task's metric on its final split (test, else val) and ``chance`` the same metric for random
predictions, as the task computed it (for grounding, the higher of that and a random proposal's
accuracy). The entries are merged into the summary JSON under ``finetune``
(other sections are kept) and printed as a table with the demo's target for each:

    retrieval: mean R@1 >= 5x chance    vqa, nlvr2, ve: >= chance + 25 points
    grounding_*, rec: >= 3x chance      captioning: CIDEr >= 1.0
    vrd, gqa, vcr (PEVL): > chance
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pretrain.report import merge_into_summary


def _target(name: str, split: dict, value: float, chance: float) -> tuple[str, bool]:
    if name == "retrieval":
        mean_r1 = split.get("txt_r1_img_r1_mean", (split.get("txt_r1", 0) + split.get("img_r1", 0)) / 2)
        return "mean R@1 >= 5x chance", mean_r1 >= 5 * split.get("chance_r1", float("inf"))
    if name.startswith("grounding") or name == "rec":
        return ">= 3x chance", value >= 3 * chance
    if name in ("vrd", "gqa", "vcr"):  # the PEVL demo's other prompt tasks: reported beside chance
        return "> chance", value > chance
    if name == "captioning":
        return "CIDEr >= 1.0", value >= 1.0
    return ">= chance + 25", value >= chance + 25


def collect(runs_dir: str) -> dict:
    entries = {}
    for name in sorted(os.listdir(runs_dir)):
        path = os.path.join(runs_dir, name, "results.json")
        if not os.path.isfile(path):
            continue
        with open(path) as handle:
            results = json.load(handle)
        split_name = "test" if results.get("test") else "val"
        split = results.get(split_name) or {}
        metric = results["metric"]
        if metric not in split:
            raise ValueError(f"{path}: the {split_name} results lack the task's metric {metric!r}")
        value, chance = float(split[metric]), float(split.get("chance", float("nan")))
        # A box regressor is also judged against picking a random detector proposal, the stronger baseline.
        chance = max(chance, float(split.get("chance_random_proposal", chance)))
        target, met = _target(name, split, value, chance)
        entries[name] = {"metric": metric, "value": value, "chance": chance, "split": split_name,
                         "seconds": results.get("seconds"), "target": target, "met": met}
        if name == "retrieval":
            entries[name].update(mean_r1=split.get("txt_r1_img_r1_mean"), chance_r1=split.get("chance_r1"))
    return entries


def summarize(runs_dir: str, summary_path: str) -> dict:
    entries = collect(runs_dir)
    merge_into_summary(summary_path, "finetune", entries)
    return entries


def print_table(entries: dict) -> None:
    print(f"{'task':<18} {'metric':<10} {'value':>8} {'chance':>8}  {'seconds':>7}  target")
    for name, entry in entries.items():
        seconds = f"{entry['seconds']:.0f}" if entry.get("seconds") is not None else "-"
        print(f"{name:<18} {entry['metric']:<10} {entry['value']:8.2f} {entry['chance']:8.2f}  {seconds:>7}  "
              f"{entry['target']}: {'met' if entry['met'] else 'NOT met'}")
        if name == "retrieval" and entry.get("mean_r1") is not None:
            print(f"{'':<18} {'mean R@1':<10} {entry['mean_r1']:8.2f} {entry['chance_r1']:8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", help="folder whose subfolders are fine-tuning runs")
    parser.add_argument("--summary", required=True, help="summary JSON to create or update")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        entries = summarize(args.runs_dir, args.summary)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not entries:
        print(f"error: no results.json under {args.runs_dir}", file=sys.stderr)
        return 2
    print_table(entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
