"""Training metrics: JSONL + TensorBoard on rank 0, step timing, data-wait fraction and MFU.

``MetricsLog`` writes ``OUTPUT/logs/metrics.jsonl`` (one object per logged step) and TensorBoard
events under ``OUTPUT/logs/tensorboard``; with ``run.log_keys`` every rank also writes the sample keys
of each logged step to ``OUTPUT/logs/keys_rankNNN.jsonl``. A run resumed from step N replays the steps
after N that the interrupted run had already logged: ``resumed_at=N`` drops those records from the
JSONL files and purges them from TensorBoard, so every step keeps one value.

``StepTimer`` splits wall time into waiting for data and computing, and reports samples/s. Model FLOPs
utilisation is reported when the accelerator's dense bf16/fp16 peak is known: the FLOPs of one
optimizer step are COUNTED, not estimated, by running the first step under
``torch.utils.flop_counter.FlopCounterMode`` (every matmul/conv/attention of forward, momentum
forward and backward, per rank), then ``MFU = flops_per_step x steps/s / peak``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import torch
import torch.distributed as dist

# Dense bf16/fp16 tensor-core peaks in FLOP/s (vendor datasheets), matched on the device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_FLOPS.items():
        if key in name:
            return peak / 989e12 * 756e12 if key == "H100" and "PCIe" in name else peak
    return None


def drop_records_after(path: str, step: int) -> int:
    """Rewrite a JSONL log without the step records past ``step`` (notes stay); returns how many went."""
    if not os.path.exists(path):
        return 0
    with open(path) as handle:
        lines = handle.readlines()
    kept = [line for line in lines if not line.strip() or json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        temporary = f"{path}.tmp{os.getpid()}"
        with open(temporary, "w") as handle:
            handle.writelines(kept)
        os.replace(temporary, path)
    return len(lines) - len(kept)


class MetricsLog:
    def __init__(self, output_dir: str, enabled: bool, label: str = "pretrain", resumed_at: int | None = None):
        self.enabled = enabled
        self.label = label
        self.directory = os.path.join(output_dir, "logs")
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.keys_path = os.path.join(self.directory, f"keys_rank{self.rank:03d}.jsonl")
        os.makedirs(self.directory, exist_ok=True)
        self._writer = None
        self._jsonl = None
        if resumed_at is not None:
            drop_records_after(self.keys_path, resumed_at)
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            metrics_path = os.path.join(self.directory, "metrics.jsonl")
            replayed = drop_records_after(metrics_path, resumed_at) if resumed_at is not None else 0
            purge = {"purge_step": resumed_at + 1} if resumed_at is not None else {}
            self._writer = SummaryWriter(os.path.join(self.directory, "tensorboard"), **purge)
            self._jsonl = open(metrics_path, "a")  # noqa: SIM115 (closed in close())
            if replayed:
                self.note(f"dropped {replayed} logged step(s) after step {resumed_at}: the resumed run logs them anew")

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"[{self.label}] {text}", flush=True)
            self._jsonl.write(json.dumps({"note": text, "time": time.time()}) + "\n")
            self._jsonl.flush()

    def write(self, step: int, record: dict, keys: list[str] | None = None) -> None:
        if keys is not None:
            with open(self.keys_path, "a") as handle:
                handle.write(json.dumps({"step": step, "keys": list(keys), "loss": record.get("loss")}) + "\n")
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self._jsonl.flush()
        for name, value in record.items():
            if isinstance(value, (int, float)):
                self._writer.add_scalar(f"train/{name}", value, step)
        for reason, count in record.get("skipped", {}).items():
            self._writer.add_scalar(f"skipped/{reason}", count, step)

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()


class StepTimer:
    """Wall time per optimizer step, split into data wait and compute; throughput and MFU."""

    def __init__(self, engine, samples_per_step: int, accumulation: int = 1):
        self.samples_per_step = samples_per_step
        self.accumulation = accumulation
        dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() \
            else torch.float32
        self.peak = device_peak_flops(engine.device, dtype)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.flops_per_step: float | None = None
        self._counted = False
        self.start = time.perf_counter()
        self._mark = self.start
        self._wait = 0.0
        self._busy = 0.0
        self._steps = 0

    def wait_start(self) -> None:
        self._mark = time.perf_counter()

    def compute_start(self) -> None:
        now = time.perf_counter()
        self._wait += now - self._mark
        self._mark = now

    def step_end(self) -> None:
        now = time.perf_counter()
        self._busy += now - self._mark
        self._steps += 1

    def flop_counter(self):
        """FlopCounterMode around the first micro-batch where a peak is known; a no-op otherwise."""
        if self._counted or self.peak is None:
            return contextlib.nullcontext()
        self._counted = True
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        timer = self

        class _Counting(contextlib.AbstractContextManager):
            def __enter__(self):
                counter.__enter__()
                return counter

            def __exit__(self, *exc):
                counter.__exit__(*exc)
                timer.flops_per_step = float(counter.get_total_flops()) * timer.accumulation
                return False

        return _Counting()

    def report(self) -> dict:
        """Figures since the previous report, then reset the window."""
        total = self._wait + self._busy
        steps_per_second = self._steps / total if total > 0 else 0.0
        record = {"samples_per_s": steps_per_second * self.samples_per_step,
                  "data_wait": self._wait / total if total > 0 else 0.0}
        if self.flops_per_step is not None and self.peak is not None:
            record["mfu"] = self.flops_per_step * steps_per_second / self.peak
        self._wait = self._busy = 0.0
        self._steps = 0
        return record

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
