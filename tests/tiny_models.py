"""Random-initialised tiny models of every supported family, built offline from transformers config classes."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=16),
    "qwen2": lambda: Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=8),
    "gemma3_text": lambda: Gemma3TextConfig(**COMMON, num_key_value_heads=1, head_dim=16, sliding_window=8,
                                            layer_types=["sliding_attention", "full_attention"]),
}


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = TINY_CONFIGS[family]()
    model = AutoModelForCausalLM.from_config(config).eval()
    # biases start at zero in some families; randomise them so slicing bugs on biases show up
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_biased_llama(seed: int = 0):
    """A Llama with biases on every projection (attention_bias, mlp_bias), so o/down biases exist."""
    torch.manual_seed(seed)
    config = LlamaConfig(**COMMON, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_tokenizer(vocab_size: int = COMMON["vocab_size"]):
    """A byte-level BPE fast tokenizer over `vocab_size` ids ("<unk>", "<s>", "</s>", then single characters), no
    merges, built offline; it has a BOS token but does not add it (like GPT-2-style tokenizers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    words = ["<unk>", "<s>", "</s>", *sorted(alphabet)[: vocab_size - 3]]
    tk = Tokenizer(models.BPE({w: i for i, w in enumerate(words)}, [], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
