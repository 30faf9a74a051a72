"""Issue 14: dense perplexity through the project (`bonsai eval`'s windows and loss) next to stock transformers on
the same windows, for every family with real weights here (SmolLM2-135M: Llama family, a tokenizer that adds no
BOS; stories260K: Llama family, a SentencePiece tokenizer that adds BOS).

The project: `prepare_windows` (WikiText-2 test raw, the first N windows; BOS at each window's start where the
tokenizer adds one) and `bonsai.evaluate.perplexity`. Stock: the model loaded with `AutoModelForCausalLM` and its
own loss (`labels=input_ids`, mean over the windows' predicted tokens) on the same id tensor. Also stated: the
perplexity of the same text cut without BOS, to show what the window policy changes.

    python benchmarks/family_ppl.py
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from common import SHARED, WIKI_TEST_RAW, provenance, rel, write_result

from bonsai.data import make_windows, prepare_windows, read_text_source, tokenize_stream
from bonsai.evaluate import perplexity
from bonsai.sources import load_model_and_tokenizer, resolve_model_source

MODELS = {"smollm2-135m": "smollm2-135m", "stories260K": str(SHARED / "assets/models/stories260K")}


def _stock_ppl(path: Path, windows, batch_size: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.as_tensor(windows)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            loss = model(input_ids=batch, labels=batch).loss  # mean over the batch's predicted tokens
            n = batch.shape[0] * (batch.shape[1] - 1)
            total, count = total + loss.item() * n, count + n
    return math.exp(total / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "family_ppl.json"))
    args = p.parse_args()
    if not WIKI_TEST_RAW.exists():
        raise SystemExit(f"needs ../shared (WikiText-2): {WIKI_TEST_RAW} is absent")
    result = {**provenance(), "data": f"{rel(WIKI_TEST_RAW)}: first {args.windows} windows x {args.seq_len} tokens",
              "models": {}}
    for name, source in MODELS.items():
        path = resolve_model_source(source)
        model, tokenizer = load_model_and_tokenizer(path)
        windows, meta = prepare_windows(str(WIKI_TEST_RAW), tokenizer, n_windows=args.windows, seq_len=args.seq_len,
                                        seed=0, purpose="evaluation", model_type=model.config.model_type)
        stream = tokenize_stream(tokenizer, read_text_source(str(WIKI_TEST_RAW)), leading_bos=False)
        no_bos = make_windows(stream, args.windows, args.seq_len, 0, sample=False)
        result["models"][name] = {
            "family": model.config.model_type,
            "bos_per_window": meta["bos_per_window"],
            "project_ppl": perplexity(model, windows, args.batch_size),
            "stock_transformers_ppl": _stock_ppl(path, windows, args.batch_size),
            "project_ppl_windows_without_bos": perplexity(model, no_bos, args.batch_size),
        }
        print(name, result["models"][name], flush=True)
    write_result(Path(args.out), result)


if __name__ == "__main__":
    main()
