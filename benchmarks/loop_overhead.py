"""Step time of our DeepSpeed pretraining step against a plain PyTorch loop, same model, same batches.

    DS_ACCELERATOR=cpu python benchmarks/loop_overhead.py [--steps 20] [--config pretrain/configs/demo.yaml]

Both loops run the same ALBEF task module (built under one seed) on the same pre-decoded batches in
one process, alternating in rounds so that machine noise hits both alike:
- plain: ``loss = task(batch)["loss"]; loss.backward(); optimizer.step(); optimizer.zero_grad()`` with
  torch AdamW and the same parameter groups;
- ours: ``engine(batch)`` -> ``engine.backward`` -> ``engine.step`` with ``ds_configs/zero0_fp32.json``
  (torch AdamW on CPU), i.e. the step ``python -m pretrain`` runs, without data loading and logging.
Prints the median step time of each and their ratio (goal: ours / plain <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_shards.boxes import TransformConfig  # noqa: E402
from data_shards.loader import StreamingLoader  # noqa: E402
from pretrain.build import build_task, ds_config_for, seed_everything  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.schema import PretrainConfig  # noqa: E402
from pretrain.tasks.albef import parameter_groups  # noqa: E402
from pretrain.text.batch import TokenizeBatch  # noqa: E402


def timed_steps(step, batches, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        for batch in batches:
            start = time.perf_counter()
            step(batch)
            times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="pretrain/configs/demo.yaml")
    parser.add_argument("--shards", default="runs/demo/shards/pretrain/pretrain-{000000..000007}.tar")
    parser.add_argument("--deepspeed_config", default="ds_configs/zero0_fp32.json")
    parser.add_argument("--steps", type=int, default=10, help="batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed

    deepspeed.init_distributed()
    config = load_config(PretrainConfig, args.config)
    ds_config, _ = ds_config_for(args.deepspeed_config, config.optim)
    micro = ds_config["train_micro_batch_size_per_gpu"]

    seed_everything(0)
    plain_task, tokenizer = build_task(config, micro, 100)
    seed_everything(0)
    engine_task, _ = build_task(config, micro, 100)
    engine, _, _, _ = deepspeed.initialize(model=engine_task, config=ds_config,
                                           model_parameters=parameter_groups(engine_task, config.optim.weight_decay))
    optimizer = torch.optim.AdamW(parameter_groups(plain_task, config.optim.weight_decay), lr=config.optim.lr)

    loader = StreamingLoader(args.shards, TransformConfig(image_size=config.model.image_size), batch_size=micro,
                             num_workers=0, mode="resampled", decoder="pil", postprocess=TokenizeBatch(tokenizer))
    stream = iter(loader)
    batches = [next(stream) for _ in range(args.steps)]

    def plain_step(batch):
        loss = plain_task(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def engine_step(batch):
        loss = engine(batch)["loss"]
        engine.backward(loss)
        engine.step()

    plain_task.train()
    engine.train()
    plain_times, engine_times = [], []
    timed_steps(plain_step, batches[:2], 1)  # warm-up both
    timed_steps(engine_step, batches[:2], 1)
    for _ in range(args.rounds):
        plain_times += timed_steps(plain_step, batches, 1)
        engine_times += timed_steps(engine_step, batches, 1)
    result = {"plain_ms": 1000 * statistics.median(plain_times), "ours_ms": 1000 * statistics.median(engine_times),
              "steps": len(plain_times), "micro_batch": micro, "threads": torch.get_num_threads()}
    result["ratio"] = result["ours_ms"] / result["plain_ms"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
