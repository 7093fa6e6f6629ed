"""The pretraining loop: ``deepspeed [--hostfile F] -m pretrain --config C --deepspeed_config D``.

One step reads top to bottom in ``train()``: batch -> ``engine(batch)`` -> ``engine.backward(loss)``
-> ``engine.step()`` -> log -> maybe checkpoint. Everything method-specific sits in the task module
(``pretrain/tasks``); micro-batch, accumulation, clipping, precision and ZeRO stage come from the
DeepSpeed JSON and are read back from the engine. On this machine (no GPU)::

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 -m pretrain --config pretrain/configs/demo.yaml \\
        --deepspeed_config ds_configs/zero0_fp32.json --max-steps 20

Useful flags: ``--resume auto|none|DIR`` (default auto: continue from the run's ``latest``),
``--max-steps N``, ``--set key.sub=value`` (config overrides), ``--output-dir DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_shards.boxes import TransformConfig
from data_shards.loader import StreamingLoader
from data_shards.reader import Source
from data_shards.sizes import ShardSourceError, check_sources
from pretrain import checkpoint
from pretrain.build import build_task, ds_config_for, lr_schedule, samples_in, seed_everything
from pretrain.config import ConfigError, config_to_dict, load_config, save_config
from pretrain.lockstep import DataFailure, control_group, lockstep_batches
from pretrain.metrics_log import MetricsLog, StepTimer
from pretrain.retrieval_eval import zero_shot_retrieval
from pretrain.safe_loading import UnsafeCheckpointError
from pretrain.schema import PretrainConfig
from pretrain.tasks.albef import parameter_groups
from pretrain.text.batch import TokenizeBatch


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


def resolved_config(args: argparse.Namespace) -> PretrainConfig:
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"run.max_steps={args.max_steps}")
    if args.output_dir is not None:
        overrides.append(f"run.output_dir={args.output_dir}")
    return load_config(PretrainConfig, args.config, overrides)


def make_loader(config: PretrainConfig, micro_batch: int, tokenize: TokenizeBatch, device: str,
                seed: int) -> StreamingLoader:
    data = config.data
    transform = TransformConfig(image_size=config.model.image_size, train=True, crop_scale=data.crop_scale,
                                hflip_prob=0.5 if data.hflip else 0.0,
                                randaugment_ops=2 if data.randaugment else 0)
    rank, world = dist.get_rank(), dist.get_world_size()
    return StreamingLoader([Source(source.urls, source.weight) for source in data.train], transform,
                           batch_size=micro_batch, rank=rank, world_size=world, num_workers=data.num_workers,
                           mode=data.mode, shuffle_buffer=data.shuffle_buffer, seed=seed,
                           decoder=data.decoder, device=device, postprocess=tokenize,
                           hdfs_command=data.hdfs_command)


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


def cpu_thread_notes() -> list[str]:
    """Ranks sharing one CPU machine each get an equal share of its cores (unless OMP_NUM_THREADS says)."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return []
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
    threads = max(1, (os.cpu_count() or 1) // max(local_ranks, 1))
    torch.set_num_threads(threads)
    return [f"CPU run: {threads} torch thread(s) per rank for {local_ranks} local rank(s)"]


def train(args: argparse.Namespace) -> dict:
    config = resolved_config(args)
    output_dir = config.run.output_dir
    checkpoint_dir = os.path.join(output_dir, "checkpoints")
    checkpoint.check_writable(output_dir)
    resume = checkpoint.resolve_resume(args.resume, checkpoint_dir)
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config, notes = ds_config_for(args.deepspeed_config, config.optim)
    micro_batch = ds_config["train_micro_batch_size_per_gpu"]
    accumulation = ds_config.get("gradient_accumulation_steps", 1)
    if not config.data.train:
        raise ConfigError("data.train lists no shard source; add one with `urls: path/train-{000000..000099}.tar`")
    try:  # a missing or uncountable source stops the run here, before any step, with the pattern named
        check_sources([source.urls for source in config.data.train], mode=config.data.mode)
        samples_per_epoch = config.data.samples_per_epoch or sum(samples_in(source.urls)
                                                                 for source in config.data.train)
    except ShardSourceError as error:
        raise ConfigError(f"data.train: {error}") from None
    steps_per_epoch = samples_per_epoch // (micro_batch * world * accumulation)
    if steps_per_epoch < 1:
        raise ConfigError(f"{samples_per_epoch} samples per epoch give no full step of {micro_batch} x {world} "
                          f"ranks x {accumulation} accumulation")
    schedule_steps = config.optim.epochs * steps_per_epoch
    # --max-steps stops the run early; the LR schedule stays that of the whole run, so a run stopped and
    # resumed with another --max-steps follows the same curve.
    total_steps = min(schedule_steps, config.run.max_steps or schedule_steps)

    # The same seed on every rank while building: DeepSpeed broadcasts rank 0's parameters, but not the
    # momentum copies or the queues' random start, which must match across ranks too.
    seed_everything(config.run.seed)
    task, tokenizer = build_task(config, micro_batch * world, steps_per_epoch * accumulation)
    seed_everything(config.run.seed + rank)  # then per rank: dropout, masking, negatives differ
    trusted = args.trust_checkpoint
    engine_tag = checkpoint.prepare_world_size_change(*resume, world, ds_config, trusted) if resume else None
    engine, _, _, _ = deepspeed.initialize(
        model=task, model_parameters=parameter_groups(task, config.optim.weight_decay), config=ds_config,
        lr_scheduler=lambda optimizer: lr_schedule(optimizer, config.optim, steps_per_epoch, schedule_steps))
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
    loader = make_loader(config, micro_batch, TokenizeBatch(tokenizer), device_type, loader_seed)
    if loader_state is not None:
        loader.load_state_dict(loader_state)
    if rank == 0:
        save_config(config, os.path.join(output_dir, "config.yaml"))
    config_yaml = Path(output_dir, "config.yaml").read_text() if rank == 0 else ""

    timer = StepTimer(engine, samples_per_step=micro_batch * world * accumulation, accumulation=accumulation)
    batches = lockstep_batches(loader, control_group())
    progress = tqdm(total=total_steps, initial=engine.global_steps, disable=rank != 0, desc="pretrain",
                    unit="step", file=sys.stderr)
    losses = {}
    step = engine.global_steps
    engine.train()
    while engine.global_steps < total_steps:
        timer.wait_start()
        batch = next(batches, None)
        if batch is None:
            break
        batch = to_device(batch, engine.device)
        timer.compute_start()

        with timer.flop_counter():
            losses = engine(batch)
            engine.backward(losses["loss"])
        engine.step()

        if engine.global_steps == step:
            continue  # inside a gradient accumulation window
        step = engine.global_steps
        progress.update(1)
        timer.step_end()
        if step % config.run.log_every == 0 or step == total_steps:
            record = {name: value.item() for name, value in losses.items()}
            record.update(timer.report(), lr=engine.get_lr()[0], alpha=task.current_alpha(),
                          temp=task.model.temp.item(), skipped=dict(loader.skipped), epoch=loader.epoch)
            log.write(step, record, keys=batch["__key__"] if config.run.log_keys else None)
            progress.set_postfix(loss=f"{record['loss']:.3f}")
        if step % config.run.save_every == 0 or step == total_steps:
            checkpoint.save_checkpoint(
                engine, checkpoint_dir, step, keep=config.run.keep_checkpoints, config_yaml=config_yaml,
                client_state={"step": step, "loader": loader.state_dict(), "rng": checkpoint.rng_states()},
                task_state=task.extra_state_dict())
    progress.close()
    summary = {"steps": engine.global_steps, "seconds": timer.elapsed(),
               "final_loss": {name: value.item() for name, value in losses.items()}}
    if config.eval.retrieval_urls:
        summary["zero_shot_retrieval"] = zero_shot_retrieval(
            task.model, tokenizer, config.eval.retrieval_urls, config.model.image_size, config.eval.batch_size)
        log.note("zero-shot retrieval: " + json.dumps(summary["zero_shot_retrieval"]))
    if rank == 0:
        with open(os.path.join(output_dir, "results.json"), "w") as handle:
            json.dump({**summary, "config": config_to_dict(config)}, handle, indent=2)
    log.close()
    return summary


def is_first_rank() -> bool:
    """Rank 0 of the launch (from the launcher's ``RANK``; true for a plain single process), before or after
    ``torch.distributed`` is set up."""
    return int(os.environ.get("RANK", "0")) == 0


def release_shared_memory() -> None:
    """Unlink this rank's CPU all-reduce buffer (``/dev/shm/deepspeed_allreduce_buffer_*_ADDR_PORT_RANK``).

    DeepSpeed's CPU communication backend never removes it, so every CPU run would leave 66 MB per rank in
    /dev/shm. The mapping stays valid until the process exits; only the name goes."""
    address, port, rank = (os.environ.get(name) for name in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    if torch.cuda.is_available() or None in (address, port, rank):
        return
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{address}_{port}_{rank}"):
        with contextlib.suppress(OSError):
            os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = train(args)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except (checkpoint.ResumeError, checkpoint.OutputNotWritable, UnsafeCheckpointError, DataFailure) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if not isinstance(error, DataFailure) else 1
    finally:
        release_shared_memory()
    if dist.is_initialized():
        dist.barrier()
    if is_first_rank():
        print(f"done: {summary['steps']} steps in {summary['seconds']:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
