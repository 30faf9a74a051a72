"""Models of Bonsai-pruned checkpoints: the stock family model, resized to the recorded per-layer shapes.

Shipped inside every pruned checkpoint (referenced by `auto_map`), so it may import only torch and
transformers. Attention is pruned in whole KV groups, so every layer keeps the family's query/KV ratio and the
stock attention code runs unchanged on fewer heads; in a model with one KV head per layer the units are query
heads instead (`attn_groups` then counts query heads; the shared KV head stays while any query head does). A
module that lost every unit is replaced by an empty one that adds nothing to the residual stream (the layer's
residual passes through). Each layer's entry in `bonsai_layers` may also say whether its o_proj / down_proj carry
a bias (`o_bias`, `down_bias`): FLAP-style bias compensation adds one where the stock family has none. Without
those keys the stock module decides.
"""

import torch
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import Gemma3ForCausalLM
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

from .configuration_bonsai import (
    BonsaiGemma3TextConfig,
    BonsaiLlamaConfig,
    BonsaiMistralConfig,
    BonsaiQwen2Config,
    BonsaiQwen3Config,
)


class EmptyAttention(nn.Module):
    """Attention with every KV group pruned: outputs zeros, owns no parameters.

    It still appends zero-head keys/values to the cache so the cache length (read from any layer, often
    layer 0) stays in step with the tokens seen during generation.
    """

    def __init__(self, layer_idx: int, head_dim: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(
        self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs
    ):
        if past_key_values is not None:
            batch, seq = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(batch, 0, seq, self.head_dim)
            past_key_values.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class EmptyMLP(nn.Module):
    """MLP with every channel pruned: outputs zeros, owns no parameters."""

    def forward(self, x):
        return torch.zeros_like(x)


def _resized_linear(old: nn.Linear, in_features: int, out_features: int, bias=None) -> nn.Linear:
    """A fresh linear of the new shape; `bias` None keeps the old module's choice."""
    bias = old.bias is not None if bias is None else bool(bias)
    return nn.Linear(in_features, out_features, bias=bias, dtype=old.weight.dtype, device=old.weight.device)


def resize_layer(
    layer: nn.Module, attn_groups: int, mlp_channels: int, group_size: int, o_bias=None, down_bias=None,
    shared_kv: bool = False,
) -> None:
    """Give one decoder layer `attn_groups` attention units and `mlp_channels` MLP channels (weights
    uninitialised): KV groups of `group_size` query heads, or with `shared_kv` query heads over the layer's one KV
    head. `o_bias` / `down_bias` (None: as the stock module) say whether o_proj / down_proj have a bias."""
    attn = layer.self_attn
    if not isinstance(attn, EmptyAttention):
        head_dim = attn.head_dim
        if attn_groups == 0:
            layer.self_attn = EmptyAttention(attn.layer_idx, head_dim)
        elif shared_kv:
            q_out, kv_out = attn_groups * head_dim, head_dim
            attn.num_key_value_groups = attn_groups
        else:
            q_out, kv_out = attn_groups * group_size * head_dim, attn_groups * head_dim
        if attn_groups:
            attn.q_proj = _resized_linear(attn.q_proj, attn.q_proj.in_features, q_out)
            attn.k_proj = _resized_linear(attn.k_proj, attn.k_proj.in_features, kv_out)
            attn.v_proj = _resized_linear(attn.v_proj, attn.v_proj.in_features, kv_out)
            attn.o_proj = _resized_linear(attn.o_proj, q_out, attn.o_proj.out_features, o_bias)
    mlp = layer.mlp
    if not isinstance(mlp, EmptyMLP):
        if mlp_channels == 0:
            layer.mlp = EmptyMLP()
        else:
            mlp.gate_proj = _resized_linear(mlp.gate_proj, mlp.gate_proj.in_features, mlp_channels)
            mlp.up_proj = _resized_linear(mlp.up_proj, mlp.up_proj.in_features, mlp_channels)
            mlp.down_proj = _resized_linear(mlp.down_proj, mlp_channels, mlp.down_proj.out_features, down_bias)
            mlp.intermediate_size = mlp_channels


def apply_layer_shapes(model: nn.Module, layer_shapes: list) -> None:
    config = model.config
    layers = model.model.layers
    if len(layer_shapes) != len(layers):
        raise ValueError(f"bonsai_layers lists {len(layer_shapes)} layers, the model has {len(layers)}")
    group_size = config.num_attention_heads // config.num_key_value_heads
    shared_kv = config.num_key_value_heads == 1 and config.num_attention_heads > 1  # units are query heads
    for layer, shape in zip(layers, layer_shapes, strict=True):
        resize_layer(
            layer,
            int(shape["attn_groups"]),
            int(shape["mlp_channels"]),
            group_size,
            shape.get("o_bias"),
            shape.get("down_bias"),
            shared_kv,
        )


class _BonsaiMixin:
    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self, config.bonsai_layers)
        self.post_init()


class BonsaiLlamaForCausalLM(_BonsaiMixin, LlamaForCausalLM):
    config_class = BonsaiLlamaConfig


class BonsaiMistralForCausalLM(_BonsaiMixin, MistralForCausalLM):
    config_class = BonsaiMistralConfig


class BonsaiQwen2ForCausalLM(_BonsaiMixin, Qwen2ForCausalLM):
    config_class = BonsaiQwen2Config


class BonsaiQwen3ForCausalLM(_BonsaiMixin, Qwen3ForCausalLM):
    config_class = BonsaiQwen3Config


class BonsaiGemma3ForCausalLM(_BonsaiMixin, Gemma3ForCausalLM):
    config_class = BonsaiGemma3TextConfig
