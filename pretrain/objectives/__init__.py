"""Pretraining objectives, one module per loss, and the machinery they share (gathers, momentum copies, queues).

``OBJECTIVES`` is the one table of built-in objectives by the name a config lists them under. An objective
that lives elsewhere (a research prototype, a test) is listed with ``class_path: package.module:ClassName``
in its YAML entry and loaded by ``objective_class``; it must subclass ``pretrain.objectives.base.Objective``.
"""

from __future__ import annotations

import importlib

from pretrain.config import ConfigError
from pretrain.objectives.base import Objective
from pretrain.objectives.hitc import HierarchicalITC
from pretrain.objectives.itc import ITC
from pretrain.objectives.itm import ITM
from pretrain.objectives.mim import MaskedImageModelling
from pretrain.objectives.mlm import MLM
from pretrain.objectives.position import PositionMLM
from pretrain.objectives.region import RegionITC, RegionITM, RegionMLM
from pretrain.objectives.region_box import Box
from pretrain.objectives.span_mlm import SpanMLM

OBJECTIVES: dict[str, type[Objective]] = {"itc": ITC, "itm": ITM, "mlm": MLM,
                                          # X-VLM
                                          "span_mlm": SpanMLM, "region_itc": RegionITC, "region_itm": RegionITM,
                                          "region_mlm": RegionMLM, "box": Box,
                                          # ViCHA
                                          "hitc": HierarchicalITC, "mim": MaskedImageModelling,
                                          # PEVL: position tokens masked by groups, the order-aware soft loss
                                          "position_mlm": PositionMLM}


def objective_class(name: str, class_path: str | None) -> type[Objective]:
    """The class of ``objectives.<name>``: from ``OBJECTIVES``, or imported from ``class_path``."""
    if class_path is None:
        if name not in OBJECTIVES:
            raise ConfigError(f"objectives.{name}: no built-in objective of that name (built in: "
                              f"{', '.join(OBJECTIVES)}); give class_path: package.module:ClassName for another")
        return OBJECTIVES[name]
    module_name, _, class_name = class_path.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"objectives.{name}.class_path={class_path!r}: write it as package.module:ClassName")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"objectives.{name}.class_path={class_path!r} cannot be loaded: {error}") from None
    if not (isinstance(found, type) and issubclass(found, Objective)):
        raise ConfigError(f"objectives.{name}.class_path={class_path!r} is not a subclass of "
                          "pretrain.objectives.base.Objective")
    return found
