"""The ViCHA demo's summary: the ALBEF baseline beside ViCHA at equal steps, and how well the concepts came out.

    python scripts/vicha_summary.py --summary runs/demo-vicha/summary.json --albef-run runs/demo-vicha/albef \\
        --concepts runs/demo-vicha/annotations/pretrain_albef.json \\
        --truth runs/demo-vicha/world/annotations/pretrain_vicha_kwords.json

Adds ``pretrain.albef_baseline`` (the ALBEF run's zero-shot retrieval, steps, seconds), ``concepts`` (precision@5 of
the chosen concepts against each image's true shape and colour words, which the synthetic world knows) and
``comparison`` (ViCHA's and ALBEF's zero-shot mean R@1 and their ratio) to the summary ``pretrain.report`` wrote,
and prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_shards.concepts import precision_at_k  # noqa: E402
from data_shards.synth import COLOURS, KINDS  # noqa: E402


def mean_r1(retrieval: dict) -> float:
    return (retrieval["txt_r1"] + retrieval["img_r1"]) / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", required=True)
    parser.add_argument("--albef-run", required=True, help="the ALBEF baseline's pretraining output folder")
    parser.add_argument("--concepts", required=True, help="annotation file with the chosen kwords")
    parser.add_argument("--truth", required=True, help="synth's pretrain_vicha_kwords.json (true words first)")
    args = parser.parse_args()
    with open(args.summary) as handle:
        summary = json.load(handle)
    with open(os.path.join(args.albef_run, "results.json")) as handle:
        albef = json.load(handle)
    summary["pretrain"]["albef_baseline"] = {key: albef[key] for key in ("steps", "seconds", "zero_shot_retrieval")}
    with open(args.concepts) as handle:
        chosen = {record["image"]: record["kwords"] for record in json.load(handle)}
    true_words = set(KINDS) | set(COLOURS)
    with open(args.truth) as handle:
        truth = {record["image"]: {word for word in record["kwords"] if word in true_words}
                 for record in json.load(handle)}
    summary["concepts"] = precision_at_k(chosen, truth, k=5)
    vicha, baseline = mean_r1(summary["pretrain"]["zero_shot_retrieval"]), mean_r1(albef["zero_shot_retrieval"])
    summary["comparison"] = {"vicha_mean_r1": vicha, "albef_mean_r1": baseline,
                             "ratio": vicha / baseline if baseline else None,
                             "steps": summary["pretrain"]["steps"]}
    with open(args.summary, "w") as handle:
        json.dump(summary, handle, indent=2)
    print(f"zero-shot mean R@1 at {summary['pretrain']['steps']} steps: ViCHA {vicha:.1f}, ALBEF {baseline:.1f} "
          f"(ratio {summary['comparison']['ratio']:.2f}); concepts: precision@5 "
          f"{summary['concepts']['precision_at_5']:.3f}, images with every true word in the top 5: "
          f"{100 * summary['concepts']['images_recovered']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
