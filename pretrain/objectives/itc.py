"""Image-text contrastive losses: ALBEF's ITC with momentum distillation and queues, and plain InfoNCE.

``itc_loss`` is ALBEF's ``loss_ita`` (reference/albef.md section 2; section 5 for retrieval). Each online
feature is compared with the local momentum batch followed by the queue (``[B | Q]`` columns). The
target is ``alpha * softmax(momentum similarities / temp) + (1 - alpha) * hard``, where ``hard`` is
one-hot on the diagonal of the first B columns (pretraining) or the row-normalised ``positives`` mask
(retrieval: every column showing the same image). Per direction ``-sum(log_softmax(sim) * target)``
averaged over rows; the loss is ``(i2t + t2i) / 2``. Targets carry no gradient, so only the online
features and ``temp`` learn. Similarities are computed in fp32 whatever the feature dtype, because
``1 / temp`` up to 1000 over 65k columns is where bf16 softmax loses the target.

All features must already be L2-normalised ([B, D] rows; queues (D, Q) columns, as ``FeatureQueue``).

``contrastive_loss_in_batch`` is symmetric InfoNCE whose negatives are the whole global batch
(``all_gather_with_grad``), for objectives without queues (X-VLM, ViCHA hierarchical ITC) and, with image
ids as positives, for retrieval fine-tuning.

``ITC`` is the objective (``objectives.itc`` in a config): ALBEF's loss with its two feature queues, or the
in-batch loss with ``momentum_distillation: false``.

Use::

    out = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue.features,
                   text_queue.features, temp, alpha)
    out.loss.backward()
    negatives = sample_hard_negatives(out.in_batch_sim_i2t, out.in_batch_sim_t2i, exclude)  # itm.py

Tests: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_itc.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.config import ConfigError, require, require_at_least
from pretrain.models.encoded import TOWERS, Encoded
from pretrain.objectives.base import BuildContext, Needs, Objective, StepContext
from pretrain.objectives.distributed import all_gather_with_grad, concat_all_gather, world
from pretrain.objectives.momentum import FeatureQueue


@dataclass
class ITCOutput:
    """The loss and its parts; similarities are online vs ``[momentum batch | queue]``, divided by temp."""

    loss: torch.Tensor
    loss_i2t: torch.Tensor
    loss_t2i: torch.Tensor
    sim_i2t: torch.Tensor  # [B, B + Q]: online image rows vs momentum text batch then text queue
    sim_t2i: torch.Tensor  # [B, B + Q]: online text rows vs momentum image batch then image queue

    @property
    def in_batch_sim_i2t(self) -> torch.Tensor:
        """[B, B] local in-batch columns, what ALBEF samples ITM hard negatives from."""
        return self.sim_i2t[:, : self.sim_i2t.shape[0]]

    @property
    def in_batch_sim_t2i(self) -> torch.Tensor:
        return self.sim_t2i[:, : self.sim_t2i.shape[0]]


def retrieval_positives(ids: torch.Tensor, queue_ids: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, B + Q]: column j is a positive of row b when it shows the same image (ALBEF ``idx``).

    ``ids`` [B] are the local batch's image ids; ``queue_ids`` are the queue's ids (``FeatureQueue.ids``,
    shape (1, Q), -100 where empty) or None when there is no queue.
    """
    ids = ids.reshape(-1)
    columns = ids if queue_ids is None else torch.cat([ids, queue_ids.reshape(-1).to(ids.device)])
    return ids[:, None] == columns[None, :]


def _hard_targets(batch_size: int, columns: int, positives: torch.Tensor | None, device) -> torch.Tensor:
    if positives is None:
        targets = torch.zeros(batch_size, columns, device=device)
        targets[:, :batch_size] = torch.eye(batch_size, device=device)
        return targets
    if tuple(positives.shape) != (batch_size, columns):
        raise ValueError(f"positives must be bool [{batch_size}, {columns}], got {list(positives.shape)}")
    positives = positives.to(device=device, dtype=torch.float32)
    counts = positives.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("every row of positives needs at least one True (its own pair in the first B columns)")
    return positives / counts


def _direction_loss(similarity: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(similarity, dim=1) * targets).sum(dim=1).mean()


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: torch.Tensor | float,
    alpha: float,
    positives: torch.Tensor | None = None,
) -> ITCOutput:
    """ALBEF ITC with momentum distillation.

    image_feat, text_feat: [B, D] online features (with grad). image_feat_m, text_feat_m: [B, D] momentum
    features of the same local batch. image_queue, text_queue: (D, Q) past momentum features (Q may be 0).
    temp: scalar (learnable tensor or float). alpha: distillation weight in [0, 1] (0 = hard targets only).
    positives: optional bool [B, B + Q] multi-positive mask (see ``retrieval_positives``), used by both
    directions; None means one-hot on the diagonal of the first B columns.
    """
    batch_size = image_feat.shape[0]
    for name, tensor in (("text_feat", text_feat), ("image_feat_m", image_feat_m), ("text_feat_m", text_feat_m)):
        if tuple(tensor.shape) != tuple(image_feat.shape):
            raise ValueError(f"{name} has shape {list(tensor.shape)}, expected {list(image_feat.shape)}")
    if image_queue.shape != text_queue.shape or image_queue.shape[0] != image_feat.shape[1]:
        raise ValueError(
            f"queues must both be ({image_feat.shape[1]}, Q), "
            f"got {list(image_queue.shape)} and {list(text_queue.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")

    image_feat, text_feat = image_feat.float(), text_feat.float()
    with torch.no_grad():
        image_all = torch.cat([image_feat_m.detach().float().T, image_queue.detach().float()], dim=1)
        text_all = torch.cat([text_feat_m.detach().float().T, text_queue.detach().float()], dim=1)
    temp_float = temp.float() if isinstance(temp, torch.Tensor) else temp
    sim_i2t = image_feat @ text_all / temp_float
    sim_t2i = text_feat @ image_all / temp_float

    with torch.no_grad():
        hard = _hard_targets(batch_size, sim_i2t.shape[1], positives, sim_i2t.device)
        if alpha > 0:
            temp_detached = temp_float.detach() if isinstance(temp_float, torch.Tensor) else temp_float
            sim_i2t_m = image_feat_m.detach().float() @ text_all / temp_detached
            sim_t2i_m = text_feat_m.detach().float() @ image_all / temp_detached
            targets_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * hard
            targets_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * hard
        else:
            targets_i2t = targets_t2i = hard

    loss_i2t = _direction_loss(sim_i2t, targets_i2t)
    loss_t2i = _direction_loss(sim_t2i, targets_t2i)
    return ITCOutput(
        loss=(loss_i2t + loss_t2i) / 2, loss_i2t=loss_i2t, loss_t2i=loss_t2i, sim_i2t=sim_i2t, sim_t2i=sim_t2i
    )


def contrastive_loss_in_batch(
    image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor | float,
    image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE whose negatives are every rank's batch (no queue, no momentum).

    image_feat, text_feat: [B, D] normalised features. Without ``image_ids`` the matching pair is the only
    positive; with them (retrieval fine-tuning, ALBEF's ``idx``) every gathered column showing the same image
    is a positive and the target spreads evenly over them. Each rank's loss is the mean over its local rows;
    gradients reach the other ranks' rows through ``all_gather_with_grad``, so after DeepSpeed averages
    gradients over ranks the update equals that of one process holding the whole global batch.
    """
    if tuple(image_feat.shape) != tuple(text_feat.shape):
        raise ValueError(f"image_feat {list(image_feat.shape)} and text_feat {list(text_feat.shape)} differ")
    rank, _ = world()
    batch_size = image_feat.shape[0]
    image_feat, text_feat = image_feat.float(), text_feat.float()
    temp_float = temp.float() if isinstance(temp, torch.Tensor) else temp
    all_image = all_gather_with_grad(image_feat)
    all_text = all_gather_with_grad(text_feat)
    if image_ids is None:
        labels = torch.arange(batch_size, device=image_feat.device) + rank * batch_size
        loss_i2t = F.cross_entropy(image_feat @ all_text.T / temp_float, labels)
        loss_t2i = F.cross_entropy(text_feat @ all_image.T / temp_float, labels)
        return (loss_i2t + loss_t2i) / 2
    image_ids = image_ids.reshape(-1)
    positives = (image_ids[:, None] == concat_all_gather(image_ids)[None, :]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    loss_i2t = _direction_loss(image_feat @ all_text.T / temp_float, targets)
    loss_t2i = _direction_loss(text_feat @ all_image.T / temp_float, targets)
    return (loss_i2t + loss_t2i) / 2


@dataclass(frozen=True)
class ITCConfig:
    """``objectives.itc`` options. ALBEF: momentum targets and a 65,536 queue; X-VLM and the in-batch
    variants: ``momentum_distillation: false`` (negatives gathered from every rank, no EMA, no queue)."""

    queue_size: int = 65536
    momentum_distillation: bool = True
    temp_min: float = 0.001                       # the learnable temperature is clamped to [min, max] each step
    temp_max: float = 0.5

    def __post_init__(self):
        require_at_least(self.queue_size, "queue_size", 0)
        require(0 < self.temp_min <= self.temp_max, "temp_min",
                f"must be positive and at most temp_max ({self.temp_max}), got {self.temp_min}")


class ITC(Objective):
    """Image-text contrastive loss on the projected [CLS] features; term ``itc``.

    Leaves its in-batch similarities (online rows, momentum or online columns, divided by the temperature)
    in ``step.shared["itc_similarity"]`` for the objectives after it (ITM draws hard negatives from them).
    """

    Config = ITCConfig
    terms = ("itc",)

    def __init__(self, config: ITCConfig, build: BuildContext):
        super().__init__(config, build)
        self.queues: tuple[FeatureQueue, FeatureQueue] | None = None
        if config.momentum_distillation:
            if config.queue_size % build.global_batch:
                raise ConfigError(
                    f"objectives.itc.queue_size={config.queue_size} is not divisible by the global batch "
                    f"{build.global_batch} (micro-batch x world size); pick a multiple, e.g. "
                    f"{max(1, config.queue_size // build.global_batch) * build.global_batch}")
            model = build.model
            # Plain tensors, not buffers: never cast to bf16/fp16 or partitioned by ZeRO; saved by the task.
            self.queues = (FeatureQueue(model.vision_proj.out_features, config.queue_size),
                           FeatureQueue(model.text_proj.out_features, config.queue_size))

    def needs(self) -> Needs:
        return Needs(momentum=TOWERS) if self.config.momentum_distillation else Needs()

    def forward(self, encoded: Encoded, encoded_m: Encoded | None, batch: dict,
                step: StepContext) -> dict[str, torch.Tensor]:
        model = step.model
        model.clamp_temperature(self.config.temp_min, self.config.temp_max)
        temp = model.temp.float()
        if self.queues is None:
            loss = contrastive_loss_in_batch(encoded.image_feat, encoded.text_feat, temp)
            with torch.no_grad():
                similarity = encoded.image_feat.float() @ encoded.text_feat.float().T / temp
            step.shared["itc_similarity"] = (similarity, similarity.T)
            return {"itc": loss}
        image_queue, text_queue = self.queues
        image_feat_m, text_feat_m = encoded_m.image_feat.float(), encoded_m.text_feat.float()
        output = itc_loss(encoded.image_feat.float(), encoded.text_feat.float(), image_feat_m, text_feat_m,
                          image_queue.features, text_queue.features, temp, step.alpha)
        step.shared["itc_similarity"] = (output.in_batch_sim_i2t, output.in_batch_sim_t2i)
        if step.training:
            image_queue.enqueue(image_feat_m)
            text_queue.enqueue(text_feat_m)
        return {"itc": output.loss}

    def place(self, device: torch.device) -> None:
        for queue in self.queues or ():
            queue.to(device)

    def extra_state_dict(self) -> dict:
        if self.queues is None:
            return {}
        return {"image_queue": self.queues[0].state_dict(), "text_queue": self.queues[1].state_dict()}

    def load_extra_state_dict(self, state: dict) -> None:
        if (self.queues is None) != (not state):
            raise KeyError(f"objectives.itc: the checkpoint {'has' if state else 'lacks'} feature queues, "
                           f"this run {'does not use' if self.queues is None else 'uses'} them "
                           "(objectives.itc.momentum_distillation differs)")
        if self.queues is not None:
            self.queues[0].load_state_dict(state["image_queue"])
            self.queues[1].load_state_dict(state["text_queue"])
