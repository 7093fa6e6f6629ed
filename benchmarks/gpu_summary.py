"""The compact table and ``gpu_albef.json`` of a ``benchmarks/gpu_bench.sh`` run, from the files it left in OUT.

    python benchmarks/gpu_summary.py OUT "the command that ran"

``gpu_albef.json`` (in OUT, and in ``benchmarks/results/`` when the run was on CUDA) holds: ``device``,
``date``, ``samples_per_s`` and ``mfu`` (the fastest DeepSpeed row on synthetic batches, MFU as a fraction),
``bare_loop_ratio`` (that row's samples/s over the bare loop's, same micro-batch and compile setting),
``dali_images_per_s`` (read + decode + full augmentation; null without DALI), ``data_wait`` (fraction of
step time spent waiting for data in the training run, its last logged window), ``command``, and the rows
behind them. A stage that failed or was skipped leaves its fields null.
"""

from __future__ import annotations

import datetime
import json
import os
import sys


def read_json(path: str):
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    with open(path) as handle:
        text = handle.read().strip()
    try:
        return json.loads(text.splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return None


def training_records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "logs", "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [record for record in map(json.loads, handle) if "step" in record]


def main(out: str, command: str) -> int:
    device = read_json(os.path.join(out, "device.json")) or {}
    rows = []
    for name in ("bare_loop_eager.json", "bare_loop_compiled.json"):
        loaded, path = None, os.path.join(out, name)
        if os.path.exists(path):
            with open(path) as handle:
                loaded = json.load(handle)
        rows += (loaded or {}).get("rows", [])
    ours = [row for row in rows if row["loop"] != "bare"]
    best = max(ours, key=lambda row: row["samples_per_s"]) if ours else None
    profile = read_json(os.path.join(out, "step_profile.json")) or {}
    dali = read_json(os.path.join(out, "bench_dali.json"))
    records = training_records(os.path.join(out, "run"))
    last = records[-1] if records else {}

    print(f"device: {device.get('device')}  torch {device.get('torch')}")
    print(f"{'loop':>6} {'compile':>7} {'micro':>5} {'samples/s':>10} {'x bare':>7} {'MFU':>6} {'peak GiB':>8}")
    for row in rows:
        mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "-"
        memory = f"{row['peak_memory_gib']:.1f}" if row.get("peak_memory_gib") is not None else "-"
        print(f"{row['loop']:>6} {'on' if row['compile'] else 'off':>7} {row['micro_batch']:>5} "
              f"{row['samples_per_s']:>10.1f} {row['ratio_to_bare']:>7.3f} {mfu:>6} {memory:>8}")
    if ours:
        by_stage = {}
        for row in ours:
            by_stage.setdefault(row["loop"], []).append(row["samples_per_s"])
        print("fastest per ZeRO stage (samples/s): "
              + ", ".join(f"{stage} {max(values):.1f}" for stage, values in sorted(by_stage.items())))
    print(f"host syncs in a step: {profile.get('host_syncs_forward_backward')} in forward + backward "
          f"({', '.join(profile.get('host_sync_kinds', [])) or '-'}); CUDA sync debug mode: "
          f"{profile.get('cuda_syncs_per_step', '-')} per step")
    if dali:
        print(f"DALI loader alone ({dali['device']}, {dali['threads']} threads): read + decode "
              f"{dali['decode']:.0f} images/s, + augment {dali['augment']:.0f} images/s")
    else:
        print("DALI loader alone: not measured (DALI absent or the stage failed)")
    if last:
        print(f"training run, steps {(records[-2]['step'] if len(records) > 1 else 0) + 1} to "
              f"{last['step']}: {last.get('samples_per_s', 0):.1f} samples/s, data wait "
              f"{100 * last.get('data_wait', 0):.1f}%" + (f", MFU {100 * last['mfu']:.1f}%" if "mfu" in last else ""))
    else:
        print("training run: no logged step (see train.log)")

    result = {"device": device.get("device"), "date": datetime.date.today().isoformat(),
              "samples_per_s": best["samples_per_s"] if best else None, "mfu": best.get("mfu") if best else None,
              "bare_loop_ratio": best["ratio_to_bare"] if best else None,
              "best_row": best, "dali_images_per_s": dali["augment"] if dali else None,
              "data_wait": last.get("data_wait"), "training_run": last or None, "command": command,
              "torch": device.get("torch"), "host_syncs": profile or None, "rows": rows}
    with open(os.path.join(out, "gpu_albef.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    if device.get("device", "").startswith("cpu"):
        print(f"wrote {out}/gpu_albef.json (a CPU rehearsal: benchmarks/results/ is left alone)")
    else:
        os.makedirs("benchmarks/results", exist_ok=True)
        with open("benchmarks/results/gpu_albef.json", "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"wrote {out}/gpu_albef.json and benchmarks/results/gpu_albef.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))
