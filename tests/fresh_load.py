"""Load a pruned checkpoint the way a user of plain transformers would, in a process that cannot import this
project; print one JSON line (class, parameter count, tokens generated)."""

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

directory = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
if "--no-tokenizer" in sys.argv:
    prompt = torch.tensor([[1, 5, 9, 3]])
    text = None
else:
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids
out = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
if "--no-tokenizer" not in sys.argv:
    text = tokenizer.decode(out[0])
print(json.dumps({"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
                  "generated": int(out.shape[1] - prompt.shape[1]), "text": text}))
