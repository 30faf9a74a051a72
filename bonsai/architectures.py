"""Which model families Bonsai prunes, and how to reach their prunable modules.

Every supported family has the same decoder layout: `model.model.layers[i].self_attn.{q,k,v,o}_proj` and
`.mlp.{gate,up,down}_proj`. Families differ in biases (Qwen2 q/k/v), per-head q/k norms (Qwen3, Gemma-3),
explicit head_dim (Gemma-3, Qwen3) and extra layer norms (Gemma-3); none of those change what a unit is, so one
adapter serves all and the table below maps each `model_type` to its pruned-checkpoint classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bonsai.errors import BonsaiError
from bonsai.remote.modeling_bonsai import EmptyAttention, EmptyMLP


@dataclass(frozen=True)
class Family:
    model_type: str  # the stock model_type
    config_class: str  # in bonsai/remote/configuration_bonsai.py
    model_class: str  # in bonsai/remote/modeling_bonsai.py


FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama", "BonsaiLlamaConfig", "BonsaiLlamaForCausalLM"),
        Family("mistral", "BonsaiMistralConfig", "BonsaiMistralForCausalLM"),
        Family("qwen2", "BonsaiQwen2Config", "BonsaiQwen2ForCausalLM"),
        Family("qwen3", "BonsaiQwen3Config", "BonsaiQwen3ForCausalLM"),
        Family("gemma3_text", "BonsaiGemma3TextConfig", "BonsaiGemma3ForCausalLM"),
    )
}
# SmolLM2 is a Llama; pruned checkpoints carry `bonsai_<stock type>`.
PRUNED_TYPES = {f"bonsai_{t}": t for t in FAMILIES}


def family_of(config) -> Family:
    """The family of a (possibly already pruned) model config; unsupported types name the supported ones."""
    model_type = getattr(config, "model_type", None)
    stock = PRUNED_TYPES.get(model_type, model_type)
    if stock not in FAMILIES:
        raise BonsaiError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[stock]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    family_of(model.config)
    return model.model.layers


def group_size(config) -> int:
    """Query heads per KV head (1 without GQA)."""
    return config.num_attention_heads // config.num_key_value_heads


def query_head_units(config) -> bool:
    """One-KV-head policy: in a model whose layers share one KV head between all query heads (Gemma-3's small
    models), a KV-group unit would be the layer's whole attention, so the attention units are the query heads
    instead (rows of q, columns of o). k / v (and q / k norms, o's bias) belong to the module and go when its
    last query head goes. With more than one KV head, units stay KV groups: query heads cannot leave a group
    without making the groups unequal."""
    return config.num_key_value_heads == 1 and config.num_attention_heads > 1


def unit_heads(config) -> int:
    """Query heads per attention unit: a KV group's, or 1 under the one-KV-head policy."""
    return 1 if query_head_units(config) else group_size(config)


def attn_unit_rows(config) -> tuple[str, ...]:
    """The attention projections whose output rows an attention unit owns (o_proj's input columns in every case):
    q, k and v for a KV group; q alone for a query head."""
    return ("q_proj",) if query_head_units(config) else ("q_proj", "k_proj", "v_proj")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attn_groups(layer: nn.Module, config) -> int:
    """Attention units currently present in a layer: KV groups, or query heads under `query_head_units`."""
    attn = layer.self_attn
    if isinstance(attn, EmptyAttention):
        return 0
    kept = attn.q_proj if query_head_units(config) else attn.k_proj
    return kept.out_features // head_dim(config)


def mlp_channels(layer: nn.Module) -> int:
    mlp = layer.mlp
    return 0 if isinstance(mlp, EmptyMLP) else mlp.gate_proj.out_features


def _has_bias(module: nn.Module, name: str) -> bool:
    linear = getattr(module, name, None)
    return linear is not None and linear.bias is not None


def layer_shapes(model: nn.Module) -> list[dict[str, int | bool]]:
    """Per-layer unit counts, as recorded in a pruned checkpoint's config (`bonsai_layers`), and whether o_proj
    / down_proj carry a bias (FLAP bias compensation can add one where the stock family has none)."""
    return [
        {
            "attn_groups": attn_groups(layer, model.config),
            "mlp_channels": mlp_channels(layer),
            "o_bias": _has_bias(layer.self_attn, "o_proj"),
            "down_bias": _has_bias(layer.mlp, "down_proj"),
        }
        for layer in decoder_layers(model)
    ]


def embedding_params(model: nn.Module) -> int:
    """Input embedding + LM head parameters (counted once when tied)."""
    seen: set[int] = set()
    total = 0
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None:
            continue
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once


def non_embedding_params(model: nn.Module) -> int:
    return total_params(model) - embedding_params(model)
