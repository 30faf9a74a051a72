"""Pipeline report: the pruning trajectory (per round) and the evaluation metrics, as Markdown, CSV and PNG.

Plain functions (no Prefect): the DVC `report` stage calls `write_report`; nothing here computes model outputs.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

ROUND_COLUMNS = (
    "round",
    "non_embedding_params",
    "total_params",
    "sparsity",
    "calib_nll",
    "calib_ppl",
    "removed_attn_groups",
    "removed_mlp_channels",
)


def round_rows(record: dict) -> list[dict]:
    """One row per state of the model: round 0 is the dense model, round k the model after pruning round k."""
    summary = record.get("summary", {})
    rounds = record.get("rounds", [])
    if not rounds:
        raise ValueError("the pruning record has no rounds")
    n0 = summary.get("non_embedding_params_before")
    rows = []
    if n0 and summary.get("calib_ppl_before"):
        rows.append(
            {
                "round": 0,
                "non_embedding_params": n0,
                "total_params": summary.get("total_params_before"),
                "sparsity": 0.0,
                "calib_nll": math.log(summary["calib_ppl_before"]),
                "calib_ppl": summary["calib_ppl_before"],
                "removed_attn_groups": 0,
                "removed_mlp_channels": 0,
            }
        )
    for r in rounds:
        rows.append(
            {
                "round": r["round"] + 1,
                "non_embedding_params": r["non_embedding_params"],
                "total_params": r["total_params"],
                "sparsity": 1 - r["non_embedding_params"] / n0 if n0 else float("nan"),
                "calib_nll": r["calib_nll"],
                "calib_ppl": math.exp(r["calib_nll"]),
                "removed_attn_groups": r["removed_attn_groups"],
                "removed_mlp_channels": r["removed_mlp_channels"],
            }
        )
    return rows


def write_rounds_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROUND_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot_ppl_vs_params(rows: list[dict], metrics: dict, path: Path) -> None:
    """Calibration perplexity per round against non-embedding parameters (log-scale perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    x = [r["non_embedding_params"] / 1e6 for r in rows]
    y = [r["calib_ppl"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.plot(x, y, marker="o", label="calibration perplexity after each round")
    for r, xi, yi in zip(rows, x, y, strict=True):
        ax.annotate(str(r["round"]), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    pruned, dense = metrics.get("pruned", {}), metrics.get("dense", {})
    if pruned.get("ppl") and pruned.get("non_embedding_params"):
        ax.scatter([pruned["non_embedding_params"] / 1e6], [pruned["ppl"]], marker="s", color="C3", zorder=3,
                   label="held-out perplexity, pruned")
    if dense.get("ppl") and dense.get("non_embedding_params"):
        ax.scatter([dense["non_embedding_params"] / 1e6], [dense["ppl"]], marker="D", color="C2", zorder=3,
                   label="held-out perplexity, dense")
    ax.invert_xaxis()  # pruning moves left to right
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("non-embedding parameters (millions)")
    ax.set_ylabel("perplexity")
    ax.set_title("Bonsai: perplexity vs. model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def report_markdown(record: dict, metrics: dict, rows: list[dict]) -> str:
    s = record.get("summary", {})
    dense, pruned = metrics.get("dense", {}), metrics.get("pruned", {})
    ev = metrics.get("eval", {})
    lines = [
        "# Bonsai pipeline report",
        "",
        f"Source model `{record.get('source_model')}` (sha256 `{str(record.get('source_sha256'))[:16]}…`), "
        f"preset `{record.get('preset')}`, seed {record.get('seed')}, "
        f"target sparsity {_fmt(s.get('target_sparsity'))}, realised {_fmt(s.get('sparsity'))} "
        f"in {s.get('rounds')} rounds.",
        "",
        "## Held-out evaluation",
        "",
        f"{ev.get('n_windows')} windows × {ev.get('seq_len')} tokens of `{ev.get('data')}` text.",
        "",
        "| model | non-embedding params | total params | perplexity | KL to dense | top-1 agreement |",
        "|---|---|---|---|---|---|",
        f"| dense | {_fmt(dense.get('non_embedding_params'))} | {_fmt(dense.get('total_params'))} | "
        f"{_fmt(dense.get('ppl'))} | 0 | 1 |",
        f"| pruned | {_fmt(pruned.get('non_embedding_params'))} | {_fmt(pruned.get('total_params'))} | "
        f"{_fmt(pruned.get('ppl'))} | {_fmt(pruned.get('kl'))} | {_fmt(pruned.get('top1_agreement'))} |",
        "",
        "## Rounds",
        "",
        "Round 0 is the dense model; perplexity here is on the calibration windows.",
        "",
        "| round | non-embedding params | sparsity | calibration ppl | attention groups removed | "
        "MLP channels removed |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['round']} | {_fmt(r['non_embedding_params'])} | {r['sparsity']:.2%} | {r['calib_ppl']:.4g} | "
            f"{r['removed_attn_groups']} | {r['removed_mlp_channels']} |"
            for r in rows
        ),
        "",
        "![perplexity vs. parameters](ppl_vs_params.png)",
        "",
        f"Forward tokens spent: {_fmt(s.get('forward_tokens'))}; wall time {_fmt(s.get('wall_seconds'))} s.",
        "",
    ]
    return "\n".join(lines)


def write_report(record: dict, metrics: dict, out_dir: str | Path) -> dict:
    """Write `report.md`, `rounds.csv` and `ppl_vs_params.png` into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = round_rows(record)
    paths = {"csv": out / "rounds.csv", "png": out / "ppl_vs_params.png", "md": out / "report.md"}
    write_rounds_csv(rows, paths["csv"])
    plot_ppl_vs_params(rows, metrics, paths["png"])
    paths["md"].write_text(report_markdown(record, metrics, rows))
    return {k: str(v) for k, v in paths.items()}
