"""ALBEF pretraining task: model + ITC/ITM/MLM objectives behind one ``forward(batch)``.

The task is what ``deepspeed.initialize`` receives. ``forward`` takes a batch from the data layer
(``image`` [B,3,H,W], ``input_ids``/``attention_mask`` from the tokenizer) and returns a dict of named
losses with ``loss`` as their weighted sum, exactly as ``reference/albef.md`` section 2 specifies.

The momentum (EMA) encoders and the feature queues live outside the module tree (see
:class:`~pretrain.objectives.momentum.MomentumCopy`): they are never optimizer parameters, ZeRO-3
never partitions them, and they stay fp32 under bf16/fp16 engines. Their state, and the step count
that drives the alpha warm-up, travel through ``extra_state_dict()`` into every checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.albef import ALBEFModel
from pretrain.objectives.itc import itc_loss
from pretrain.objectives.itm import itm_labels, itm_loss, sample_hard_negatives
from pretrain.objectives.mlm import mask_tokens, mlm_loss
from pretrain.objectives.momentum import FeatureQueue, MomentumCopy, alpha_at
from pretrain.schema import ObjectivesConfig
from pretrain.text.tokenizer import TextTokenizer

MOMENTUM_MODULES = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")


class ALBEFPretrainTask(nn.Module):
    """forward(batch) -> {"loss", "itc", "itm", "mlm"}; a term with weight 0, or before its start step, is skipped."""

    def __init__(self, model: ALBEFModel, tokenizer: TextTokenizer, objectives: ObjectivesConfig,
                 steps_per_epoch: int):
        super().__init__()
        self.model = model
        self.weights = {"itc": objectives.itc, "itm": objectives.itm, "mlm": objectives.mlm}
        self.objectives = objectives
        unknown = set(objectives.start_steps) - set(self.weights)
        if unknown:
            raise ValueError(f"objectives.start_steps names unknown terms {sorted(unknown)}; "
                             f"choose from {sorted(self.weights)}")
        self.steps_per_epoch = max(steps_per_epoch, 1)
        self.special = {"vocab_size": tokenizer.vocab_size, "mask_token_id": tokenizer.mask_token_id,
                        "pad_token_id": tokenizer.pad_token_id, "cls_token_id": tokenizer.cls_token_id}
        self.step = 0
        # Kept out of nn.Module registration on purpose (see the module docstring).
        self.__dict__["momentum"] = MomentumCopy({name: getattr(model, name) for name in MOMENTUM_MODULES},
                                                 momentum=objectives.momentum)
        self.__dict__["queue"] = FeatureQueue(model.vision_proj.out_features, objectives.queue_size)
        self.__dict__["text_queue"] = FeatureQueue(model.text_proj.out_features, objectives.queue_size)

    # -- state outside the module tree ------------------------------------------------------------
    def place(self, device: torch.device) -> None:
        self.momentum.to(device)
        self.queue.to(device)
        self.text_queue.to(device)

    def extra_state_dict(self) -> dict:
        return {"step": self.step, "momentum": self.momentum.state_dict(),
                "image_queue": self.queue.state_dict(), "text_queue": self.text_queue.state_dict()}

    def load_extra_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.momentum.load_state_dict(state["momentum"])
        self.queue.load_state_dict(state["image_queue"])
        self.text_queue.load_state_dict(state["text_queue"])

    def current_alpha(self) -> float:
        if not self.objectives.alpha_warmup:
            return self.objectives.alpha
        return alpha_at(self.objectives.alpha, self.step, self.steps_per_epoch)

    # -- the step ----------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        model = self.model
        dtype = model.vision_proj.weight.dtype
        images = batch["image"]
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        alpha = self.current_alpha()
        active = {name for name, weight in self.weights.items()
                  if weight and self.step >= self.objectives.start_steps.get(name, 0)}
        if self.training:
            self.step += 1
        model.clamp_temperature(self.objectives.temp_min, self.objectives.temp_max)

        image_tokens, image_feat = model.image_embeddings(images.to(dtype))
        text_hidden, text_feat = model.text_embeddings(input_ids, attention_mask)
        with torch.no_grad():
            if self.training:
                self.momentum.update({name: getattr(model, name) for name in MOMENTUM_MODULES})
            # fp32 copies, run at the engine's precision: an fp32 ViT-B forward would cost more than
            # the whole bf16 online step on a GPU.
            with self._autocast(images, dtype):
                image_tokens_m, image_feat_m, text_feat_m = self._momentum_features(
                    images.float(), input_ids, attention_mask)
            image_feat_m, text_feat_m = image_feat_m.float(), text_feat_m.float()

        losses = {}
        temp = model.temp.float()
        itc = itc_loss(image_feat.float(), text_feat.float(), image_feat_m, text_feat_m,
                       self.queue.features, self.text_queue.features, temp, alpha)
        if "itc" in active:
            losses["itc"] = itc.loss
        if "itm" in active:
            losses["itm"] = self._itm(image_tokens, text_hidden, attention_mask, itc.sim_i2t, itc.sim_t2i)
        if "mlm" in active:
            losses["mlm"] = self._mlm(input_ids, attention_mask, image_tokens, image_tokens_m, alpha)
        if self.training:
            self.queue.enqueue(image_feat_m)
            self.text_queue.enqueue(text_feat_m)
        losses["loss"] = sum(self.weights[name] * value for name, value in losses.items())
        return losses

    @staticmethod
    def _autocast(reference: torch.Tensor, dtype: torch.dtype):
        return torch.autocast(reference.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def _momentum_features(self, images, input_ids, attention_mask):
        momentum = self.momentum
        image_tokens_m = momentum["visual_encoder"](images)
        image_feat_m = F.normalize(momentum["vision_proj"](image_tokens_m[:, 0]), dim=-1)
        text_hidden_m = momentum["text_encoder"].encode_text(input_ids, attention_mask)
        text_feat_m = F.normalize(momentum["text_proj"](text_hidden_m[:, 0]), dim=-1)
        return image_tokens_m, image_feat_m, text_feat_m

    def _itm(self, image_tokens, text_hidden, attention_mask, sim_i2t, sim_t2i):
        batch_size = image_tokens.shape[0]
        exclude = torch.eye(batch_size, dtype=torch.bool, device=image_tokens.device)
        with torch.no_grad():
            negative_image, negative_text = sample_hard_negatives(
                sim_i2t[:, :batch_size].float(), sim_t2i[:, :batch_size].float(), exclude)
        texts = torch.cat([text_hidden, text_hidden, text_hidden[negative_text]])
        masks = torch.cat([attention_mask, attention_mask, attention_mask[negative_text]])
        images = torch.cat([image_tokens, image_tokens[negative_image], image_tokens])
        logits = self.model.itm_head(self.model.fused_cls(texts, masks, images))
        return itm_loss(logits.float(), itm_labels(batch_size).to(logits.device))

    def _mlm(self, input_ids, attention_mask, image_tokens, image_tokens_m, alpha):
        masked_ids, labels = mask_tokens(input_ids, probability=self.objectives.mlm_probability, **self.special)
        text_encoder = self.model.text_encoder
        logits = text_encoder.mlm_logits(text_encoder(masked_ids, attention_mask, image_tokens))
        logits_m = None
        if alpha > 0:
            with torch.no_grad(), self._autocast(image_tokens_m, image_tokens.dtype):
                text_encoder_m = self.momentum["text_encoder"]
                logits_m = text_encoder_m.mlm_logits(text_encoder_m(masked_ids, attention_mask, image_tokens_m))
        return mlm_loss(logits.float(), labels, logits_m.float() if logits_m is not None else None, alpha)


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """ALBEF's grouping: 1-D tensors and biases get no weight decay; all else does, ``temp`` included
    (0-d in ALBEF, so decayed there; ours has shape [1] and is named explicitly)."""
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = (parameter.ndim == 1 and not name.endswith("temp")) or name.endswith(".bias")
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
