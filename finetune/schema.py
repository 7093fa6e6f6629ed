"""The fine-tuning experiment schema: what ``finetune/configs/*.yaml`` may contain.

Every task shares these sections: ``model`` (the backbone, the same fields as pretraining, so a
pretraining config's ``model`` section can be pasted in), ``data`` (shards of the train/val/test splits
and training augmentation), ``optim`` (AdamW and the cosine schedule, as pretraining), ``run`` (seed,
logging, evaluation batch size). ``options`` holds the task's own settings; each task validates it
against its ``Options`` dataclass (``finetune/<task>.py``), so a misspelt option is an error there too.
Micro-batch, precision and ZeRO stage come from the DeepSpeed JSON, as in pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.config import require_at_least, require_choice
from pretrain.schema import CROP_MODES, DECODERS, ModelConfig, OptimConfig


@dataclass(frozen=True)
class FinetuneData:
    train: str | None = None                      # shard URLs (brace pattern, '::' list, s3://, hdfs://)
    val: str | None = None
    test: str | None = None
    train_samples: int | None = None              # samples per epoch; default: the train shards' sizes.json
    num_workers: int = 1
    shuffle_buffer: int = 500
    decoder: str = "pil"                          # pil | dali | auto
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_mode: str = "random_resized"             # or mdetr: PEVL's random resize + size crop; none: whole image
    randaugment: bool = True
    hflip: bool = True
    hdfs_command: str = "hdfs dfs -cat"

    def __post_init__(self):
        require_choice(self.decoder, "decoder", DECODERS)
        require_choice(self.crop_mode, "crop_mode", CROP_MODES)
        require_at_least(self.train_samples, "train_samples", 1)
        require_at_least(self.num_workers, "num_workers", 0)
        require_at_least(self.shuffle_buffer, "shuffle_buffer", 0)


@dataclass(frozen=True)
class FinetuneRun:
    output_dir: str = "runs/finetune"
    seed: int = 42
    log_every: int = 50
    max_steps: int | None = None                  # stop training early (the schedule stays that of all epochs)
    eval_batch_size: int = 64
    eval_every_epoch: bool = True                 # evaluate val after each epoch and keep the best

    def __post_init__(self):
        require_at_least(self.log_every, "log_every", 1)
        require_at_least(self.max_steps, "max_steps", 1)
        require_at_least(self.eval_batch_size, "eval_batch_size", 1)


@dataclass(frozen=True)
class FinetuneConfig:
    task: str                                     # retrieval | vqa | nlvr2 | ve | grounding | captioning
    model: ModelConfig = field(default_factory=ModelConfig)
    data: FinetuneData = field(default_factory=FinetuneData)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, warmup_steps=0, epochs=5))
    options: dict = field(default_factory=dict)   # the task's own Options (see its module)
    run: FinetuneRun = field(default_factory=FinetuneRun)
