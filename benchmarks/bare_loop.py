"""Samples/s of a bare PyTorch loop against our DeepSpeed step, same model, same batches, in one run.

    DS_ACCELERATOR=cpu python benchmarks/bare_loop.py                       # CPU: the demo model, fp32
    python benchmarks/bare_loop.py --config benchmarks/albef_base_gpu.yaml \\
        --set model.bert_dir=DIR --micro-batches 64 128 --zero 0 1 2 --compile off on --json OUT.json  # CUDA

For every (compile, micro-batch) both loops run the same ALBEF task (built under one seed) on the same
pre-built synthetic batches (random images, random captions tokenised by the run's tokenizer; no data
loading), alternating in rounds so machine noise hits both alike:
- bare: ``loss = task(batch)["loss"]; loss.backward(); optimizer.step(); optimizer.zero_grad()`` with
  torch AdamW (``fused=True`` on CUDA) over the same parameter groups; on CUDA with bf16 the forward
  runs under ``torch.autocast`` over fp32 weights, the bare-PyTorch way to train in bf16;
- ours, for each ZeRO stage: ``engine(batch)`` -> ``engine.backward`` -> ``engine.step`` with torch's
  AdamW (fused on CUDA) and bf16 on CUDA, fp32 on CPU.
``--compile on`` compiles every transformer block of both towers and of the momentum copies
(``pretrain.runtime.compile_blocks``, what ``model.compile: true`` does in a run) in both loops.

FLOPs per step are counted, not estimated, as the training loop does (``FlopCounterMode`` around one
forward + backward: online forward, momentum forward, backward); MFU = FLOPs x steps/s / the device's
dense bf16 peak (``pretrain.metrics_log.PEAK_FLOPS``; none on CPU, where TFLOP/s are printed instead).
Prints one table row per (compile, micro-batch, loop) and a JSON summary (``--json`` writes it to a file).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.build import build_task, seed_everything  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.engine import plan_steps  # noqa: E402
from pretrain.methods import method_of, resolve_objectives  # noqa: E402
from pretrain.metrics_log import device_peak_flops  # noqa: E402
from pretrain.runtime import compile_blocks  # noqa: E402
from pretrain.schema import PretrainConfig  # noqa: E402

WORDS = ("a", "red", "circle", "small", "large", "blue", "square", "green", "triangle", "left", "of", "right",
         "above", "below", "next", "to", "the", "two", "three", "yellow", "purple", "orange", "shape", "shapes",
         "on", "white", "background", "and", "with", "near")


def synthetic_batches(count: int, micro_batch: int, image_size: int, adapter, device: torch.device) -> list[dict]:
    """``count`` batches as the loader delivers them (images normalised, captions tokenised), on ``device``."""
    generator = torch.Generator().manual_seed(0)
    words = random.Random(0)
    batches = []
    for index in range(count):
        texts = [" ".join(words.choice(WORDS) for _ in range(words.randint(5, 20))) for _ in range(micro_batch)]
        batch = adapter({"image": torch.randn(micro_batch, 3, image_size, image_size, generator=generator),
                         "text": texts, "__key__": [f"{index:04d}{row:04d}" for row in range(micro_batch)]})
        batches.append({key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()})
    return batches


def ds_config(micro_batch: int, stage: int, bf16: bool, fused: bool, optim) -> dict:
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0, "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
            "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "fused": fused, "lr": optim.lr,
                                                      "betas": list(optim.betas), "eps": optim.eps,
                                                      "weight_decay": optim.weight_decay}},
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(step, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batch, count_only=True)
    return float(counter.get_total_flops())


def timed(step, batches, device) -> list[float]:
    times = []
    for batch in batches:
        synchronize(device)
        start = time.perf_counter()
        step(batch)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def build(config, specs, plan, device, compiled: bool, backend: str = "inductor"):
    seed_everything(0)
    task, tokenizer = build_task(config, specs, plan)
    task.to(device)
    task.place(device)
    if compiled:
        compile_blocks(task.model, *(task.momentum.modules.values() if task.momentum is not None else ()),
                       backend=backend)
    return task, tokenizer


def measure(config, specs, args, device, micro_batch: int, compiled: bool) -> list[dict]:
    """Rows for one (compile, micro-batch): the bare loop and every ZeRO stage, alternating in rounds."""
    import deepspeed

    bf16 = device.type == "cuda"
    fused = device.type == "cuda"
    plan = plan_steps({"train_micro_batch_size_per_gpu": micro_batch}, 1000 * micro_batch, 1, config.optim, None)
    bare_task, tokenizer = build(config, specs, plan, device, compiled, args.compile_backend)
    adapter = method_of(config).batch_adapter(tokenizer, config)
    batches = synthetic_batches(args.steps, micro_batch, config.model.image_size, adapter, device)
    optimizer = torch.optim.AdamW(bare_task.parameter_groups(config.optim.weight_decay), lr=config.optim.lr,
                                  betas=tuple(config.optim.betas), eps=config.optim.eps, fused=fused or None)

    def bare_step(batch, count_only=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = bare_task(batch)["loss"]
        loss.backward()
        if count_only:
            optimizer.zero_grad(set_to_none=True)
            return
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = {"bare": bare_step}
    for stage in args.zero:
        task, _ = build(config, specs, plan, device, compiled, args.compile_backend)
        engine, _, _, _ = deepspeed.initialize(model=task, config=ds_config(micro_batch, stage, bf16, fused,
                                                                            config.optim),
                                               model_parameters=task.parameter_groups(config.optim.weight_decay))
        task.place(engine.device)

        def engine_step(batch, engine=engine):
            loss = engine(batch)["loss"]
            engine.backward(loss)
            engine.step()

        engine.train()
        steps[f"zero{stage}"] = engine_step
    bare_task.train()

    flops = count_flops(bare_step, batches[0])
    for step in steps.values():  # warm-up (and compilation) outside the timing
        for batch in batches[: args.warmup]:
            step(batch)
    times = {name: [] for name in steps}
    memory = {}
    for _ in range(args.rounds):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name] += timed(step, batches, device)
            if device.type == "cuda":
                memory[name] = max(memory.get(name, 0), torch.cuda.max_memory_allocated(device))
    peak = device_peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
    bare_rate = micro_batch / statistics.median(times["bare"])
    rows = []
    for name, values in times.items():
        seconds = statistics.median(values)
        rows.append({"loop": name, "compile": compiled, "micro_batch": micro_batch, "steps": len(values),
                     "step_ms": 1000 * seconds, "samples_per_s": micro_batch / seconds,
                     "ratio_to_bare": micro_batch / seconds / bare_rate, "flops_per_step": flops,
                     "tflops_per_s": flops / seconds / 1e12,
                     "mfu": flops / seconds / peak if peak else None,
                     "peak_memory_gib": memory[name] / 2**30 if name in memory else None})
    steps.clear()  # the engines and the bare task go before the next micro-batch's are built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="pretrain/configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[16])
    parser.add_argument("--zero", type=int, nargs="+", default=[0], choices=[0, 1, 2], help="ZeRO stages to run")
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    parser.add_argument("--compile-backend", default="inductor",
                        help="aot_eager traces without code generation (a CPU rehearsal of the compiled path)")
    parser.add_argument("--steps", type=int, default=6, help="batches per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per loop first")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29541"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                        ("LOCAL_RANK", "0")):
        os.environ.setdefault(name, value)
    import deepspeed

    deepspeed.init_distributed()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    config = load_config(PretrainConfig, args.config, args.overrides)
    specs = resolve_objectives(config)
    rows = []
    print(f"{'loop':>6} {'compile':>7} {'micro':>5} {'ms/step':>9} {'samples/s':>10} {'x bare':>7} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak GiB':>8}", flush=True)
    for compiled in args.compile:
        for micro_batch in args.micro_batches:
            try:
                measured = measure(config, specs, args, device, micro_batch, compiled == "on")
            except torch.OutOfMemoryError:  # a micro-batch too large for this device: the others still run
                print(f"{'-':>6} {compiled:>7} {micro_batch:>5} out of memory", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            for row in measured:
                rows.append(row)
                mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
                memory = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "-"
                print(f"{row['loop']:>6} {compiled:>7} {micro_batch:>5} {row['step_ms']:>9.1f} "
                      f"{row['samples_per_s']:>10.1f} {row['ratio_to_bare']:>7.3f} {row['tflops_per_s']:>8.3f} "
                      f"{mfu:>6} {memory:>8}", flush=True)
    summary = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__, "config": args.config,
               "overrides": args.overrides, "rows": rows}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
