"""The text tower: Hugging Face BERT split at ``fusion_layer``, the upper layers cross-attending to image tokens.

Layers ``[0, fusion_layer)`` are plain BERT; layers ``[fusion_layer, L)`` run self-attention ->
cross-attention to the image -> feed-forward (post-LN, non-causal), as ALBEF's text encoder. The
module names reproduce ALBEF's ``text_encoder.*`` state-dict layout (``bert.embeddings.*``,
``bert.encoder.layer.N.{attention,crossattention,intermediate,output}.*``, ``cls.predictions.*``)::

    config = load_bert_config("bert-base-uncased/")                    # a LOCAL directory; never downloads
    text = FusionBert(config, fusion_layer=6, encoder_width=768)       # random init, no disk access
    report = load_text_weights(text, "bert-base-uncased/")             # cross-attention reported as new
    hidden = text.encode_text(input_ids, attention_mask)               # ALBEF mode 'text'
    hidden, layers = text.encode_text_layers(input_ids, attention_mask, (2, 4))  # and chosen layer outputs
    fused = text.fuse(hidden, attention_mask, image_tokens)            # ALBEF mode 'fusion'
    logits = text.mlm_logits(text(input_ids, attention_mask, image_tokens))  # 'multi_modal' + MLM head
    text.resize_token_embeddings(tokenizer.vocab_size)                 # room for appended extra tokens

Attention runs through PyTorch SDPA. The tokenizer lives in ``pretrain.text.tokenizer``.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig, BertModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertAttention, BertLayer, BertOnlyMLMHead
from transformers.pytorch_utils import apply_chunking_to_forward

from pretrain.models import LoadReport, read_state_dict

# ``allow_is_bidirectional_skip`` is there from transformers 5; older versions build the mask the same way.
_NO_MASK_SKIP = ({"allow_is_bidirectional_skip": False}
                 if "allow_is_bidirectional_skip" in inspect.signature(create_bidirectional_mask).parameters else {})

# Weight files looked for in a BERT directory, in order of preference.
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")


def _require_directory(bert_dir: str, what: str) -> None:
    if not os.path.isdir(bert_dir):
        raise FileNotFoundError(
            f"BERT directory {bert_dir!r} does not exist; {what} is read from a LOCAL directory "
            "(config.json, vocab/tokenizer files, model.safetensors), never downloaded"
        )


def load_bert_config(bert_dir: str, **overrides) -> BertConfig:
    """The ``BertConfig`` in ``bert_dir/config.json``, with ``overrides`` (existing fields only) applied."""
    _require_directory(bert_dir, "the text encoder config")
    path = os.path.join(bert_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist; the BERT directory needs its config.json")
    with open(path) as file:
        values = json.load(file)
    if values.get("model_type", "bert") != "bert":
        raise ValueError(f"{path!r} describes a {values['model_type']!r} model; the text encoder is BERT-shaped")
    config = BertConfig.from_dict(values)
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise ValueError(f"unknown BERT config field {name!r} in text overrides")
        setattr(config, name, value)
    return config


class FusionBertLayer(BertLayer):
    """A BERT layer with cross-attention to image tokens between self-attention and the feed-forward block.

    HF ``BertLayer`` builds cross-attention only for decoders, whose self-attention is causal; ALBEF's
    fusion layers are bidirectional, so this layer always builds it and never masks causally.
    """

    def __init__(self, config: BertConfig, encoder_width: int, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        self.crossattention = BertAttention(config, is_causal=False, layer_idx=layer_idx, is_cross_attention=True)
        # HF sizes the cross-attention key/value inputs by the text hidden size; here they read image
        # tokens, whose width (the vision encoder's) can differ, as ALBEF's Linear(encoder_width, hidden).
        cross = self.crossattention.self
        cross.key = nn.Linear(encoder_width, cross.all_head_size)
        cross.value = nn.Linear(encoder_width, cross.all_head_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("a fusion layer needs image tokens (encoder_hidden_states)")
        self_attention_output, _ = self.attention(hidden_states, attention_mask, **kwargs)
        cross_attention_output, _ = self.crossattention(
            self_attention_output, None, encoder_hidden_states, encoder_attention_mask, **kwargs
        )
        return apply_chunking_to_forward(
            self.feed_forward_chunk, self.chunk_size_feed_forward, self.seq_len_dim, cross_attention_output
        )


class FusionBert(nn.Module):
    """ALBEF's text encoder: BERT whose layers from ``fusion_layer`` on cross-attend to ``encoder_width`` tokens.

    ``bert`` is a Hugging Face ``BertModel`` (no pooler) with its upper layers replaced by
    ``FusionBertLayer``; ``cls`` is the MLM head (absent when ``with_mlm_head`` is false), its decoder
    weight tied to the word embeddings and its decoder bias to ``cls.predictions.bias``.
    """

    def __init__(
        self,
        config: BertConfig,
        fusion_layer: int,
        encoder_width: int,
        with_mlm_head: bool = True,
        attention_implementation: str = "sdpa",
    ):
        super().__init__()
        num_layers = config.num_hidden_layers
        if not 0 <= fusion_layer <= num_layers:
            raise ValueError(f"fusion_layer {fusion_layer} is outside [0, {num_layers}] for a {num_layers}-layer BERT")
        # A private copy: the model records its own settings, and the caller's config stays untouched.
        config = copy.deepcopy(config)
        config.is_decoder = False  # a decoder config would make self-attention causal
        config.add_cross_attention = False  # cross-attention is built by FusionBertLayer, not by HF
        config.fusion_layer = fusion_layer
        config.encoder_width = encoder_width
        config._attn_implementation = attention_implementation
        self.fusion_layer = fusion_layer
        self.encoder_width = encoder_width
        self.grad_checkpointing = False

        self.bert = BertModel(config, add_pooling_layer=False)
        for index in range(fusion_layer, num_layers):
            self.bert.encoder.layer[index] = FusionBertLayer(config, encoder_width, layer_idx=index)
        # HF marks what its constructor initialised, so this applies BERT's init to the new layers only.
        self.bert.initialize_weights()

        self.cls = BertOnlyMLMHead(config) if with_mlm_head else None
        if self.cls is not None:
            predictions = self.cls.predictions
            predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
            predictions.decoder.bias = predictions.bias
            nn.init.normal_(predictions.transform.dense.weight, std=config.initializer_range)
            nn.init.zeros_(predictions.transform.dense.bias)

    @property
    def config(self) -> BertConfig:
        return self.bert.config

    @property
    def hidden_size(self) -> int:
        return self.bert.config.hidden_size

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer in backward instead of storing its activations."""
        self.grad_checkpointing = enabled

    def _self_attention_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        """Bidirectional; a decoder subclass returns a causal mask here and inherits everything else."""
        # HF builds the mask in the form the attention implementation wants. Its shortcut to None when nothing
        # is padded reads the mask on the host (a device sync every layer stack) and only pays off for batches
        # without padding, which captions padded to the longest one almost never are; so the mask is always built.
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                         **_NO_MASK_SKIP)

    def _run_layers(
        self, layers, hidden, attention_mask, image_embeds=None, image_mask=None, layer_outputs: list | None = None
    ) -> torch.Tensor:
        """``hidden`` through ``layers``; each layer's output is also appended to ``layer_outputs`` when given."""
        self_mask = self._self_attention_mask(hidden, attention_mask)
        cross_mask = None
        if image_embeds is not None and image_mask is not None:
            cross_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=image_mask, encoder_hidden_states=image_embeds
            )
        extra = () if image_embeds is None else (image_embeds, cross_mask)
        for layer in layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, self_mask, *extra, use_reentrant=False)
            else:
                hidden = layer(hidden, self_mask, *extra)
            if layer_outputs is not None:
                layer_outputs.append(hidden)
        return hidden

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ALBEF mode 'text': embeddings and the text-only layers. ``[B, T]`` ids -> ``[B, T, hidden]``."""
        hidden = self.bert.embeddings(input_ids=input_ids)
        return self._run_layers(self.bert.encoder.layer[: self.fusion_layer], hidden, attention_mask)

    def encode_text_layers(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Iterable[int]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``encode_text``'s output and the states of the chosen text-only ``layers``, each ``[B, T, hidden]``.

        Layers count as Hugging Face's ``hidden_states``: 0 is the embedding output, ``i`` the output of
        the i-th layer (1-based), up to ``fusion_layer`` (the last text-only layer). Returns
        ``(hidden, {layer: states})`` with ``hidden`` equal to ``encode_text(input_ids, attention_mask)``.
        """
        layers = tuple(layers)
        for layer in layers:
            if not isinstance(layer, int) or not 0 <= layer <= self.fusion_layer:
                raise ValueError(
                    f"text layer {layer!r} is outside [0, {self.fusion_layer}]: 0 is the embedding output and "
                    f"1..{self.fusion_layer} the text-only layers below fusion_layer {self.fusion_layer}"
                )
        hidden = self.bert.embeddings(input_ids=input_ids)
        states = [hidden]
        text_layers = self.bert.encoder.layer[: self.fusion_layer]
        hidden = self._run_layers(text_layers, hidden, attention_mask, layer_outputs=states)
        return hidden, {layer: states[layer] for layer in layers}

    def fuse(
        self,
        text_hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ALBEF mode 'fusion': the cross-attention layers on text states. ``image_mask`` None = all tokens."""
        layers = self.bert.encoder.layer[self.fusion_layer :]
        return self._run_layers(layers, text_hidden, attention_mask, image_embeds, image_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ALBEF mode 'multi_modal': every layer, the upper ones attending to ``image_embeds`` [B, N, encoder_width]."""
        return self.fuse(self.encode_text(input_ids, attention_mask), attention_mask, image_embeds, image_mask)

    def resize_token_embeddings(self, new_size: int) -> None:
        """Grow (or shrink) the word embeddings and the tied MLM decoder to ``new_size`` ids.

        Old rows keep their values; new rows are initialised as BERT initialises embeddings (normal with
        ``initializer_range``; decoder bias 0). The decoder weight stays the embedding tensor itself and its
        bias stays ``cls.predictions.bias``. Call it after loading BERT weights of the original size and
        before ``deepspeed.initialize``, which takes the parameters as they are then.
        """
        old = self.bert.embeddings.word_embeddings
        if new_size <= 0:
            raise ValueError(f"vocabulary size {new_size} must be positive")
        if old.padding_idx is not None and new_size <= old.padding_idx:
            raise ValueError(f"vocabulary size {new_size} would drop the padding id {old.padding_idx}")
        kept = min(new_size, old.num_embeddings)
        new = nn.Embedding(
            new_size, old.embedding_dim, padding_idx=old.padding_idx, device=old.weight.device, dtype=old.weight.dtype
        )
        with torch.no_grad():
            new.weight[:kept] = old.weight[:kept]
            nn.init.normal_(new.weight[kept:], std=self.config.initializer_range)
        new.weight.requires_grad_(old.weight.requires_grad)
        self.bert.embeddings.word_embeddings = new
        if self.cls is not None:
            predictions = self.cls.predictions
            bias = torch.zeros(new_size, device=predictions.bias.device, dtype=predictions.bias.dtype)
            with torch.no_grad():
                bias[:kept] = predictions.bias[:kept]
            predictions.bias = nn.Parameter(bias, requires_grad=predictions.bias.requires_grad)
            # The decoder Linear keeps no state of its own beyond the two tied parameters.
            predictions.decoder.weight = new.weight
            predictions.decoder.bias = predictions.bias
            predictions.decoder.out_features = new_size
        self.config.vocab_size = new_size

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``[..., vocab]`` of the MLM head for hidden states ``[..., hidden]``."""
        if self.cls is None:
            raise ValueError("this FusionBert was built with with_mlm_head=False")
        return self.cls(hidden)


def _checkpoint_key_to_model_key(key: str, has_mlm_head: bool) -> str | None:
    """Our name for a Hugging Face BERT checkpoint key, or None for keys dropped by rule."""
    # Checkpoints converted from the original TF BERT (bert-base-uncased among them) name LayerNorm
    # parameters gamma/beta.
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    if key.startswith("cls."):
        if key.startswith("cls.predictions.") and has_mlm_head:
            return key
        return None  # the NSP head, or an MLM head the model does not have
    body = key.removeprefix("bert.")
    # The pooler is not part of ALBEF's encoder; position_ids/token_type_ids are non-persistent buffers now.
    if body.startswith("pooler.") or body.endswith((".position_ids", ".token_type_ids")):
        return None
    return "bert." + body


def load_text_weights(model: FusionBert, bert_dir: str) -> LoadReport:
    """Load the BERT weights in a LOCAL ``bert_dir`` (``model.safetensors`` or ``pytorch_model.bin``) into ``model``.

    Keys with or without the ``bert.`` prefix are accepted (BertModel and BertForMaskedLM checkpoints).
    New cross-attention weights, and an MLM head the checkpoint lacks, are ``expected_missing`` (left
    randomly initialised); anything else absent is ``missing``; checkpoint keys with no place are
    ``unexpected``; a shape mismatch is an error listing every such key.
    """
    _require_directory(bert_dir, "the text encoder weights")
    paths = [os.path.join(bert_dir, name) for name in WEIGHT_FILE_NAMES]
    path = next((candidate for candidate in paths if os.path.isfile(candidate)), None)
    if path is None:
        raise FileNotFoundError(f"no weight file in {bert_dir!r}: looked for {', '.join(WEIGHT_FILE_NAMES)}")
    checkpoint_state = read_state_dict(path)

    own = model.state_dict()
    state_dict, dropped, unexpected = {}, [], []
    for key, value in checkpoint_state.items():
        name = _checkpoint_key_to_model_key(key, has_mlm_head=model.cls is not None)
        if name is None:
            dropped.append(key)
        elif name in own:
            state_dict[name] = value
        else:
            unexpected.append(key)

    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if value.shape != own[key].shape
    ]
    if mismatched:
        raise ValueError(f"{path!r} does not fit the text encoder; shape mismatches:\n  " + "\n  ".join(mismatched))

    # Tied pairs share one tensor: loading either name fills both.
    provided = set(state_dict)
    tied_pairs = [
        ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
        ("cls.predictions.decoder.bias", "cls.predictions.bias"),
    ]
    for first, second in tied_pairs:
        if first in own and (first in provided or second in provided):
            provided |= {first, second}
    absent = sorted(set(own) - provided)
    expected = tuple(key for key in absent if ".crossattention." in key or key.startswith("cls."))
    missing = tuple(key for key in absent if key not in expected)
    model.load_state_dict(state_dict, strict=False)
    return LoadReport(
        missing=missing,
        unexpected=tuple(sorted(unexpected)),
        expected_missing=expected,
        dropped=tuple(sorted(dropped)),
    )

