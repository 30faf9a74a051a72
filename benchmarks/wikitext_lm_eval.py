"""Issue 14, point 1: the project's perplexity computation checked against an independent implementation,
lm-evaluation-harness's `wikitext` task (document-level WikiText-2 test, rolling log-likelihood, word and byte
perplexity), on the same model.

Both sides score the same tokens with the same context: the first N documents of wiki.test.raw (split at its
top-level headings, as the document-level dataset is), detokenised by lm-eval's own `wikitext_detokenizer`, each
document one window of [lm-eval's prefix token] + its tokens (documents longer than the model's context are
skipped, so lm-eval's rolling windows are a single window too). lm-eval runs its stock task logic through an
offline mirror of the task (local JSON instead of the hub dataset) and reports word / byte perplexity; the project
sums `bonsai.evaluate.window_nll` over the same windows and applies lm-eval's word and byte counts. Per document,
the two negative log-likelihoods are compared.

    python benchmarks/wikitext_lm_eval.py --docs 8
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
from pathlib import Path

from common import WIKI_TEST_RAW, provenance, rel, write_result

from bonsai.evaluate import window_nll
from bonsai.sources import load_model_and_tokenizer, resolve_model_source

HEADING = re.compile(r"^ = [^=].* = $")
TASK_YAML = """task: bonsai_wikitext
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: !function preprocess.wikitext_detokenizer
process_results: !function preprocess.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
PREPROCESS = "from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa\n"


def documents(path: Path) -> list[str]:
    """wiki.test.raw split into its articles (a top-level ` = Title = ` line starts one)."""
    docs: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if HEADING.match(line.rstrip("\n")) or not docs:
            docs.append([])
        docs[-1].append(line)
    return ["".join(d) for d in docs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "wikitext_lm_eval.json"))
    args = p.parse_args()
    if not WIKI_TEST_RAW.exists():
        raise SystemExit(f"needs ../shared (WikiText-2): {WIKI_TEST_RAW} is absent")
    import lm_eval
    import numpy as np
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

    started = provenance()
    model, tokenizer = load_model_and_tokenizer(resolve_model_source(args.model))
    context = model.config.max_position_embeddings
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=context)
    prefix = lm.prefix_token_id
    chosen = []
    for page in documents(WIKI_TEST_RAW):
        n = len(tokenizer(wikitext_detokenizer({"page": page}), add_special_tokens=False).input_ids)
        if n + 1 <= context:
            chosen.append(page)
        if len(chosen) == args.docs:
            break
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "wikitext_test.jsonl"
        data.write_text("".join(json.dumps({"page": d}) + "\n" for d in chosen), encoding="utf-8")
        (Path(tmp) / "bonsai_wikitext.yaml").write_text(TASK_YAML.format(data=data))
        (Path(tmp) / "preprocess.py").write_text(PREPROCESS)
        res = lm_eval.simple_evaluate(model=lm, tasks=["bonsai_wikitext"], task_manager=TaskManager(include_path=tmp),
                                      log_samples=True, num_fewshot=0)
    theirs = res["results"]["bonsai_wikitext"]
    per_doc_lm_eval = {s["doc"]["page"]: float(s["resps"][0][0]) for s in res["samples"]["bonsai_wikitext"]}

    rows, nll_total, words, bytes_ = [], 0.0, 0, 0
    for page in chosen:
        ids = [prefix, *tokenizer(wikitext_detokenizer({"page": page}), add_special_tokens=False).input_ids]
        nll = float(window_nll(model, np.asarray([ids]), batch_size=1)[0]) * (len(ids) - 1)  # mean -> sum
        counts = process_results({"page": page}, [-nll])
        words, bytes_, nll_total = words + counts["word_perplexity"][1], bytes_ + counts["byte_perplexity"][1], \
            nll_total + nll
        rows.append({"tokens": len(ids) - 1, "project_nll": nll, "lm_eval_nll": -per_doc_lm_eval[page],
                     "relative_difference": abs(nll + per_doc_lm_eval[page]) / nll})
    ours = {"word_perplexity": math.exp(nll_total / words), "byte_perplexity": math.exp(nll_total / bytes_),
            "bits_per_byte": nll_total / bytes_ / math.log(2)}
    write_result(Path(args.out), {
        **started, "model": args.model, "data": f"{rel(WIKI_TEST_RAW)}: first {len(chosen)} articles that fit the "
        f"{context}-token context", "lm_eval_version": lm_eval.__version__, "prefix_token_id": prefix,
        "lm_eval": {k: theirs.get(f"{k},none") for k in ours}, "project": ours,
        "max_relative_difference_per_document": max(r["relative_difference"] for r in rows), "documents": rows,
    })


if __name__ == "__main__":
    main()
