"""Methods as recipes: one table maps ``method:`` in a pretraining config to what that method brings.

A recipe names the objectives a method runs when the config lists none, the batch adapter that the loader
workers apply to every batch (cleaning, tokenisation, any extra tensors the method's objectives read), the
transform options its images need (region crop, careful flip) and the extra data streams it draws besides
the image-text batches (X-VLM's region batches). ``pretrain/train.py`` reads a recipe and names nothing of
any method itself::

    recipe = METHODS[config.method]
    specs = resolve_objectives(config)        # the recipe's objectives updated by the config's, validated
    adapter = recipe.batch_adapter(tokenizer, config)

Adding a method is one entry here plus its config (``pretrain/configs/<method>.yaml``); see the README's
"Adding a method".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pretrain.config import ConfigError, from_mapping
from pretrain.models.concepts import CaptionsAndConcepts
from pretrain.objectives import objective_class
from pretrain.objectives.base import Objective
from pretrain.schema import PretrainConfig
from pretrain.text.batch import TokenizeBatch
from pretrain.text.pevl_batch import pevl_batch
from pretrain.xvlm_recipe import REGION_STREAM, RegionStreamOptions, xvlm_batch, xvlm_region_batch

# Keys of an ``objectives.<name>`` entry that the task applies itself; every other key is the objective's.
COMMON_KEYS = ("weight", "start_step", "class_path")


@dataclass(frozen=True)
class Stream:
    """An extra data stream of a method: batches of ``data.streams.<name>`` shards, adapted its own way."""

    batch_adapter: Callable                        # (tokenizer, config) -> callable on a collated batch
    transform: dict = field(default_factory=dict)  # extra data_shards.boxes.TransformConfig fields
    options: type | None = None                    # dataclass of data.streams.<name>.options, checked strictly


@dataclass(frozen=True)
class Method:
    objectives: dict[str, dict]                    # default objectives: name -> entry (as in the YAML); a config
                                                   # updates them, adds others, or drops one with weight: 0
    batch_adapter: Callable                        # (tokenizer, config) -> callable on a collated batch
    transform: dict = field(default_factory=dict)  # extra data_shards.boxes.TransformConfig fields
    streams: dict[str, Stream] = field(default_factory=dict)


def albef_batch(tokenizer, config: PretrainConfig) -> TokenizeBatch:
    """ALBEF's caption cleaning and ``[CLS] x`` tokenisation, in the loader workers."""
    return TokenizeBatch(tokenizer)


def vicha_batch(tokenizer, config: PretrainConfig):
    """ALBEF's captions, plus each image's visual-concept tokens when the backbone reads them."""
    if not config.model.concepts.enabled:
        return TokenizeBatch(tokenizer)
    return CaptionsAndConcepts(tokenizer, config.model.concepts)


METHODS: dict[str, Method] = {
    "albef": Method(objectives={"itc": {}, "itm": {}, "mlm": {}}, batch_adapter=albef_batch),
    # X-VLM (reference/methods.md section 1): in-batch ITC without momentum, ITM, span-masked MLM on image-text
    # batches; the same three on (region, region text) pairs plus the box head on region batches
    # (pretrain/xvlm_recipe.py).
    "xvlm": Method(
        objectives={"itc": {"momentum_distillation": False}, "itm": {}, "span_mlm": {}, "region_itc": {},
                    "region_itm": {}, "region_mlm": {}, "box": {}},
        batch_adapter=xvlm_batch,
        streams={REGION_STREAM: Stream(batch_adapter=xvlm_region_batch, options=RegionStreamOptions,
                                       transform={"region_crop": True, "flip_text": "skip",
                                                  "randaugment_geometric": False})}),
    # ViCHA: ALBEF's three, hierarchical ITC (weight = ita_hidden_weight) and MAE; concepts via model.concepts.
    "vicha": Method(objectives={"itc": {}, "itm": {}, "mlm": {}, "hitc": {"weight": 0.1}, "mim": {}},
                    batch_adapter=vicha_batch),
    # PEVL: boxes written into the caption as position tokens; the generalised MLM with the soft position loss.
    # A flip swaps left/right in the caption, the region spans following (data_shards.boxes).
    "pevl": Method(objectives={"itc": {}, "itm": {}, "position_mlm": {}}, batch_adapter=pevl_batch,
                   transform={"flip_text": "swap"}),
}


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective of a run, validated: its class, its options, and how the task weighs it."""

    name: str
    cls: type[Objective]
    options: object                                # an instance of cls.Config
    weight: float = 1.0
    start_step: int = 0                            # the first optimizer step (0-based) it runs at


def method_of(config: PretrainConfig) -> Method:
    if config.method not in METHODS:
        raise ConfigError(f"method {config.method!r} is not known; choose one of {', '.join(METHODS)}")
    return METHODS[config.method]


def objective_entries(config: PretrainConfig) -> dict[str, dict]:
    """The method's default objectives updated by the config's entries (an option given replaces that option
    only), then the config's other objectives in the order listed."""
    entries = {name: dict(entry) for name, entry in method_of(config).objectives.items()}
    for name, entry in config.objectives.items():
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise ConfigError(f"objectives.{name}: expected a mapping of options such as {{weight: 1.0}}, "
                              f"got {entry!r}")
        entries[name] = {**entries.get(name, {}), **entry}
    return entries


def resolve_objectives(config: PretrainConfig) -> list[ObjectiveSpec]:
    """The run's objectives (see ``objective_entries``), every option checked against the objective's own
    ``Config``; errors name ``objectives.<name>.<key>``. An objective of weight 0 is not built at all."""
    method = method_of(config)
    specs = []
    for name, entry in objective_entries(config).items():
        if not name.isidentifier():
            raise ConfigError(f"objectives.{name}: an objective's name must be a Python identifier")
        options = {key: value for key, value in entry.items() if key not in COMMON_KEYS}
        common = {key: entry[key] for key in COMMON_KEYS if key in entry}
        cls = objective_class(name, common.get("class_path"))
        weight, start_step = common.get("weight", 1.0), common.get("start_step", 0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ConfigError(f"objectives.{name}.weight: must be a number >= 0, got {weight!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ConfigError(f"objectives.{name}.start_step: must be a step number >= 0, got {start_step!r}")
        options = from_mapping(cls.Config, options, f"objectives.{name}")
        if weight > 0:
            specs.append(ObjectiveSpec(name, cls, options, float(weight), start_step))
    if not specs:
        raise ConfigError("objectives: every objective has weight 0; nothing would be trained")
    if all(spec.start_step > 0 for spec in specs):
        raise ConfigError("objectives: no objective runs from step 0 (start_step); the first steps would have "
                          "no loss")
    streams = set(config.data.streams)
    if streams != set(method.streams):
        raise ConfigError(f"data.streams lists {sorted(streams) or 'none'}, method {config.method!r} reads "
                          f"{sorted(method.streams) or 'none'}")
    for name, stream in method.streams.items():
        if stream.options is not None:
            from_mapping(stream.options, config.data.streams[name].options, f"data.streams.{name}.options")
        elif config.data.streams[name].options:
            raise ConfigError(f"data.streams.{name}.options: method {config.method!r} takes no options for it")
    for spec in specs:  # an objective that reads a stream would otherwise never run without it
        missing = sorted(set(getattr(spec.cls, "streams", ())) - streams)
        if missing:
            raise ConfigError(f"objectives.{spec.name} reads the data stream(s) {missing}, which data.streams "
                              f"lacks; use a method that has them (e.g. method: xvlm)")
    return specs
