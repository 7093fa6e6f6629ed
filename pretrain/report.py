"""``python -m pretrain.report RUN_DIR --summary FILE [--plot FILE.png] [--zero-shot-grounding RESULTS]``.

Reads ``RUN_DIR/results.json`` and ``RUN_DIR/logs/metrics.jsonl`` (written by ``python -m pretrain``),
merges ``{"pretrain": {steps, seconds, final_loss, zero_shot_retrieval}}`` into the summary JSON (other
sections of an existing summary are kept), prints zero-shot R@1/5/10 beside chance, and plots every
loss term over steps to a PNG. ``--zero-shot-grounding`` takes the ``results.json`` of ``python -m
finetune.grounding --evaluate`` run on the pretraining checkpoint (X-VLM's pretrained box head) and adds
``zero_shot_grounding: {value, chance}`` (Acc@0.5; chance as ``finetune.report`` takes it: the better of the
mean box and a random proposal).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

RETRIEVAL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "chance_r1")


def read_losses(run_dir: str, names) -> dict[str, list[tuple[int, float]]]:
    """``{term: [(step, value), ...]}`` for the loss terms ``names`` (whatever objectives the run had)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            if "step" not in record:
                continue
            for name in names:
                if name in record:
                    series.setdefault(name, []).append((record["step"], record[name]))
    return series


def plot_losses(series: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        steps, values = zip(*sorted(points), strict=True)
        axis.plot(steps, values, label=name, linewidth=2 if name == "loss" else 1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title("pretraining losses")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def merge_into_summary(summary_path: str, name: str, section: dict) -> None:
    """Set ``name`` in the summary JSON (created if absent), keeping its other sections (the demo's summary
    gathers pretraining and fine-tuning)."""
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path) as handle:
            summary = json.load(handle)
    summary[name] = section
    os.makedirs(os.path.dirname(os.path.abspath(summary_path)), exist_ok=True)
    with open(summary_path, "w") as handle:
        json.dump(summary, handle, indent=2)


def zero_shot_grounding(results_path: str) -> dict:
    """``{value, chance, split}`` from a grounding evaluation's results.json (its test split, else val)."""
    with open(results_path) as handle:
        results = json.load(handle)
    split_name = "test" if results.get("test") else "val"
    split = results.get(split_name) or {}
    if "accuracy" not in split:
        raise ValueError(f"{results_path}: no grounding accuracy in its {split_name} results")
    chance = float(split.get("chance", float("nan")))
    chance = max(chance, float(split.get("chance_random_proposal", chance)))
    return {"value": float(split["accuracy"]), "chance": chance, "split": split_name}


def summarize(run_dir: str, summary_path: str, plot_path: str | None, grounding: str | None = None) -> dict:
    with open(os.path.join(run_dir, "results.json")) as handle:
        results = json.load(handle)
    section = {key: results[key] for key in ("steps", "seconds", "final_loss") if key in results}
    retrieval = results.get("zero_shot_retrieval")
    if retrieval:
        section["zero_shot_retrieval"] = {key: retrieval[key] for key in RETRIEVAL_KEYS if key in retrieval}
    if grounding:
        section["zero_shot_grounding"] = zero_shot_grounding(grounding)
    merge_into_summary(summary_path, "pretrain", section)
    if plot_path:
        plot_losses(read_losses(run_dir, results.get("final_loss", {"loss": None})), plot_path)
    return section


def print_section(section: dict) -> None:
    print(f"pretraining: {section['steps']} steps in {section['seconds']:.0f}s; final losses "
          + ", ".join(f"{name} {value:.3f}" for name, value in section["final_loss"].items()))
    retrieval = section.get("zero_shot_retrieval")
    if retrieval:
        chance = retrieval["chance_r1"]
        print(f"zero-shot retrieval (ITC) on the val split, R@1 chance = {chance:.2f}%")
        print(f"  image->text  R@1 {retrieval['txt_r1']:6.2f}  R@5 {retrieval['txt_r5']:6.2f}  "
              f"R@10 {retrieval['txt_r10']:6.2f}")
        print(f"  text->image  R@1 {retrieval['img_r1']:6.2f}  R@5 {retrieval['img_r5']:6.2f}  "
              f"R@10 {retrieval['img_r10']:6.2f}")
        mean_r1 = (retrieval["txt_r1"] + retrieval["img_r1"]) / 2
        print(f"  mean R@1 {mean_r1:.2f} = {mean_r1 / chance:.1f}x chance")
    grounding = section.get("zero_shot_grounding")
    if grounding:
        times = grounding["value"] / max(grounding["chance"], 1e-9)
        print(f"zero-shot box grounding (pretrained box head) on the {grounding['split']} split: Acc@0.5 "
              f"{grounding['value']:.1f}, chance {grounding['chance']:.1f} ({times:.1f}x chance)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--summary", required=True, help="summary JSON to create or update")
    parser.add_argument("--plot", default=None, help="PNG of the loss terms over steps")
    parser.add_argument("--zero-shot-grounding", default=None, metavar="RESULTS",
                        help="results.json of finetune.grounding --evaluate on this run's checkpoint (box head)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print_section(summarize(args.run_dir, args.summary, args.plot, args.zero_shot_grounding))
    return 0


if __name__ == "__main__":
    sys.exit(main())
