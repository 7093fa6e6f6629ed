"""The pretraining loop: ``deepspeed [--hostfile F] -m pretrain --config C --deepspeed_config D``.

One step reads top to bottom in ``train()``: batch -> ``engine(batch)`` -> ``engine.backward(loss)``
-> ``engine.step()`` -> log -> maybe checkpoint. The loop names no method: the method's recipe
(``pretrain/methods.py``) gives the batch adapter, transforms and extra data streams, the task
(``pretrain/task.py``) composes the backbone with the listed objectives (``pretrain/objectives``), and the
loop talks to it through ``set_step``, ``place``, ``log_values`` and the extra state of checkpoints.
Micro-batch, accumulation, clipping, precision and ZeRO stage come from the DeepSpeed JSON and are read
back from the engine. On this machine (no GPU)::

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 -m pretrain --config pretrain/configs/demo.yaml \\
        --deepspeed_config ds_configs/zero0_fp32.json --max-steps 20

Useful flags: ``--resume auto|none|DIR`` (default auto: continue from the run's ``latest``),
``--max-steps N``, ``--set key.sub=value`` (config overrides), ``--output-dir DIR``, ``--trust-checkpoint``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import deepspeed
import torch.distributed as dist
from tqdm import tqdm

from data_shards.sizes import ShardSourceError, check_sources
from pretrain import checkpoint
from pretrain.build import build_task, samples_in, seed_everything
from pretrain.config import ConfigError, config_to_dict, load_config, save_config
from pretrain.engine import ds_config_for, plan_steps, start_engine
from pretrain.lockstep import DataFailure, control_group
from pretrain.methods import ObjectiveSpec, method_of, resolve_objectives
from pretrain.metrics_log import MetricsLog, StepTimer
from pretrain.retrieval_eval import zero_shot_retrieval
from pretrain.runtime import compile_blocks, cpu_thread_notes, is_first_rank, release_shared_memory, to_device
from pretrain.safe_loading import UnsafeCheckpointError
from pretrain.schema import PretrainConfig
from pretrain.streams import TrainingBatches, make_loader


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description="ALBEF-family pretraining on DeepSpeed")
    parser.add_argument("--config", required=True, help="experiment YAML (pretrain/configs/*.yaml)")
    parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (ds_configs/*.json)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="set by the deepspeed launcher")
    parser.add_argument("--resume", default="auto", help="auto (default), none, or a checkpoint directory")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="open the resumed checkpoint's pickles with the full unpickler (only for files you trust)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    parser.add_argument("--output-dir", default=None, help="overrides run.output_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. --set optim.lr=2e-4)")
    return parser.parse_args(argv)


def resolved_config(args: argparse.Namespace) -> tuple[PretrainConfig, list[ObjectiveSpec]]:
    """The experiment with its overrides, and its objectives, all validated before any rank starts."""
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"run.max_steps={args.max_steps}")
    if args.output_dir is not None:
        overrides.append(f"run.output_dir={args.output_dir}")
    config = load_config(PretrainConfig, args.config, overrides)
    return config, resolve_objectives(config)


def samples_per_epoch(config: PretrainConfig) -> int:
    """Check every shard source up front, then count an epoch (``data.samples_per_epoch`` or the sizes.json)."""
    data = config.data
    if not data.train:
        raise ConfigError("data.train lists no shard source; add one with `urls: path/train-{000000..000099}.tar`")
    where = "data.train"
    try:  # a missing or uncountable source stops the run here, before any step, with the pattern named
        check_sources([source.urls for source in data.train], mode=data.mode)
        for name, stream in data.streams.items():
            where = f"data.streams.{name}.train"
            check_sources([source.urls for source in stream.train], mode=data.mode)
        where = "data.train"
        return data.samples_per_epoch or sum(samples_in(source.urls) for source in data.train)
    except ShardSourceError as error:
        raise ConfigError(f"{where}: {error}") from None


def train(args: argparse.Namespace) -> dict:
    config, specs = resolved_config(args)
    method = method_of(config)
    output_dir = config.run.output_dir
    checkpoint_dir = os.path.join(output_dir, "checkpoints")
    checkpoint.check_writable(output_dir)
    resume = checkpoint.resolve_resume(args.resume, checkpoint_dir)
    epoch_samples = samples_per_epoch(config)
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config, notes = ds_config_for(args.deepspeed_config, config.optim)
    plan = plan_steps(ds_config, epoch_samples, world, config.optim, config.run.max_steps)

    # The same seed on every rank while building: DeepSpeed broadcasts rank 0's parameters, but not the
    # momentum copies or the queues' random start, which must match across ranks too.
    seed_everything(config.run.seed)
    task, tokenizer = build_task(config, specs, plan)
    if config.model.compile:
        compile_blocks(task.model, *(task.momentum.modules.values() if task.momentum is not None else ()))
    seed_everything(config.run.seed + rank)  # then per rank: dropout, masking, negatives differ
    trusted = args.trust_checkpoint
    engine_tag = checkpoint.prepare_world_size_change(*resume, world, ds_config, trusted) if resume else None
    engine = start_engine(task, task.parameter_groups(config.optim.weight_decay), ds_config, config.optim, plan)
    task.place(engine.device)
    device_type = "gpu" if engine.device.type == "cuda" else "cpu"

    log = MetricsLog(output_dir, enabled=rank == 0, resumed_at=checkpoint.tag_step(resume[1]) if resume else None)
    for note in notes + cpu_thread_notes():
        log.note(note)
    loader_seed, loader_state = config.run.seed, None
    if resume is not None:
        client_state, task_state = checkpoint.load_checkpoint(engine, *resume, engine_tag=engine_tag, trusted=trusted)
        task.load_extra_state_dict(task_state)
        saved_world = checkpoint.saved_world_size(*resume)
        if saved_world in (0, world) and "loader" in client_state:
            loader_state = client_state["loader"]
            checkpoint.restore_rng_states(client_state["rng"])
        elif saved_world != world:
            # The saved per-rank positions and RNG streams do not map onto other ranks: every rank starts
            # a fresh stream in the saved epoch under a seed moved on by the step (exact mode deals that
            # epoch anew over the new ranks, from its start; resampled mode draws anew).
            loader_seed = config.run.seed + engine.global_steps
            epoch = checkpoint.read_client_state(*resume, rank=0, trusted=trusted).get("loader", {}).get("epoch", 0)
            loader_state = {"epoch": epoch, "batches_in_epoch": 0, "slots": {}}
            seed_everything(loader_seed + rank)
            log.note(f"world size {saved_world} -> {world}: optimizer state from {engine_tag}; data streams "
                     f"restart in epoch {epoch} with seed {loader_seed}")
        log.note(f"resumed from {os.path.join(*resume)} at step {engine.global_steps}")
    def loader(sources, recipe, batch_size=None):  # the main stream and each extra stream, adapted by the recipe
        return make_loader(sources, config.data, config.model.image_size, batch_size or plan.micro_batch, rank=rank,
                           world_size=world, device=device_type, seed=loader_seed,
                           postprocess=recipe.batch_adapter(tokenizer, config), transform=recipe.transform)

    extra = {name: (loader(stream.train, method.streams[name], stream.batch_size), stream.probability)
             for name, stream in config.data.streams.items()}
    batches = TrainingBatches(loader(config.data.train, method), extra, seed=loader_seed, group=control_group())
    if loader_state is not None:
        batches.load_state_dict(loader_state)
    if rank == 0:
        save_config(config, os.path.join(output_dir, "config.yaml"))
    config_yaml = Path(output_dir, "config.yaml").read_text() if rank == 0 else ""

    timer = StepTimer(engine, samples_per_step=plan.samples_per_step, accumulation=plan.accumulation)
    progress = tqdm(total=plan.total_steps, initial=engine.global_steps, disable=rank != 0, desc="pretrain",
                    unit="step", file=sys.stderr)
    losses = {}
    step = engine.global_steps
    engine.train()
    while engine.global_steps < plan.total_steps:
        timer.wait_start()
        batch = to_device(next(batches), engine.device)
        timer.compute_start()

        task.set_step(engine.global_steps)
        with timer.flop_counter():
            losses = engine(batch)
            engine.backward(losses["loss"])
        engine.step()

        if engine.global_steps == step:
            continue  # inside a gradient accumulation window
        step = engine.global_steps
        progress.update(1)
        timer.step_end()
        if step % config.run.log_every == 0 or step == plan.total_steps:
            record = {name: value.item() for name, value in losses.items()}
            record.update(timer.report(), lr=engine.get_lr()[0], **task.log_values(), skipped=dict(batches.skipped),
                          epoch=batches.epoch)
            log.write(step, record, keys=batch["__key__"] if config.run.log_keys else None)
            progress.set_postfix(loss=f"{record['loss']:.3f}")
        if step % config.run.save_every == 0 or step == plan.total_steps:
            checkpoint.save_checkpoint(
                engine, checkpoint_dir, step, keep=config.run.keep_checkpoints, config_yaml=config_yaml,
                client_state={"step": step, "loader": batches.state_dict(), "rng": checkpoint.rng_states()},
                task_state=task.extra_state_dict())
    progress.close()
    summary = {"steps": engine.global_steps, "seconds": timer.elapsed(),
               "final_loss": {name: value.item() for name, value in losses.items()}}
    if config.eval.retrieval_urls:
        summary["zero_shot_retrieval"] = zero_shot_retrieval(
            task.model, tokenizer, config.eval.retrieval_urls, config.model.image_size, config.eval.batch_size,
            config.model.concepts)
        log.note("zero-shot retrieval: " + json.dumps(summary["zero_shot_retrieval"]))
    if rank == 0:
        with open(os.path.join(output_dir, "results.json"), "w") as handle:
            json.dump({**summary, "config": config_to_dict(config)}, handle, indent=2)
    log.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = train(args)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except (checkpoint.ResumeError, checkpoint.OutputNotWritable, UnsafeCheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DataFailure as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        release_shared_memory()
    if dist.is_initialized():
        dist.barrier()
    if is_first_rank():
        print(f"done: {summary['steps']} steps in {summary['seconds']:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
