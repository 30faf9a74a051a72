"""Comparison flow: methods × sparsities on the same calibration and evaluation windows.

Each (method, sparsity) runs the prune flow (flows/prune.py: the Bonsai loop or a one-shot method) into
`OUT/runs/<method>-s<pct>`, every run reading the same calibration windows (prepared once, then placed in the
run's work directory where the prune flow finds them intact and reuses them). Every checkpoint, and the dense
model, is evaluated on the same held-out windows (perplexity, KL and top-1 agreement to the dense model).
Results: `OUT/comparison.parquet` (one row per run), `OUT/comparison.md` and `OUT/comparison.png`
(perplexity vs non-embedding parameters — the non-zero count, which for structured methods is the stored
count — with the dense-equivalent size of unstructured / composite runs drawn hollow).

Cost columns: wall time (the prune flow's), forward tokens, backward passes, and peak RSS (this process's
resident set sampled during the run; process-wide, so it includes what earlier runs left behind; stored with
the run's results so that a reused run reports what it measured).
sparse24 has a fixed sparsity (half of every projection): it runs once, at 0.5, whatever `sparsities` says.

Reference metrics (`reference_metrics`): KL and top-1 agreement need a dense forward next to every run's, which
doubles the evaluation cost; off, those columns are NaN. `reference_windows` computes them on the first N
evaluation windows only (perplexity stays on all of them).

Measured speed (`speed`): after the runs, each checkpoint's prefill throughput (batch 1, `speed_prompt_len`
random tokens, median of `speed_runs` timed runs after one warm-up; bonsai.speed.compare_speed) is timed
interleaved with the dense model's in the same process, pair by pair — so at most two models are in memory and
each ratio is taken against a dense model timed under the same background load. `prefill_speedup` is that
ratio; unstructured runs (mosaic, sparse24) keep dense shapes and stored zeros, so theirs stays near 1.
compare_speed also times a short generate (2 new tokens, the least it accepts), which is not reported.

Resuming: a run directory already holding a finished checkpoint with the same configuration is reused, and so
are the evaluation and speed results stored under `OUT/results/` whose key (content hashes of the model, the
windows and the reference, plus the settings) still matches.
"""

# No `from __future__ import annotations`: Prefect validates flow parameters from the real annotations.
import functools
import json
import math
import shutil
from pathlib import Path

import pandas as pd
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from bonsai.architectures import non_embedding_params
from bonsai.artifacts import write_table
from bonsai.checkpoint import RECORD_FILE, is_pruned_checkpoint, load_for_pruning, read_record, write_json_atomic
from bonsai.config import METHODS, PruneConfig, resolve_config
from bonsai.errors import BonsaiError
from bonsai.methods import PeakRSS, count_nonzero_non_embedding
from flows.calibration import calibration_flow
from flows.prune import prune_flow
from tasks.data_tasks import materialize_model_task
from tasks.eval_tasks import evaluate_task
from tasks.prune_tasks import _checkpoint

COLUMNS = [
    "method",
    "target_sparsity",
    "sparsity",
    "dense_sparsity",
    "non_embedding_params",
    "nonzero_non_embedding_params",
    "eval_ppl",
    "kl",
    "top1_agreement",
    "calib_ppl",
    "prefill_tokens_per_s",
    "prefill_speedup",
    "wall_seconds",
    "forward_tokens",
    "backward_passes",
    "peak_rss_mb",
    "out",
]


def plan_runs(
    model: str,
    methods: list[str],
    sparsities: list[float],
    *,
    calib: str,
    calib_windows: int,
    calib_seq_len: int,
    seed: int,
    preset: str,
    overrides: dict | None,
    batch_size: int,
    eval_windows: int,
    eval_seq_len: int,
    reference_windows: int | None,
    speed_prompt_len: int,
    speed_runs: int,
    speed_threads: int | None,
) -> list[tuple[str, float, PruneConfig]]:
    """(method, sparsity, resolved config) of every run, in order, each once. Every bad input is a one-line
    BonsaiError here, before the first (long) run starts; the CLI calls it before starting Prefect at all."""
    if not methods:
        raise BonsaiError("no methods to compare; name at least one of " + ", ".join(METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BonsaiError(f"unknown method(s) {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}")
    if not sparsities:
        raise BonsaiError("no sparsities to compare; give at least one in (0, 1)")
    for s in sparsities:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s < 1.0:
            raise BonsaiError(f"sparsity must be in (0, 1), got {s!r}")
    for name, value, least in (
        ("eval_windows", eval_windows, 1),
        ("eval_seq_len", eval_seq_len, 2),
        ("batch_size", batch_size, 1),
        ("reference_windows", reference_windows, 1),
        ("speed_prompt_len", speed_prompt_len, 1),
        ("speed_runs", speed_runs, 1),
        ("speed_threads", speed_threads, 1),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise BonsaiError(f"{name} must be an integer >= {least}, got {value!r}")
    if reference_windows is not None and reference_windows > eval_windows:
        raise BonsaiError(f"reference_windows ({reference_windows}) cannot exceed eval_windows ({eval_windows})")
    pairs = []
    for method in methods:
        for sparsity in [0.5] if method == "sparse24" else sparsities:
            if (method, sparsity) not in pairs:
                pairs.append((method, sparsity))
    common = {"model": model, "preset": preset, "calib": calib, "seed": seed, "calib_windows": calib_windows,
              "calib_seq_len": calib_seq_len, "eval_batch_size": batch_size}
    clash = sorted(set(overrides or {}) & {"sparsity", "method", *common})
    if clash:  # the comparison sets these for every run itself
        raise BonsaiError(f"overrides cannot set {', '.join(clash)}: they are parameters of the comparison")
    return [(m, s, resolve_config({**common, **(overrides or {}), "sparsity": s, "method": m})) for m, s in pairs]


def _run_name(method: str, sparsity: float) -> str:
    return f"{method}-s{round(sparsity * 1000):03d}"


def _seed_windows(windows: dict, work: Path) -> None:
    """Place the shared calibration windows (and their sidecar) where the prune flow will look for them."""
    src = Path(windows["path"])
    dst = work / "windows"
    dst.mkdir(parents=True, exist_ok=True)
    for f in (src, src.with_name(src.name + ".sha256")):
        if not (dst / f.name).exists():
            shutil.copyfile(f, dst / f.name)


def _finished(run_dir: Path, config: dict) -> dict | None:
    """The summary of a finished run with the same configuration, else None."""
    if not (run_dir / RECORD_FILE).is_file() or not is_pruned_checkpoint(run_dir):
        return None
    record = read_record(run_dir)
    return record.get("summary") if record.get("config") == config else None


def _stored(path: Path, key: dict) -> dict | None:
    """The result stored at `path` under the same key, else None (a missing or unreadable file is recomputed)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved.get("result") if isinstance(saved, dict) and saved.get("key") == key else None


def _store(path: Path, key: dict, result: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"key": key, "result": result})
    return result


def _evaluate(model_ref: dict, windows_ref: dict, batch_size: int, reference: dict | None, path: Path) -> dict:
    """evaluate_task, or its stored result for the same model, windows, reference and batch size."""
    key = {"model_sha256": model_ref["sha256"], "windows_sha256": windows_ref["sha256"],
           "reference_sha256": reference["sha256"] if reference else None, "batch_size": batch_size}
    hit = _stored(path, key)
    return hit if hit is not None else _store(path, key, evaluate_task(model_ref, windows_ref, batch_size, reference))


def _speed_pair(dense, model_ref: dict, dense_ref: dict, settings: dict, path: Path) -> dict:
    """Prefill throughput of one checkpoint and of the dense model (`dense()` loads it), timed interleaved in
    this process."""
    from bonsai.speed import compare_speed

    key = {"model_sha256": model_ref["sha256"], "dense_sha256": dense_ref["sha256"], **settings}
    hit = _stored(path, key)
    if hit is not None:
        return hit
    model = load_for_pruning(model_ref["path"])[0]
    res = compare_speed({"dense": dense(), "pruned": model}, prompt_len=settings["prompt_len"], new_tokens=2,
                        runs=settings["runs"], warmup=1, seed=settings["seed"], memory=False,
                        threads=settings["threads"])
    pruned, base = res["models"]["pruned"], res["models"]["dense"]
    return _store(path, key, {
        "prefill_tokens_per_s": pruned["prefill_tokens_per_s"],
        "dense_prefill_tokens_per_s": base["prefill_tokens_per_s"],
        "prefill_speedup": res["ratios"]["pruned"]["prefill_speedup"],
        "prefill_s": pruned["prefill_s"],
        "dense_prefill_s": base["prefill_s"],
        "torch_threads": pruned["torch_threads"],
    })


def _plot(table: pd.DataFrame, dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_speed = table["prefill_speedup"].notna().any()
    fig, axes = plt.subplots(1, 2 if with_speed else 1, figsize=(13.0 if with_speed else 7.0, 4.8), squeeze=False)
    size_ax = axes[0, 0]
    runs = table[table.method != "dense"]
    for i, (method, rows) in enumerate(runs.groupby("method", sort=True)):
        rows = rows.sort_values("nonzero_non_embedding_params")
        color = f"C{i % 10}"
        size_ax.plot(rows.nonzero_non_embedding_params / 1e6, rows.eval_ppl, marker="o", color=color, label=method)
        hollow = rows[rows.non_embedding_params != rows.nonzero_non_embedding_params]
        if len(hollow):
            size_ax.scatter(hollow.non_embedding_params / 1e6, hollow.eval_ppl, facecolors="none", edgecolors=color)
        if with_speed:
            rows = rows.sort_values("target_sparsity")
            axes[0, 1].plot(rows.prefill_speedup, rows.eval_ppl, marker="o", color=color, label=method)
    panels = [(size_ax, dense["non_embedding_params"] / 1e6,
               "non-embedding parameters, non-zero (millions; hollow: dense-equivalent)", "Perplexity vs size")]
    if with_speed:
        panels.append((axes[0, 1], 1.0, "measured prefill speed-up over dense (batch 1)",
                       "Perplexity vs measured prefill speed-up"))
    for ax, dense_x, xlabel, title in panels:
        ax.scatter([dense_x], [dense["eval_ppl"]], color="black", marker="*", s=90, label="dense", zorder=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out perplexity")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)


def _markdown(table: pd.DataFrame, model: str, notes: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    cols = [c for c in COLUMNS if c != "out"]
    lines = [
        f"### Pruning methods on {model}",
        "",
        "`sparsity`: share of the non-embedding parameters gone (non-zero basis for mosaic, mosaic_composite and "
        "sparse24; `dense_sparsity`: what the stored checkpoint lost).",
        *notes,
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for _, r in table.iterrows()]
    return "\n".join(lines) + "\n"


@flow(name="bonsai-compare")
def compare_flow(
    model: str,
    methods: list[str],
    sparsities: list[float],
    out_dir: str,
    calib: str = "self",
    calib_windows: int = 8,
    calib_seq_len: int = 128,
    eval_data: str = "self",
    eval_windows: int = 16,
    eval_seq_len: int = 128,
    seed: int = 0,
    preset: str = "fast",
    overrides: dict | None = None,
    batch_size: int = 8,
    reference_metrics: bool = True,
    reference_windows: int | None = None,
    speed: bool = True,
    speed_prompt_len: int = 512,
    speed_runs: int = 5,
    speed_threads: int | None = None,
) -> dict:
    """Prune `model` with every method at every sparsity; one table, one markdown file, one plot.

    `reference_metrics`: KL / top-1 agreement to the dense model (a dense forward per run; off: NaN), on the
    first `reference_windows` evaluation windows (None: all). `speed`: measure prefill speed-up (see the module
    docstring) with `speed_prompt_len` tokens, `speed_runs` timed runs, `speed_threads` torch threads (None:
    as set)."""
    plan = plan_runs(model, methods, sparsities, calib=calib, calib_windows=calib_windows,
                     calib_seq_len=calib_seq_len, seed=seed, preset=preset, overrides=overrides,
                     batch_size=batch_size, eval_windows=eval_windows, eval_seq_len=eval_seq_len,
                     reference_windows=reference_windows, speed_prompt_len=speed_prompt_len,
                     speed_runs=speed_runs, speed_threads=speed_threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results"
    model_ref = materialize_model_task(model)
    calib_ref = calibration_flow(model, calib, calib_windows, calib_seq_len, seed, "calibration",
                                 str(out / "windows"))
    eval_ref = calibration_flow(model, eval_data, eval_windows, eval_seq_len, seed, "evaluation",
                                str(out / "windows"))
    # KL / top-1 on a prefix of the evaluation windows: a second, smaller window set (the first N chunks of a
    # text source), so the dense forward they need runs on N windows instead of all
    subset = reference_metrics and reference_windows is not None and reference_windows < eval_windows
    ref_eval = (calibration_flow(model, eval_data, reference_windows, eval_seq_len, seed, "evaluation",
                                 str(out / "windows")) if subset else eval_ref)

    def evaluate(name: str, ref: dict) -> dict:
        reference = model_ref if reference_metrics and not subset else None
        metrics = _evaluate(ref, eval_ref, batch_size, reference, results / f"{name}.eval.json")
        if subset:
            faithful = _evaluate(ref, ref_eval, batch_size, model_ref, results / f"{name}.reference.json")
            metrics = {**metrics, "kl": faithful["kl"], "top1_agreement": faithful["top1_agreement"]}
        return metrics

    dense_metrics = _evaluate(model_ref, eval_ref, batch_size, None, results / "dense.eval.json")
    dense_model = _checkpoint(model_ref["path"], model_ref["sha256"])[0]
    n_dense = non_embedding_params(dense_model)
    rows = [
        {
            "method": "dense",
            "target_sparsity": 0.0,
            "sparsity": 0.0,
            "dense_sparsity": 0.0,
            "non_embedding_params": n_dense,
            "nonzero_non_embedding_params": count_nonzero_non_embedding(dense_model),
            "eval_ppl": dense_metrics["ppl"],
            "kl": 0.0 if reference_metrics else float("nan"),
            "top1_agreement": 1.0 if reference_metrics else float("nan"),
            "calib_ppl": float("nan"),
            "prefill_tokens_per_s": float("nan"),
            "prefill_speedup": float("nan"),
            "wall_seconds": 0.0,
            "forward_tokens": 0,
            "backward_passes": 0,
            "peak_rss_mb": float("nan"),
            "out": model,  # as given: the resolved local path would tie the table to this machine
        }
    ]
    run_refs = []
    for method, sparsity, cfg in plan:
        name = _run_name(method, sparsity)
        run_dir = out / "runs" / name
        summary = _finished(run_dir, cfg.to_dict())
        rss = float("nan")
        if summary is None:
            work = run_dir.with_name(run_dir.name + ".work")
            _seed_windows(calib_ref, work)
            with PeakRSS() as sampler:
                summary = prune_flow(cfg, str(run_dir), work_dir=str(work), overwrite=True)
            rss = sampler.peak_mb
        run_ref = materialize_model_task(str(run_dir))
        run_refs.append((name, run_ref))
        cost_path, cost_key = results / f"{name}.cost.json", {"model_sha256": run_ref["sha256"]}
        if math.isnan(rss):  # a reused run: the peak RSS measured when it ran (the one-shot task's if not stored)
            rss = (_stored(cost_path, cost_key) or {}).get("peak_rss_mb", summary.get("peak_rss_mb", float("nan")))
        else:
            _store(cost_path, cost_key, {"peak_rss_mb": rss})
        metrics = evaluate(name, run_ref)
        n_after = summary["non_embedding_params_after"]
        nonzero = summary.get("nonzero_non_embedding_params_after", n_after)
        rows.append(
            {
                "method": method,
                "target_sparsity": sparsity,
                "sparsity": summary["sparsity"],
                "dense_sparsity": 1 - n_after / summary["non_embedding_params_before"],
                "non_embedding_params": n_after,
                "nonzero_non_embedding_params": nonzero,
                "eval_ppl": metrics["ppl"],
                "kl": metrics.get("kl", float("nan")),
                "top1_agreement": metrics.get("top1_agreement", float("nan")),
                "calib_ppl": summary["calib_ppl_after"],
                "prefill_tokens_per_s": float("nan"),
                "prefill_speedup": float("nan"),
                "wall_seconds": summary["wall_seconds"],
                "forward_tokens": summary["forward_tokens"],
                "backward_passes": summary.get("backward_passes", 0),
                "peak_rss_mb": rss,
                "out": str(run_dir),
            }
        )
    speed_settings = {"prompt_len": speed_prompt_len, "runs": speed_runs, "threads": speed_threads, "seed": seed}
    if speed:  # after every run, so no pruning competes with the timing
        # a private copy, loaded once and only if some pair is not stored yet: the prune tasks share the
        # cached `dense_model` and may have worked on it in place
        dense_copy = functools.cache(lambda: load_for_pruning(model_ref["path"])[0])
        dense_rates = []
        for row, (name, run_ref) in zip(rows[1:], run_refs, strict=True):
            pair = _speed_pair(dense_copy, run_ref, model_ref, speed_settings, results / f"{name}.speed.json")
            row["prefill_tokens_per_s"] = pair["prefill_tokens_per_s"]
            row["prefill_speedup"] = pair["prefill_speedup"]
            dense_rates.append(pair["dense_prefill_tokens_per_s"])
        rows[0]["prefill_tokens_per_s"] = float(pd.Series(dense_rates).median())
        rows[0]["prefill_speedup"] = 1.0
    table = pd.DataFrame(rows, columns=COLUMNS)
    meta = {"model": model, "calibration_windows_sha256": calib_ref["sha256"],
            "evaluation_windows_sha256": eval_ref["sha256"], "methods": methods, "sparsities": sparsities,
            "reference_metrics": reference_metrics,
            "reference_windows_sha256": ref_eval["sha256"] if reference_metrics else None,
            "speed": speed_settings if speed else None}
    write_table(table, out / "comparison.parquet", meta)
    notes = [f"Perplexity on {eval_windows} × {eval_seq_len}-token windows of `{eval_data}`."]
    if reference_metrics:
        notes.append(f"`kl`, `top1_agreement`: to the dense model, on the first {ref_eval['n_windows']} of them.")
    if speed:
        notes.append(f"`prefill_speedup`: prefill throughput over the dense model's (batch 1, {speed_prompt_len} "
                     f"tokens, median of {speed_runs} runs, timed interleaved with the dense model); "
                     "the dense row's `prefill_tokens_per_s` is the median over those pairings.")
    markdown = _markdown(table, model, notes)
    (out / "comparison.md").write_text(markdown)
    _plot(table, rows[0], out / "comparison.png")
    create_markdown_artifact(markdown, key="bonsai-compare", description="pruning methods compared")
    return {"table": str(out / "comparison.parquet"), "markdown": str(out / "comparison.md"),
            "plot": str(out / "comparison.png"), "rows": len(table)}
