"""The Mask2Former transformer decoder with a faster forward: transformers' module, same parameters, same numbers.

`DearliTransformerModule` is transformers' `Mask2FormerTransformerModule` (so every parameter name, the
initialisation and checkpoints are unchanged) whose `forward` computes the same thing with less data movement:

- queries stay ``(batch, queries, channels)``: no permutes and ``.contiguous()`` copies around every attention;
- the masked cross-attention and the self-attention run through ``scaled_dot_product_attention``, with one additive
  mask per query shared by the heads (transformers repeats a boolean mask per head, ``nn.MultiheadAttention``
  converts it to a float mask, and also averages attention weights over the heads that nobody reads);
- keys with their position embeddings are formed once per level instead of once per layer; the sine position
  embeddings are computed once per size; on a CPU without gradients, linear layers use oneDNN's fused kernel;
- the intermediate layers' masks are not produced at full resolution when nobody asks for them
  (``output_intermediate_masks=False``; the loss takes every layer's masks as their factors, see
  `modeling_dearli.mask_loss`): only their sign at the next layer's attention resolution is needed.
  Bilinear resizing and the channel sum are both linear, so the pixel embeddings are resized once per resolution
  and the sum is taken there (1/4 to 1/64 of the pixels). The logits agree to rounding (about 1e-7 of their range);
  like any change of rounding - transformers' own forward run on a different batch, for one - that can flip an
  attention-mask entry whose logit is within rounding of the 0.5 threshold.

``implementation="transformers"`` and the options it does not cover (``output_attentions``, dropout) run transformers'
forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerMaskedAttentionDecoderLayer,
    Mask2FormerMaskedAttentionDecoderOutput,
    Mask2FormerTransformerModule,
)

from .fused_linear import feed_forward, linear, linear_layer
from .pixel_decoder import sine_position_embedding

__all__ = ["DearliDecoderOutput", "DearliTransformerModule"]


@dataclass
class DearliDecoderOutput(Mask2FormerMaskedAttentionDecoderOutput):
    """transformers' decoder output, plus each layer's mask embeddings.

    Args:
        mask_embeddings (`tuple[torch.FloatTensor]`, *optional*):
            Per layer (the initial queries' included), the mask embeddings `(batch, queries, channels)` whose channel
            sum with the pixel decoder's mask features gives that layer's mask logits (when asked for with
            ``output_mask_embeddings=True``).
    """

    mask_embeddings: tuple[torch.FloatTensor, ...] | None = None


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, C)`` -> ``(B, heads, N, C / heads)`` (a view)."""
    batch, length, channels = x.shape
    return x.view(batch, length, heads, channels // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def _mlp(head, x: torch.Tensor) -> torch.Tensor:
    """transformers' `Mask2FormerMLPPredictionHead` (ReLU between layers)."""
    for i, block in enumerate(head.layers):
        x = linear_layer(x, block.layers[0], relu=i < len(head.layers) - 1)
    return x


def _cross_attention(
    layer: Mask2FormerMaskedAttentionDecoderLayer,
    hidden: torch.Tensor,
    query_position: torch.Tensor,
    memory: torch.Tensor,
    memory_key: torch.Tensor,
    attention_mask: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    """``residual +`` the ``nn.MultiheadAttention`` of `layer.cross_attn` with the additive ``attention_mask``
    ``(B, 1, Q, HW)``."""
    attention = layer.cross_attn
    heads = attention.num_heads
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attention.in_proj_bias.chunk(3)
    q = _split_heads(linear(hidden + query_position, w_q, b_q), heads)
    k = _split_heads(linear(memory_key, w_k, b_k), heads)
    v = _split_heads(linear(memory, w_v, b_v), heads)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
    return linear_layer(_merge_heads(out), attention.out_proj, residual=residual)


def _self_attention(
    layer: Mask2FormerMaskedAttentionDecoderLayer, hidden: torch.Tensor, query_position: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    """``residual +`` transformers' `Mask2FormerAttention` of `layer.self_attn` (queries and keys carry the position
    embedding)."""
    attention = layer.self_attn
    heads = attention.num_heads
    with_position = hidden + query_position
    q = _split_heads(linear_layer(with_position, attention.q_proj), heads)
    k = _split_heads(linear_layer(with_position, attention.k_proj), heads)
    v = _split_heads(linear_layer(hidden, attention.v_proj), heads)
    out = F.scaled_dot_product_attention(q, k, v)
    return linear_layer(_merge_heads(out), attention.out_proj, residual=residual)


def _feed_forward(
    layer: Mask2FormerMaskedAttentionDecoderLayer, hidden: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """``residual +`` the layer's feed-forward block."""
    return feed_forward(hidden, layer.fc1, layer.fc2, layer.activation_fn, residual=residual)


def _decoder_layer(
    layer: Mask2FormerMaskedAttentionDecoderLayer,
    hidden: torch.Tensor,
    query_position: torch.Tensor,
    memory: torch.Tensor,
    memory_key: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """transformers' `Mask2FormerMaskedAttentionDecoderLayer` (post-norm or pre-norm) on ``(B, Q, C)`` queries."""
    if layer.pre_norm:
        normed = layer.cross_attn_layer_norm(hidden)
        hidden = _cross_attention(layer, normed, query_position, memory, memory_key, attention_mask, residual=hidden)
        hidden = _self_attention(layer, layer.self_attn_layer_norm(hidden), query_position, residual=hidden)
        return _feed_forward(layer, layer.final_layer_norm(hidden), residual=hidden)
    hidden = layer.cross_attn_layer_norm(
        _cross_attention(layer, hidden, query_position, memory, memory_key, attention_mask, residual=hidden)
    )
    hidden = layer.self_attn_layer_norm(_self_attention(layer, hidden, query_position, residual=hidden))
    return layer.final_layer_norm(_feed_forward(layer, hidden, residual=hidden))


def _attention_mask(logits: torch.Tensor) -> torch.Tensor:
    """Additive attention mask ``(B, 1, Q, h * w)`` (0 where a query may attend, -inf elsewhere) from its resized mask
    logits ``(B, Q, h, w)``: transformers masks where sigmoid < 0.5, except that a query whose mask is empty
    everywhere attends everywhere."""
    allowed = logits.sigmoid().flatten(2) >= 0.5
    attends = allowed.any(-1, keepdim=True)
    if not bool(attends.all()):
        allowed |= ~attends
    return torch.where(allowed, 0.0, float("-inf")).to(logits.dtype)[:, None]


class DearliTransformerModule(Mask2FormerTransformerModule):
    """transformers' `Mask2FormerTransformerModule` (same parameters) with a forward that skips redundant work; see
    the module docstring."""

    def forward(
        self,
        multi_scale_features: list[torch.Tensor],
        mask_features: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        output_intermediate_masks: bool = True,
        implementation: str = "dearli",
        output_mask_embeddings: bool = False,
    ) -> Mask2FormerMaskedAttentionDecoderOutput:
        """transformers' forward (``implementation="transformers"``) or ours (``"dearli"``): same outputs, except that
        with ``output_intermediate_masks=False`` ours leaves the intermediate entries of ``masks_queries_logits``
        ``None`` (only the last layer's masks are computed at full resolution), and with
        ``output_mask_embeddings=True`` ours also returns every layer's mask embeddings (`DearliDecoderOutput`; the
        loss reads the masks from them, see `modeling_dearli.mask_loss`)."""
        decoder = self.decoder
        if implementation == "transformers" or output_attentions or decoder.config.dropout > 0:
            return super().forward(multi_scale_features, mask_features, output_hidden_states, output_attentions)
        batch = mask_features.shape[0]
        memories, memory_keys, sizes = [], [], []
        for i in range(self.num_feature_levels):
            x = multi_scale_features[i]
            height, width = int(x.shape[-2]), int(x.shape[-1])
            sizes.append((height, width))
            position = sine_position_embedding(self.position_embedder, height, width, x.device, x.dtype)
            x = self.input_projections[i](x)
            # (B, HW, C); a view of the pixel decoder's output, which is laid out that way
            memory = x.permute(0, 2, 3, 1).reshape(batch, height * width, -1) + self.level_embed.weight[i]
            memories.append(memory)
            memory_keys.append(memory + position)

        query_position = self.queries_embedder.weight.unsqueeze(0).expand(batch, -1, -1)
        hidden = self.queries_features.weight.unsqueeze(0).expand(batch, -1, -1)
        num_layers = len(decoder.layers)
        predictor = _MaskPredictor(decoder, mask_features, sizes, exact=output_intermediate_masks)

        all_hidden_states = [] if output_hidden_states else None
        intermediate = [decoder.layernorm(hidden)]
        masks, attention_mask = predictor(intermediate[0], 0, final=num_layers == 0)
        mask_predictions = [masks]
        for idx, layer in enumerate(decoder.layers):
            if output_hidden_states:
                all_hidden_states.append(hidden.transpose(0, 1))
            level = idx % self.num_feature_levels
            hidden = _decoder_layer(layer, hidden, query_position, memories[level], memory_keys[level], attention_mask)
            intermediate.append(decoder.layernorm(hidden))
            masks, attention_mask = predictor(intermediate[-1], idx + 1, final=idx == num_layers - 1)
            mask_predictions.append(masks)
        if output_hidden_states:
            all_hidden_states.append(hidden.transpose(0, 1))

        return DearliDecoderOutput(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=None,
            # transformers' layout (queries, batch, channels), as views
            intermediate_hidden_states=tuple(x.transpose(0, 1) for x in intermediate),
            masks_queries_logits=tuple(mask_predictions),
            mask_embeddings=tuple(predictor.embeddings) if output_mask_embeddings else None,
        )


class _MaskPredictor:
    """transformers' `Mask2FormerMaskPredictor` for one forward: a layer's full-resolution mask logits and where each
    query may attend in the next layer (see `_attention_mask`), at that layer's feature size."""

    def __init__(self, decoder, mask_features: torch.Tensor, sizes: list[tuple[int, int]], exact: bool) -> None:
        self.embedder = decoder.mask_predictor.mask_embedder
        self.pixels = mask_features  # (B, C, H, W)
        self.sizes = sizes
        self.exact = exact
        self._resized: dict[tuple[int, int], torch.Tensor] = {}
        self.embeddings: list[torch.Tensor] = []  # per call

    def __call__(self, queries: torch.Tensor, idx: int, final: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        embeddings = _mlp(self.embedder, queries)  # (B, Q, C)
        self.embeddings.append(embeddings)
        size = self.sizes[idx % len(self.sizes)]
        if self.exact or final:
            masks = torch.einsum("bqc,bchw->bqhw", embeddings, self.pixels)
            if final:
                return masks, None
            return masks, _attention_mask(F.interpolate(masks, size=size, mode="bilinear", align_corners=False))
        # Only the attention mask is needed (it has no gradient): resize the pixel embeddings once per size, then
        # the sum over channels (see the module docstring).
        with torch.no_grad():
            if size not in self._resized:
                self._resized[size] = F.interpolate(self.pixels, size=size, mode="bilinear", align_corners=False)
            return None, _attention_mask(torch.einsum("bqc,bchw->bqhw", embeddings, self._resized[size]))
