"""Visual grounding of referring expressions: ALBEF's weakly supervised Grad-CAM, or X-VLM's box head.

    python -m finetune.grounding --config finetune/configs/grounding_refcoco.yaml --checkpoint runs/albef/checkpoints
    python -m finetune.grounding visualize --config C --checkpoint CKPT --image IMG.jpg --text "the red circle" \
        --out heat.png

Data: ``data_shards build --format refcoco --detections dets.json``: ``txt`` is the expression, ``json.box`` the
referred box and ``json.proposals`` the detector's boxes (xyxy; the loader moves both with every resize, crop
and flip, so they are in pixels of the image the model sees). ``json.image_id``, when the annotation has one,
marks expressions of the same image as positives of one another in ITC/ITM; without it each sample is its own.

``options.mode: gradcam`` (ALBEF ``Grounding.py``, reference/albef.md section 5): fine-tune with ITC + ITM on
(image, expression) pairs, no boxes. Evaluation runs the ITM positive logit backwards to the cross-attention
of text layer ``gradcam_layer`` (ALBEF's ``block_num``), whose probabilities are computed explicitly for that
pass; attention times its clamped gradient, masked to the text tokens, averaged over heads and tokens, is a
heat map over the image patches. Each proposal scores the heat inside it over ``area ** area_exponent``; the
best one is the prediction. ``chance`` is the expected accuracy of a random proposal.

``options.mode: box`` (X-VLM, reference/methods.md section 1): an MLP on the fused [CLS] predicts the box as
sigmoid (cx, cy, w, h) over the image size, trained with L1 + (1 - GIoU); it starts from the pretraining
checkpoint's box head when there is one (X-VLM's pretraining ``box`` objective; ``pretrained_box_head``), so
``--evaluate`` on a pretraining checkpoint measures that head's zero-shot grounding. ``chance`` is the accuracy of
always predicting the evaluated split's mean box (the mean train box for a split drawn like the train one);
``chance_random_proposal`` is reported beside it when the split has proposals.

Both report ``accuracy``: the percentage of predictions whose IoU with ``json.box`` is at least 0.5.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import zlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from finetune import checkpoints
from finetune.loop import DataError, TaskSpec, eval_transform, load_weights, run
from finetune.metrics.grounding import accuracy_at_iou, pick_proposal, resize_heatmap
from finetune.retrieval import RetrievalTask
from finetune.schema import FinetuneConfig
from pretrain.build import build_backbone
from pretrain.config import ConfigError, from_mapping, load_config
from pretrain.models.encoded import concept_inputs
from pretrain.objectives.box import BoxHead, box_losses, cxcywh_to_xyxy, xyxy_to_cxcywh
from pretrain.text import pre_caption

MODES = ("gradcam", "box")
PRETRAINED_BOX_OBJECTIVE = "box"   # the pretraining objective that owns X-VLM's box head (pretrain/objectives)


@dataclass(frozen=True)
class Options:
    mode: str = "gradcam"              # gradcam (ALBEF, weakly supervised) | box (X-VLM box head)
    itm_weight: float = 1.0            # gradcam training: ITC + itm_weight * ITM
    gradcam_layer: int | None = None   # text layer index whose cross-attention Grad-CAM reads; None: the last
    area_exponent: float = 0.5         # proposal score = heat inside / area ** area_exponent (ALBEF 0.5)
    giou_weight: float = 1.0           # box training: L1 + giou_weight * (1 - GIoU)
    # box mode: start from the pretraining checkpoint's box head (objectives.box, X-VLM's bbox_head) when it has
    # one, as X-VLM's grounding does; a checkpoint without one gives a new head.
    pretrained_box_head: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"options.mode={self.mode!r}: use one of {', '.join(MODES)}")


class GroundingBatch:
    """Loader-side adapter: cleaned expressions, tokens, image ids, and (for evaluation) the referred box
    ``[B, 4]`` and each sample's proposals, all xyxy in pixels of the transformed image."""

    def __init__(self, tokenizer, mode: str, train: bool):
        self.tokenizer, self.mode, self.train = tokenizer, mode, train

    def __call__(self, batch: dict) -> dict:
        keys, metas = batch["__key__"], batch["meta"]
        texts = [pre_caption(text) for text in batch["text"]]
        for key, text in zip(keys, texts, strict=True):
            if not text:
                raise DataError(f"grounding sample {key!r} has an empty expression (txt)")
        # Image ids (ints or strings) become non-negative numbers; a sample without one gets a negative id of
        # its own, which no image id can equal.
        ids = [zlib.crc32(str(meta["image_id"]).encode()) if "image_id" in meta else -1 - zlib.crc32(key.encode())
               for key, meta in zip(keys, metas, strict=True)]
        tokens = self.tokenizer(texts)
        out = {**batch, "text": texts, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
               "image_id": torch.tensor(ids)}
        if self.mode == "box" or not self.train:
            out["box"] = torch.stack([_box_of(key, meta) for key, meta in zip(keys, metas, strict=True)])
        if not self.train:
            out["proposals"] = [_proposals_of(key, meta, required=self.mode == "gradcam")
                                for key, meta in zip(keys, metas, strict=True)]
        return out


def _box_of(key: str, meta: dict) -> torch.Tensor:
    box = meta.get("box")
    if box is None or len(box) != 4:
        raise DataError(f"grounding sample {key!r} has no json.box [x1, y1, x2, y2] (build with --format refcoco)")
    return torch.tensor([float(value) for value in box])


def _proposals_of(key: str, meta: dict, required: bool) -> torch.Tensor | None:
    proposals = meta.get("proposals") or []
    if not proposals:
        if required:
            raise DataError(f"grounding sample {key!r} has no json.proposals; Grad-CAM grounding picks one of "
                            "them (build with --format refcoco --detections FILE)")
        return None
    try:  # a proposal is a box, or a dict holding one under "box"
        boxes = torch.tensor([[float(value) for value in (box["box"] if isinstance(box, dict) else box)]
                              for box in proposals]).reshape(-1, 4)
    except (KeyError, TypeError, ValueError):
        raise DataError(f"grounding sample {key!r}: json.proposals must be xyxy boxes, got {proposals!r}") from None
    if ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
        raise DataError(f"grounding sample {key!r}: a proposal has no area in the image: {boxes.tolist()}")
    return boxes


class CrossAttentionRecorder:
    """While active, one fusion layer's cross-attention computes its probabilities explicitly (SDPA keeps
    them inside its kernel) and keeps them in ``probabilities`` [B, heads, text tokens, image tokens]."""

    def __init__(self, layer: nn.Module):
        self.attention = layer.crossattention.self
        self.probabilities = None
        self.handle = None

    def __enter__(self) -> CrossAttentionRecorder:
        self.handle = self.attention.register_forward_hook(self._explicit, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _explicit(self, module, args, kwargs, output):
        hidden, image = args[0], kwargs["encoder_hidden_states"]
        heads, size = module.num_attention_heads, module.attention_head_size
        query = module.query(hidden).unflatten(-1, (heads, size)).transpose(1, 2)
        key = module.key(image).unflatten(-1, (heads, size)).transpose(1, 2)
        value = module.value(image).unflatten(-1, (heads, size)).transpose(1, 2)
        scores = query @ key.transpose(-1, -2) * module.scaling
        mask = kwargs.get("attention_mask")
        if mask is not None:  # SDPA masks are boolean (True = attend), eager ones additive
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        self.probabilities = scores.softmax(dim=-1)
        context = (self.probabilities @ value).transpose(1, 2).flatten(2)
        return context, self.probabilities


def gradcam_from_attention(probabilities: torch.Tensor, gradients: torch.Tensor, text_mask: torch.Tensor,
                           grid: tuple[int, int]) -> torch.Tensor:
    """ALBEF's ITM Grad-CAM ``[B, h, w]``: image [CLS] column dropped, attention and gradient (clamped at 0)
    masked to the text tokens, their product averaged over heads, then over all text positions."""
    mask = text_mask[:, None, :, None].to(probabilities.dtype)
    patches = slice(1, 1 + grid[0] * grid[1])  # concept tokens (ViCHA) follow the patches; they have no place
    attention = probabilities[..., patches] * mask
    gradient = gradients[..., patches].clamp(min=0) * mask
    return (attention * gradient).mean(dim=1).mean(dim=1).unflatten(-1, grid)


def gradcam_maps(model, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 layer_index: int, concepts=None) -> torch.Tensor:
    """Grad-CAM ``[B, h, w]`` over the patch grid of the ITM positive logit at text layer ``layer_index``."""
    layer = model.text_encoder.bert.encoder.layer[layer_index]
    side = math.isqrt(model.visual_encoder.num_patches)
    with torch.enable_grad(), CrossAttentionRecorder(layer) as recorder:
        image_tokens, _ = model.image_embeddings(images.to(model.vision_proj.weight.dtype), concepts)
        text_hidden = model.text_encoder.encode_text(input_ids, attention_mask)
        positive = model.itm_head(model.fused_cls(text_hidden, attention_mask, image_tokens))[:, 1]
        (gradients,) = torch.autograd.grad(positive.float().sum(), recorder.probabilities)
    return gradcam_from_attention(recorder.probabilities.detach().float(), gradients.float(), attention_mask,
                                  (side, side))


def _random_proposal_hits(proposals: torch.Tensor | None, box: torch.Tensor) -> float | None:
    """Fraction of the proposals with IoU >= 0.5 with ``box``: a random proposal's chance to be right."""
    if proposals is None:
        return None
    return accuracy_at_iou(proposals, box.expand_as(proposals)) / 100


def gradcam_layer_index(model, options: Options) -> int:
    layers = model.text_encoder.config.num_hidden_layers
    index = layers - 1 if options.gradcam_layer is None else options.gradcam_layer
    if not model.text_encoder.fusion_layer <= index < layers:
        raise ConfigError(f"options.gradcam_layer={options.gradcam_layer}: the fusion layers of this text "
                          f"encoder are {model.text_encoder.fusion_layer}..{layers - 1}")
    return index


class GradcamGroundingTask(RetrievalTask):
    """ALBEF grounding: trains as retrieval (ITC + ITM), predicts the proposal with the most Grad-CAM heat."""

    def __init__(self, model, options: Options):
        super().__init__(model, options)
        self.layer_index = gradcam_layer_index(model, options)

    def predict(self, batch: dict) -> list[dict]:
        maps = gradcam_maps(self.model, batch["image"], batch["input_ids"], batch["attention_mask"],
                            self.layer_index, concept_inputs(batch))
        height, width = batch["image"].shape[-2:]
        predictions = []
        for key, heat, box, proposals in zip(batch["__key__"], maps, batch["box"], batch["proposals"], strict=True):
            picked = pick_proposal(resize_heatmap(heat, height, width), proposals, self.options.area_exponent)
            predictions.append({"key": key, "predicted": picked.tolist(), "box": box.tolist(),
                                "random_proposal_hits": _random_proposal_hits(proposals, box.cpu())})
        return predictions


class BoxGroundingTask(nn.Module):
    """X-VLM grounding: forward(batch) -> {"loss", "l1", "giou"}; the backbone is ``model``."""

    def __init__(self, model, options: Options):
        super().__init__()
        self.model, self.options = model, options
        model.text_encoder.cls = None  # the MLM head is not used
        self.box_head = BoxHead(model.text_encoder.hidden_size)
        self.layer_index = gradcam_layer_index(model, options)  # for ``visualize``
        # Read by finetune.loop.load_weights: pretraining objectives whose heads the checkpoint should keep.
        self.pretrained_objectives = (PRETRAINED_BOX_OBJECTIVE,) if options.pretrained_box_head else ()

    def backbone_to_task(self, state: dict) -> dict:
        """Backbone keys under ``model.``; the pretrained box objective's head (``objectives.box.head.*``) as
        ``box_head.*``."""
        head = f"objectives.{PRETRAINED_BOX_OBJECTIVE}.head."
        return {("box_head." + name[len(head):]) if name.startswith(head) else f"model.{name}": value
                for name, value in state.items()}

    def predict_normalised(self, images, input_ids, attention_mask, concepts=None) -> torch.Tensor:
        image_tokens, _ = self.model.image_embeddings(images.to(self.model.vision_proj.weight.dtype), concepts)
        text_hidden = self.model.text_encoder.encode_text(input_ids, attention_mask)
        return self.box_head(self.model.fused_cls(text_hidden, attention_mask, image_tokens)).float()

    def forward(self, batch: dict) -> dict:
        predicted = self.predict_normalised(batch["image"], batch["input_ids"], batch["attention_mask"],
                                            concept_inputs(batch))
        scale = _image_scale(batch["image"])
        target = xyxy_to_cxcywh(batch["box"].float()) / scale
        valid = (target[:, 2] * scale[0] >= 1) & (target[:, 3] * scale[1] >= 1)  # cropped away: no target
        losses = box_losses(predicted, target, valid)
        losses["loss"] = losses["l1"] + self.options.giou_weight * losses["giou"]
        return losses

    def predict(self, batch: dict) -> list[dict]:
        scale = _image_scale(batch["image"])
        boxes = cxcywh_to_xyxy(self.predict_normalised(batch["image"], batch["input_ids"], batch["attention_mask"],
                                                       concept_inputs(batch)))
        boxes = boxes * scale
        return [{"key": key, "predicted": predicted.tolist(), "box": box.tolist(), "image_size": scale[:2].tolist(),
                 "random_proposal_hits": _random_proposal_hits(proposals, box.cpu())}
                for key, predicted, box, proposals in zip(batch["__key__"], boxes, batch["box"],
                                                          batch["proposals"], strict=True)]


def _image_scale(images: torch.Tensor) -> torch.Tensor:
    """(width, height, width, height) of the batch's images, on their device."""
    height, width = images.shape[-2:]
    return torch.tensor([width, height, width, height], dtype=torch.float32, device=images.device)


def evaluate(context) -> dict:
    """Acc@IoU>=0.5 of the predicted boxes, with the mode's chance (see the module docstring)."""
    predictions = context.predictions()
    predicted = torch.tensor([prediction["predicted"] for prediction in predictions])
    boxes = torch.tensor([prediction["box"] for prediction in predictions])
    metrics = {"accuracy": accuracy_at_iou(predicted, boxes), "samples": len(predictions)}
    hits = [prediction["random_proposal_hits"] for prediction in predictions]
    if all(hit is not None for hit in hits):
        metrics["chance_random_proposal"] = 100 * sum(hits) / len(hits)
    if context.options.mode == "gradcam":
        metrics["chance"] = metrics["chance_random_proposal"]
    else:
        scale = torch.tensor([prediction["image_size"] * 2 for prediction in predictions])
        mean_box = (xyxy_to_cxcywh(boxes) / scale).mean(dim=0)
        metrics["chance"] = accuracy_at_iou(cxcywh_to_xyxy(mean_box).expand_as(boxes) * scale, boxes)
    return metrics


def build_task(model, tokenizer, options: Options) -> nn.Module:
    return GradcamGroundingTask(model, options) if options.mode == "gradcam" else BoxGroundingTask(model, options)


# X-VLM's fine-tuned grounding checkpoints (refcoco_bbox) hold no ITM head, projections or temperature: box mode does
# not use them, so a checkpoint may lack them.
SPEC = TaskSpec(name="grounding", options=Options, build=build_task,
                adapter=lambda tokenizer, options, train: GroundingBatch(tokenizer, options.mode, train),
                evaluate=evaluate, metric="accuracy",
                new_keys=("box_head.*", "model.itm_head.*", "model.vision_proj.*", "model.text_proj.*", "model.temp"),
                unused_keys=("model.text_encoder.cls.*",))


def visualize(argv: list[str]) -> int:
    """``visualize``: a PNG of the Grad-CAM heat of one expression over one image (box mode: and its box)."""
    parser = argparse.ArgumentParser(prog="python -m finetune.grounding visualize",
                                     description="Grad-CAM heat map of an expression over an image")
    parser.add_argument("--config", required=True, help="grounding YAML (its model section must fit the checkpoint)")
    parser.add_argument("--checkpoint", required=True, help="pretraining or fine-tuned grounding checkpoint")
    parser.add_argument("--image", required=True, help="a JPEG/PNG file")
    parser.add_argument("--text", required=True, help="the referring expression")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        written = _visualize(args)
    except (ConfigError, checkpoints.CheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}", file=sys.stderr)
    return 0


def _visualize(args: argparse.Namespace) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.patches import Rectangle

    from data_shards.transforms import PilTransform, decode_image

    config = load_config(FinetuneConfig, args.config, args.overrides)
    options = from_mapping(Options, config.options, "options")
    if not os.path.isfile(args.image):
        raise DataError(f"image {args.image!r} does not exist")
    with open(args.image, "rb") as handle:
        data = handle.read()
    try:
        picture = decode_image(data)
    except ValueError as error:
        raise DataError(f"image {args.image!r}: {error}") from None
    model, tokenizer = build_backbone(config.model)
    module = build_task(model, tokenizer, options)
    load_weights(module, SPEC, config, args.checkpoint, SimpleNamespace(note=lambda text: None))
    module.eval()
    text = pre_caption(args.text)
    if not text:
        raise DataError(f"--text {args.text!r} has no words left after cleaning")
    images = PilTransform(eval_transform(config.model.image_size, SPEC.transform))(
        {"__key__": args.image, "jpg": data, "txt": text, "json": {}})["image"][None]
    tokens = tokenizer([text])
    heat = gradcam_maps(model, images, tokens["input_ids"], tokens["attention_mask"], module.layer_index)[0]
    heat = resize_heatmap(heat, picture.height, picture.width).numpy()
    figure, axes = pyplot.subplots(figsize=(6, 6 * picture.height / picture.width))
    axes.imshow(picture)
    axes.imshow(heat, cmap="jet", alpha=0.5, extent=(0, picture.width, picture.height, 0))
    if isinstance(module, BoxGroundingTask):
        with torch.no_grad():
            normalised = module.predict_normalised(images, tokens["input_ids"], tokens["attention_mask"])[0]
        left, top, right, bottom = (cxcywh_to_xyxy(normalised) * torch.tensor(
            [picture.width, picture.height] * 2)).tolist()
        axes.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False,
                                 edgecolor="white", linewidth=2))
    axes.set_title(text)
    axes.axis("off")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    figure.savefig(args.out, bbox_inches="tight")
    pyplot.close(figure)
    return args.out


def main(argv: list[str]) -> int:
    if argv[:1] == ["visualize"]:
        return visualize(argv[1:])
    return run(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
