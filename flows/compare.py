"""Comparison flow: methods × sparsities on the same calibration and evaluation windows.

Each (method, sparsity) runs the prune flow (flows/prune.py: the Bonsai loop or a one-shot method) into
`OUT/runs/<method>-s<pct>`, every run reading the same calibration windows (prepared once, then placed in the
run's work directory where the prune flow finds them intact and reuses them). Every checkpoint, and the dense
model, is evaluated on the same held-out windows (perplexity, KL and top-1 agreement to the dense model).
Results: `OUT/comparison.parquet` (one row per run), `OUT/comparison.md` and `OUT/comparison.png`
(perplexity vs non-embedding parameters — the non-zero count, which for structured methods is the stored
count — with the dense-equivalent size of unstructured / composite runs drawn hollow).

Cost columns: wall time (the prune flow's), forward tokens, backward passes, and peak RSS (this process's
resident set sampled during the run; process-wide, so it includes what earlier runs left behind).
sparse24 has a fixed sparsity (half of every projection): it runs once, at 0.5, whatever `sparsities` says.
A run directory already holding a finished checkpoint with the same configuration is reused.
"""

# No `from __future__ import annotations`: Prefect validates flow parameters from the real annotations.
import math
import shutil
from pathlib import Path

import pandas as pd
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from bonsai.architectures import non_embedding_params
from bonsai.artifacts import write_table
from bonsai.checkpoint import RECORD_FILE, is_pruned_checkpoint, read_record
from bonsai.config import resolve_config
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
    "wall_seconds",
    "forward_tokens",
    "backward_passes",
    "peak_rss_mb",
    "out",
]


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


def _plot(table: pd.DataFrame, dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for i, (method, rows) in enumerate(table[table.method != "dense"].groupby("method", sort=True)):
        rows = rows.sort_values("nonzero_non_embedding_params")
        color = f"C{i % 10}"
        ax.plot(rows.nonzero_non_embedding_params / 1e6, rows.eval_ppl, marker="o", color=color, label=method)
        hollow = rows[rows.non_embedding_params != rows.nonzero_non_embedding_params]
        if len(hollow):
            ax.scatter(hollow.non_embedding_params / 1e6, hollow.eval_ppl, facecolors="none", edgecolors=color)
    ax.scatter([dense["non_embedding_params"] / 1e6], [dense["eval_ppl"]], color="black", marker="*", s=90,
               label="dense", zorder=3)
    ax.set_xlabel("non-embedding parameters, non-zero (millions; hollow: dense-equivalent)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title("Perplexity vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)


def _markdown(table: pd.DataFrame, model: str) -> str:
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
) -> dict:
    """Prune `model` with every method at every sparsity; one table, one markdown file, one plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_ref = materialize_model_task(model)
    calib_ref = calibration_flow(model, calib, calib_windows, calib_seq_len, seed, "calibration",
                                 str(out / "windows"))
    eval_ref = calibration_flow(model, eval_data, eval_windows, eval_seq_len, seed, "evaluation",
                                str(out / "windows"))
    dense_metrics = evaluate_task(model_ref, eval_ref, batch_size)
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
            "kl": 0.0,
            "top1_agreement": 1.0,
            "calib_ppl": float("nan"),
            "wall_seconds": 0.0,
            "forward_tokens": 0,
            "backward_passes": 0,
            "peak_rss_mb": float("nan"),
            "out": model_ref["path"],
        }
    ]
    runs = []
    for method in methods:
        for sparsity in [0.5] if method == "sparse24" else sparsities:
            if (method, sparsity) not in runs:
                runs.append((method, sparsity))
    for method, sparsity in runs:
        values = {"model": model, "sparsity": sparsity, "method": method, "preset": preset, "calib": calib,
                  "seed": seed, "calib_windows": calib_windows, "calib_seq_len": calib_seq_len,
                  "eval_batch_size": batch_size, **(overrides or {})}
        cfg = resolve_config(values)
        run_dir = out / "runs" / _run_name(method, sparsity)
        summary = _finished(run_dir, cfg.to_dict())
        rss = float("nan")
        if summary is None:
            work = run_dir.with_name(run_dir.name + ".work")
            _seed_windows(calib_ref, work)
            with PeakRSS() as sampler:
                summary = prune_flow(cfg, str(run_dir), work_dir=str(work), overwrite=True)
            rss = sampler.peak_mb
        run_ref = materialize_model_task(str(run_dir))
        metrics = evaluate_task(run_ref, eval_ref, batch_size, model_ref)
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
                "kl": metrics["kl"],
                "top1_agreement": metrics["top1_agreement"],
                "calib_ppl": summary["calib_ppl_after"],
                "wall_seconds": summary["wall_seconds"],
                "forward_tokens": summary["forward_tokens"],
                "backward_passes": summary.get("backward_passes", 0),
                "peak_rss_mb": summary.get("peak_rss_mb", rss) if math.isnan(rss) else rss,
                "out": str(run_dir),
            }
        )
    table = pd.DataFrame(rows, columns=COLUMNS)
    meta = {"model": model, "calibration_windows_sha256": calib_ref["sha256"],
            "evaluation_windows_sha256": eval_ref["sha256"], "methods": methods, "sparsities": sparsities}
    write_table(table, out / "comparison.parquet", meta)
    markdown = _markdown(table, model)
    (out / "comparison.md").write_text(markdown)
    _plot(table, rows[0], out / "comparison.png")
    create_markdown_artifact(markdown, key="bonsai-compare", description="pruning methods compared")
    return {"table": str(out / "comparison.parquet"), "markdown": str(out / "comparison.md"),
            "plot": str(out / "comparison.png"), "rows": len(table)}
