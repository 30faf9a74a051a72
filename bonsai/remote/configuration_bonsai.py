"""Configurations of Bonsai-pruned checkpoints.

Shipped inside every pruned checkpoint (referenced by `auto_map`), so it may import only torch and
transformers. Each class is the stock configuration of its family under a `bonsai_<family>` model type: a
pruned model has per-layer head and MLP widths that the stock classes cannot express, and the distinct model
type makes a stock loader ask for `trust_remote_code=True` instead of failing on a shape mismatch.
The per-layer shapes live in the `bonsai_layers` attribute: one `{"attn_groups": n, "mlp_channels": m}`
per decoder layer (a group = one KV head with the query heads that share it).
"""

from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config


class BonsaiLlamaConfig(LlamaConfig):
    model_type = "bonsai_llama"


class BonsaiMistralConfig(MistralConfig):
    model_type = "bonsai_mistral"


class BonsaiQwen2Config(Qwen2Config):
    model_type = "bonsai_qwen2"


class BonsaiQwen3Config(Qwen3Config):
    model_type = "bonsai_qwen3"


class BonsaiGemma3TextConfig(Gemma3TextConfig):
    model_type = "bonsai_gemma3_text"
