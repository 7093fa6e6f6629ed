"""The one fine-tuning loop every task runs: ``python -m finetune.<task> --config C --checkpoint P [--evaluate]``.

A task module (``finetune/<task>.py``) hands ``run`` a :class:`TaskSpec`: its ``Options`` dataclass, a
builder for its task module (backbone + head), a batch adapter (what the loader workers add to each
batch: tokens, labels, boxes), an evaluation function and the name of the metric the best checkpoint is
chosen by. The loop itself is the pretraining step with an evaluation after each epoch:

    batch -> engine(batch) -> engine.backward(loss) -> engine.step() -> log
    end of epoch: evaluate val -> keep the best (DeepSpeed tag ``best``) -> at the end, test with the best

It runs under ``deepspeed`` (any ZeRO stage, any number of ranks) or as a plain single process (the
rendezvous variables are filled in for a world of one). ``--evaluate`` skips training and scores the
test split (or val when there is no test) with the checkpoint given. Results land in
``OUTPUT/results.json``: the config, the checkpoint, every metric of val and test, and the seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_shards.boxes import TransformConfig
from data_shards.loader import StreamingLoader
from data_shards.reader import ShardReader, Source
from data_shards.sizes import ShardSourceError, SizesUnknown, check_sources
from data_shards.transforms import PilTransform, collate
from finetune import checkpoints
from finetune.schema import FinetuneConfig
from pretrain.build import build_backbone, samples_in, seed_everything
from pretrain.checkpoint import OutputNotWritable, atomic_write_text, check_writable
from pretrain.config import ConfigError, config_to_dict, from_mapping, load_config, save_config
from pretrain.engine import StepPlan, ds_config_for, plan_steps, start_engine
from pretrain.lockstep import DataFailure, control_group, lockstep_batches
from pretrain.metrics_log import MetricsLog
from pretrain.models.concepts import ConceptBatch, WithConcepts
from pretrain.models.swin import fit_vision_state
from pretrain.runtime import cpu_thread_notes, is_first_rank, release_shared_memory, to_device
from pretrain.safe_loading import restricted_unpickling
from pretrain.task import parameter_groups

DEFAULT_DS_CONFIG = "ds_configs/zero0_fp32.json"
BEST_TAG = "best"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    options: type                                    # the task's Options dataclass
    build: Callable                                  # (model, tokenizer, options) -> task module
    adapter: Callable                                # (tokenizer, options, train: bool) -> batch postprocess
    evaluate: Callable                               # (EvalContext) -> metrics dict (same on every rank)
    metric: str                                      # the metric that picks the best epoch (higher is better)
    new_keys: tuple[str, ...] = ()                   # task-module keys a pretraining checkpoint lacks (heads)
    unused_keys: tuple[str, ...] = ()                # pretraining keys the task ignores
    transform: dict | None = None                    # extra TransformConfig fields (e.g. flip_text)


@dataclass
class EvalContext:
    """What an evaluation function gets: the task module, the split, and how to read it."""

    module: torch.nn.Module
    urls: str
    split: str
    options: object
    tokenizer: object
    image_size: int
    batch_size: int
    adapter: Callable
    transform: dict
    output_dir: str = ""                             # the run's folder, for result files (e.g. EvalAI JSON)

    def predictions(self) -> list[dict]:
        """``module.predict(batch)`` over the whole split, ranks sharing the samples, gathered on every rank."""
        return predict_split(self)


class DataError(ValueError):
    """A split that cannot be used (empty, missing a field); the message names the split or record."""


def parse_args(task: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m finetune.{task}", description=f"fine-tune and evaluate {task}")
    parser.add_argument("--config", required=True, help=f"experiment YAML (finetune/configs/{task}_*.yaml)")
    parser.add_argument("--checkpoint", required=True,
                        help="pretraining checkpoint dir (any ZeRO stage), exported .safetensors, ALBEF .pth, "
                             "or a fine-tuned run's checkpoints (with --evaluate)")
    parser.add_argument("--evaluate", action="store_true", help="only evaluate the checkpoint")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="open the checkpoint's pickles with the full unpickler (only for files you trust)")
    parser.add_argument("--deepspeed_config", default=DEFAULT_DS_CONFIG, help="DeepSpeed JSON (ds_configs/*.json)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser.add_argument("--output-dir", default=None, help="overrides run.output_dir")
    parser.add_argument("--max-steps", type=int, default=None, help="stop training after N optimizer steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. --set optim.lr=1e-5)")
    return parser.parse_args(argv)


def _single_process_rendezvous() -> None:
    """``python -m finetune.X`` without a launcher: a world of one on this machine."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def eval_transform(image_size: int, extra: dict | None) -> TransformConfig:
    return TransformConfig(image_size=image_size, train=False, **(extra or {}))


def _has_samples(urls: str) -> bool:
    """Whether a split holds a sample: from its ``sizes.json`` when there is one, else by reading up to one."""
    try:
        return samples_in(urls) > 0
    except SizesUnknown:
        return next(iter(ShardReader(urls, rank=0, world_size=1, shard_shuffle=False)), None) is not None


def require_samples(splits: dict[str, str | None]) -> None:
    """Fail before any training when a configured split is missing or empty (``{name: urls}``; None = not
    configured). Training reads resampled, so only evaluation splits need every shard."""
    for split, urls in splits.items():
        if not urls:
            continue
        try:
            check_sources(urls, mode="resampled" if split == "train" else "exact")
        except ShardSourceError as error:
            raise DataError(f"data.{split}: {error}") from None
        if not _has_samples(urls):
            raise DataError(f"{split} split {urls!r} holds no sample")


def predict_split(context: EvalContext) -> list[dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        total = samples_in(context.urls)
    except SizesUnknown:
        total = sum(1 for _ in ShardReader(context.urls, rank=0, world_size=1, shard_shuffle=False))
    if total == 0:
        raise DataError(f"{context.split} split {context.urls!r} holds no sample")
    # Every rank runs the same number of batches (ZeRO-3 forwards are collective): ranks with fewer samples
    # repeat a batch and drop its predictions.
    batches = max(1, math.ceil(math.ceil(total / world) / context.batch_size))
    transform = PilTransform(eval_transform(context.image_size, context.transform))
    reader = ShardReader(context.urls, rank=0, world_size=1, shard_shuffle=False)
    mine = (sample for index, sample in enumerate(reader) if index % world == rank)
    device = next(context.module.parameters()).device
    outputs, last = [], None
    was_training = context.module.training
    context.module.eval()
    with torch.no_grad():
        for _ in tqdm(range(batches), desc=f"eval {context.split}", disable=rank != 0, file=sys.stderr):
            chunk = [transform(sample) for _, sample in zip(range(context.batch_size), mine, strict=False)]
            real = bool(chunk)
            if real:
                last = chunk
            elif last is None:  # a rank with no sample at all still takes part with the split's first one
                first = next(iter(ShardReader(context.urls, rank=0, world_size=1, shard_shuffle=False)))
                last = [transform(first)]
            batch = context.adapter(collate(chunk if real else last))
            predictions = context.module.predict(to_device(batch, device))
            if real:
                outputs.extend(predictions)
    context.module.train(was_training)
    gathered = [None] * world
    dist.all_gather_object(gathered, outputs)
    # Checked after the gather, on every rank alike, so that a short rank stops all of them instead of leaving
    # the others waiting in the next collective.
    for other, part in enumerate(gathered):
        expected = len(range(other, total, world))
        if len(part) != expected:
            raise DataError(f"{context.split} split {context.urls!r}: rank {other} predicted {len(part)} of its "
                            f"{expected} samples (is a sizes.json beside the shards out of date?)")
    return [prediction for part in gathered for prediction in part]


def task_adapter(spec: TaskSpec, tokenizer, options, train: bool, config: FinetuneConfig):
    """The task's batch adapter, plus every image's concept tokens when the backbone reads concepts (ViCHA)."""
    adapter = spec.adapter(tokenizer, options, train)
    if config.model.concepts.enabled:
        return WithConcepts(adapter, ConceptBatch(tokenizer, config.model.concepts, train))
    return adapter


def _train_loader(config: FinetuneConfig, spec: TaskSpec, adapter, micro_batch: int) -> StreamingLoader:
    data = config.data
    transform = TransformConfig(image_size=config.model.image_size, train=True, crop_scale=data.crop_scale,
                                crop_mode=data.crop_mode, hflip_prob=0.5 if data.hflip else 0.0,
                                randaugment_ops=2 if data.randaugment else 0,
                                **(spec.transform or {}))
    return StreamingLoader([Source(data.train)], transform, batch_size=micro_batch, rank=dist.get_rank(),
                           world_size=dist.get_world_size(), num_workers=data.num_workers, mode="resampled",
                           shuffle_buffer=data.shuffle_buffer, seed=config.run.seed, decoder=data.decoder,
                           postprocess=adapter, hdfs_command=data.hdfs_command)


def load_weights(task_module, spec: TaskSpec, config: FinetuneConfig, path: str, log: MetricsLog,
                 trusted: bool = False) -> str:
    source = checkpoints.open_checkpoint(path, trusted)
    if source.kind == "finetune":
        checkpoints.load_matching(task_module, checkpoints.task_state(source), source=source.describe())
    else:
        visual_encoder = task_module.model.visual_encoder
        state = checkpoints.backbone_state(source, visual_encoder.num_patches,
                                           keep_objectives=getattr(task_module, "pretrained_objectives", ()))
        state = fit_vision_state(visual_encoder, state)  # a Swin's windows at this resolution (ViTs: unchanged)
        checkpoints.check_concepts(state, config.model.concepts.enabled, source.describe())
        # Backbone keys are ALBEF's names; a task module holds the backbone as ``model`` and may map some
        # keys itself (VQA's answer decoder starts from the fusion layers, NLVR2 duplicates them).
        if hasattr(task_module, "backbone_to_task"):
            state = task_module.backbone_to_task(state)
        else:
            state = {f"model.{name}": value for name, value in state.items()}
        report = checkpoints.load_matching(task_module, state, new=spec.new_keys, unused=spec.unused_keys,
                                           source=source.describe())
        # What the task starts untrained (its heads): X-VLM trains these at lr x optim.lr_mult.
        task_module.new_parameters = frozenset(report.expected_missing)
        log.note(f"loaded {source.describe()}: {len(report.expected_missing)} new task keys, "
                 f"{len(report.dropped)} checkpoint keys unused")
    return source.describe()


def evaluate_split(spec: TaskSpec, engine, options, tokenizer, config: FinetuneConfig, split: str, urls: str) -> dict:
    context = EvalContext(module=engine.module, urls=urls, split=split, options=options, tokenizer=tokenizer,
                          image_size=config.model.image_size, batch_size=config.run.eval_batch_size,
                          adapter=task_adapter(spec, tokenizer, options, False, config), transform=spec.transform or {},
                          output_dir=config.run.output_dir)
    return spec.evaluate(context)


def finetune(spec: TaskSpec, args: argparse.Namespace) -> dict:
    started = time.time()
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"run.max_steps={args.max_steps}")
    config = load_config(FinetuneConfig, args.config, overrides)
    if config.task != spec.name:
        raise ConfigError(f"{args.config} is a config for task {config.task!r}; run python -m finetune.{config.task}")
    options = from_mapping(spec.options, config.options, "options")
    if not args.evaluate and not config.data.train:
        raise ConfigError("data.train is empty: give the train split's shards (or pass --evaluate)")
    data = config.data
    splits = {} if args.evaluate else {"train": data.train, "val": data.val}
    require_samples({**splits, **({"test": data.test} if data.test else {"val": data.val})})
    output_dir = config.run.output_dir
    check_writable(output_dir)
    _single_process_rendezvous()
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    checkpoint_dir = os.path.join(output_dir, "checkpoints")
    ds_config, notes = ds_config_for(args.deepspeed_config, config.optim)
    log = MetricsLog(output_dir, enabled=rank == 0, label=f"finetune.{spec.name}")
    for note in notes + cpu_thread_notes():
        log.note(note)

    seed_everything(config.run.seed)
    model, tokenizer = build_backbone(config.model)
    task_module = spec.build(model, tokenizer, options)
    checkpoint_used = load_weights(task_module, spec, config, args.checkpoint, log, args.trust_checkpoint)
    seed_everything(config.run.seed + rank)

    one_step = ds_config["train_micro_batch_size_per_gpu"] * world * ds_config.get("gradient_accumulation_steps", 1)
    samples = one_step if args.evaluate else (
        config.data.train_samples or samples_in(config.data.train, setting="data.train_samples"))
    plan = plan_steps(ds_config, samples, world, config.optim, config.run.max_steps)
    optim = config.optim
    groups = parameter_groups(task_module, optim.weight_decay, rule=optim.no_decay,
                              new=getattr(task_module, "new_parameters", frozenset()),
                              new_lr=optim.lr * optim.lr_mult if optim.lr_mult != 1 else None)
    engine = start_engine(task_module, groups, ds_config, config.optim, plan)
    if rank == 0:
        save_config(config, os.path.join(output_dir, "config.yaml"))
    dist.barrier()
    results = {"task": spec.name, "checkpoint": checkpoint_used, "metric": spec.metric, "world_size": world}
    if not args.evaluate:
        results.update(train(spec, engine, config, options, tokenizer, plan, log,
                             checkpoint_dir))
    final_split, final_urls = ("test", config.data.test) if config.data.test else ("val", config.data.val)
    if not final_urls:
        raise ConfigError("neither data.test nor data.val is set: nothing to evaluate on")
    results[final_split] = evaluate_split(spec, engine, options, tokenizer, config, final_split, final_urls)
    log.note(f"{final_split}: " + json.dumps(results[final_split]))
    results["seconds"] = time.time() - started
    results["config"] = config_to_dict(config)
    if rank == 0:
        atomic_write_text(os.path.join(output_dir, "results.json"), json.dumps(results, indent=2, default=str))
    log.close()
    return results


def train(spec, engine, config, options, tokenizer, plan: StepPlan, log, checkpoint_dir) -> dict:
    rank = dist.get_rank()
    loader = _train_loader(config, spec, task_adapter(spec, tokenizer, options, True, config), plan.micro_batch)
    total_steps, steps_per_epoch = plan.total_steps, plan.steps_per_epoch
    progress = tqdm(total=total_steps, disable=rank != 0, desc=f"finetune {spec.name}", unit="step", file=sys.stderr)
    best, history, losses = None, [], {}
    batches = lockstep_batches(loader, control_group())
    engine.train()
    step = 0
    while step < total_steps:
        batch = to_device(next(batches), engine.device)
        losses = engine(batch)
        engine.backward(losses["loss"])
        engine.step()
        if engine.global_steps == step:
            continue
        step = engine.global_steps
        progress.update(1)
        if step % config.run.log_every == 0 or step == total_steps:
            record = {name: value.item() for name, value in losses.items()}
            record.update(lr=engine.get_lr()[0], skipped=dict(loader.skipped))
            log.write(step, record)
            progress.set_postfix(loss=f"{record['loss']:.3f}")
        end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
        if end_of_epoch and config.data.val and (config.run.eval_every_epoch or step == total_steps):
            metrics = evaluate_split(spec, engine, options, tokenizer, config, "val", config.data.val)
            history.append({"step": step, **metrics})
            log.note(f"step {step} val: " + json.dumps(metrics))
            if best is None or metrics[spec.metric] > best[spec.metric]:
                best = {"step": step, **metrics}
                engine.save_checkpoint(checkpoint_dir, tag=BEST_TAG, save_latest=False)
                if rank == 0:
                    shutil.copyfile(os.path.join(config.run.output_dir, "config.yaml"),
                                    os.path.join(checkpoint_dir, BEST_TAG, "config.yaml"))
                    atomic_write_text(os.path.join(checkpoint_dir, "latest"), BEST_TAG)
                dist.barrier()
    progress.close()
    if best is not None and best["step"] != step:
        with restricted_unpickling(where=os.path.join(checkpoint_dir, BEST_TAG)):
            engine.load_checkpoint(checkpoint_dir, tag=BEST_TAG, load_module_only=True, load_optimizer_states=False,
                                   load_lr_scheduler_states=False)
    return {"steps": step, "final_loss": {name: value.item() for name, value in losses.items()},
            "val": best, "val_history": history}


def run(spec: TaskSpec, argv: list[str] | None = None) -> int:
    args = parse_args(spec.name, sys.argv[1:] if argv is None else argv)
    try:
        results = finetune(spec, args)
    except (ConfigError, checkpoints.CheckpointError, DataError, ShardSourceError, OutputNotWritable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DataFailure as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        release_shared_memory()
    if dist.is_initialized():
        dist.barrier()
    final = results.get("test") or results.get("val") or {}
    if is_first_rank():
        print(f"done: {spec.name} {spec.metric}={final.get(spec.metric)} in {results['seconds']:.1f}s",
              file=sys.stderr)
    return 0
