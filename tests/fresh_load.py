"""Load pruned checkpoints the way a user of plain transformers would, in a process that cannot import this
project, and print one JSON line.

    fresh_load.py DIR [--no-tokenizer]   class, parameter count, tokens generated (and the text, with the tokenizer)
    fresh_load.py --spec SPEC.json       per directory of the spec: the logits of the spec's ids (one full forward),
                                         the greedy continuation through the KV cache and the raw logits of each
                                         cached decoding step
"""

import importlib.abc
import json
import sys


class _BlockProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("bonsai", "flows", "tasks"):
            raise ImportError(f"the project module {name} must not be needed to load a pruned checkpoint")


sys.meta_path.insert(0, _BlockProject())
sys.path = [p for p in sys.path if p not in ("", ".")]

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def _summary(directory: str, with_tokenizer: bool) -> dict:
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    text = None
    if with_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
        prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids
    else:
        prompt = torch.tensor([[1, 5, 9, 3]])
    out = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    if with_tokenizer:
        text = tokenizer.decode(out[0])
    return {"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
            "generated": int(out.shape[1] - prompt.shape[1]), "text": text}


def _logits(spec: dict) -> dict:
    ids = torch.tensor(spec["ids"])
    result = {}
    for directory in spec["dirs"]:
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # decode every step asked for
        with torch.no_grad():
            full = model(ids).logits
            gen = model.generate(ids, max_new_tokens=spec["new_tokens"], do_sample=False, use_cache=True,
                                 output_logits=True, return_dict_in_generate=True)
        result[directory] = {"class": type(model).__name__, "logits": full.tolist(),
                             "sequences": gen.sequences.tolist(),
                             "step_logits": torch.stack(gen.logits, 1).tolist()}
    return result


if sys.argv[1] == "--spec":
    with open(sys.argv[2]) as f:
        print(json.dumps(_logits(json.load(f))))
else:
    print(json.dumps(_summary(sys.argv[1], "--no-tokenizer" not in sys.argv)))
