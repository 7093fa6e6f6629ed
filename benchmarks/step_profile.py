"""Where one pretraining step spends its time, and how often it waits for the device.

    DS_ACCELERATOR=cpu python benchmarks/step_profile.py                   # CPU: the demo model
    python benchmarks/step_profile.py --config benchmarks/albef_base_gpu.yaml --set model.bert_dir=DIR \\
        --micro-batch 64 [--compile]                                        # CUDA: ALBEF-base, bf16 autocast

Runs the bare step of ``benchmarks/bare_loop.py`` (task forward + backward + torch AdamW, fused on CUDA) on
synthetic batches, then:
- host syncs in one step, counted two ways: ``pretrain.host_sync.HostSyncGuard(record=True)`` around forward
  and backward (any device), and on CUDA ``torch.cuda.set_sync_debug_mode("warn")`` around the whole step
  (the syncs the CUDA runtime sees, optimizer included);
- a ``torch.profiler`` table of the top kernels by self time over a few steps (device time on CUDA).
Prints the table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bare_loop import build, synthetic_batches  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.engine import plan_steps  # noqa: E402
from pretrain.host_sync import HostSyncGuard  # noqa: E402
from pretrain.methods import method_of, resolve_objectives  # noqa: E402
from pretrain.schema import PretrainConfig  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="pretrain/configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="rows of the kernel table")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    config = load_config(PretrainConfig, args.config, args.overrides)
    specs = resolve_objectives(config)
    plan = plan_steps({"train_micro_batch_size_per_gpu": args.micro_batch}, 1000 * args.micro_batch, 1,
                      config.optim, None)
    task, tokenizer = build(config, specs, plan, device, args.compile)
    task.train()
    batches = synthetic_batches(4, args.micro_batch, config.model.image_size,
                                method_of(config).batch_adapter(tokenizer, config), device)
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(task.parameter_groups(config.optim.weight_decay), lr=config.optim.lr,
                                  fused=cuda or None)
    step_number = [0]

    def forward_backward(batch):
        task.set_step(step_number[0])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = task(batch)["loss"]
        loss.backward()

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_number[0] += 1

    for batch in batches[:3]:  # warm-up, compilation
        forward_backward(batch)
        optimizer_step()
    if cuda:
        torch.cuda.synchronize()

    with HostSyncGuard(record=True) as guard:
        forward_backward(batches[3])
    optimizer_step()
    result = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "micro_batch": args.micro_batch,
              "compile": args.compile, "host_syncs_forward_backward": len(guard.seen),
              "host_sync_kinds": sorted(set(guard.seen))}
    if cuda:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                forward_backward(batches[0])
                optimizer_step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(warning.message) for warning in caught if "synchroniz" in str(warning.message)]
        result["cuda_syncs_per_step"] = len(syncs)
        result["cuda_sync_kinds"] = sorted({message.splitlines()[0][:120] for message in syncs})
        torch.cuda.synchronize()

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profiler:
        for index in range(args.profile_steps):
            forward_backward(batches[index % len(batches)])
            optimizer_step()
        if cuda:
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=args.top, max_name_column_width=60))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
