"""A Markdown report of one pruning run, with PNG plots (matplotlib, Agg backend: no display, no browser).

``write_report`` reads the pruning record (``pruning_record.json``: ``rounds``, ``kept_units``, ``summary``) and
whatever evaluations were run — perplexity metrics, zero-shot accuracy (:mod:`bonsai.zeroshot`), speed
(:mod:`bonsai.speed`) — and writes into ``run_dir``:

* ``report.md``;
* ``ppl_vs_params.png``: calibration perplexity (``exp(calib_nll)``) against non-embedding parameters, one point
  per round, plus the dense model when the record's ``summary`` has it;
* ``kept_units.png``: per layer, which original attention KV groups and MLP channels were kept (heatmaps) and the
  kept share per layer.

Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bonsai.errors import BonsaiError

__all__ = ["original_shapes_from_config", "write_report"]

REPORT_FILE = "report.md"
PPL_PLOT = "ppl_vs_params.png"
KEPT_PLOT = "kept_units.png"


# ---------------------------------------------------------------------------------------------------- helpers


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = _tmp(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_fig_atomic(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = _tmp(path)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.4f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:,.1f}"
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v) if len(v) <= 6 else f"[{len(v)} values]"
    if isinstance(v, Mapping):
        return f"{{{len(v)} keys}}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    # strings are taken as Markdown (e.g. "**all**") apart from pipes and newlines, which would break the table
    out += [
        "| "
        + " | ".join(c.replace("|", "\\|").replace("\n", " ") if isinstance(c, str) else _fmt(c) for c in row)
        + " |"
        for row in rows
    ]
    return "\n".join(out) + "\n"


def _tps(v: Any) -> str:
    return "—" if v is None else f"{v:,.1f}"


def _bytes(n: Any) -> str:
    if n is None:
        return "—"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


# ---------------------------------------------------------------------------------------------------- shapes


def original_shapes_from_config(config: Any) -> list[dict[str, int]]:
    """Per-layer unit counts of the unpruned model, from its (stock) config object or dict: ``attn_groups`` =
    ``num_key_value_heads`` (or ``num_attention_heads``; the query heads when there is one KV head, whose units
    they are), ``mlp_channels`` = ``intermediate_size``."""
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    n_layers = get("num_hidden_layers")
    kv = get("num_key_value_heads") or get("num_attention_heads")
    if kv == 1:
        kv = get("num_attention_heads")
    inter = get("intermediate_size")
    if not n_layers or not kv or not inter:
        raise BonsaiError("config lacks num_hidden_layers / num_key_value_heads / intermediate_size")
    return [{"attn_groups": int(kv), "mlp_channels": int(inter)} for _ in range(int(n_layers))]


def _original_counts(
    record: Mapping[str, Any], kept: Mapping[str, list[list[int]]], original_shapes: Any
) -> tuple[list[int], list[int], str]:
    """(attn groups per layer, MLP channels per layer, where the counts came from)."""
    n_layers = len(kept["attn"])
    src = original_shapes
    how = "given"
    if src is None:
        for key in ("original_shapes", "original_layer_shapes"):
            if record.get(key) is not None:
                src, how = record[key], f"record[{key!r}]"
                break
    if src is not None:
        shapes = src if isinstance(src, list) else original_shapes_from_config(src)
        if len(shapes) != n_layers:
            raise BonsaiError(f"original shapes list {len(shapes)} layers, kept_units {n_layers}")
        attn = [int(s["attn_groups"]) for s in shapes]
        mlp = [int(s["mlp_channels"]) for s in shapes]
    else:
        # Same count in every layer for all supported families: the largest kept index + 1 (a lower bound when the
        # last units were pruned in every layer).
        how = "inferred from kept indices (pass original_shapes for exact counts)"
        a = max((max(v) + 1 for v in kept["attn"] if v), default=0)
        m = max((max(v) + 1 for v in kept["mlp"] if v), default=0)
        attn, mlp = [a] * n_layers, [m] * n_layers
    for kind, counts in (("attn", attn), ("mlp", mlp)):
        for li, idx in enumerate(kept[kind]):
            if idx and max(idx) >= counts[li]:
                raise BonsaiError(f"layer {li} {kind}: kept index {max(idx)} >= original count {counts[li]}")
    return attn, mlp, how


# ---------------------------------------------------------------------------------------------------- plots


ROUNDS_CSV = "rounds.csv"


def _write_rounds_csv(record: Mapping[str, Any], path: Path) -> bool:
    """One row per model state (round 0 = the dense model, round k = after pruning round k), for `dvc plots`."""
    rounds = [r for r in record.get("rounds") or [] if "non_embedding_params" in r and "calib_nll" in r]
    if not rounds:
        return False
    summary = record.get("summary") or {}
    rows = []
    if summary.get("non_embedding_params_before") and summary.get("calib_ppl_before"):
        rows.append((0, summary["non_embedding_params_before"], summary["calib_ppl_before"]))
    rows += [
        (int(r.get("round", i)) + 1, r["non_embedding_params"], math.exp(r["calib_nll"])) for i, r in enumerate(rounds)
    ]
    n0 = rows[0][1]
    text = "round,non_embedding_params,sparsity,calib_ppl\n" + "".join(
        f"{step},{n},{1 - n / n0:.6f},{ppl:.6f}\n" for step, n, ppl in rows
    )
    _write_text_atomic(path, text)
    return True


def _plot_ppl(record: Mapping[str, Any], path: Path) -> bool:
    rounds = [r for r in record.get("rounds") or [] if "non_embedding_params" in r and "calib_nll" in r]
    summary = record.get("summary") or {}
    if not rounds:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [r["non_embedding_params"] / 1e6 for r in rounds]
    ys = [math.exp(r["calib_nll"]) for r in rounds]
    if summary.get("non_embedding_params_before") and summary.get("calib_ppl_before"):
        x0, y0 = summary["non_embedding_params_before"] / 1e6, summary["calib_ppl_before"]
        ax.plot([x0, xs[0]], [y0, ys[0]], color="tab:blue", alpha=0.5)
        ax.scatter([x0], [y0], color="black", zorder=3, label="dense")
    ax.plot(xs, ys, marker="o", color="tab:blue", label="after round")
    for r, x, y in zip(rounds, xs, ys, strict=True):
        ax.annotate(str(r.get("round", "")), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.invert_xaxis()  # pruning proceeds to the right
    ax.set_xlabel("non-embedding parameters (millions)")
    ax.set_ylabel("calibration perplexity")
    ax.set_title("Perplexity vs size across rounds")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_fig_atomic(fig, path)
    return True


def _plot_kept(kept: Mapping[str, list[list[int]]], attn_n: list[int], mlp_n: list[int], path: Path) -> None:
    import numpy as np

    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    n_layers = len(attn_n)
    grids = {}
    for kind, counts in (("attn", attn_n), ("mlp", mlp_n)):
        grid = np.full((n_layers, max(counts) if counts else 0), np.nan)
        for li, n in enumerate(counts):
            grid[li, :n] = 0.0
            grid[li, kept[kind][li]] = 1.0
        grids[kind] = grid
    frac = {
        kind: [len(kept[kind][li]) / n if n else 0.0 for li, n in enumerate(counts)]
        for kind, counts in (("attn", attn_n), ("mlp", mlp_n))
    }
    height = max(3.0, 0.22 * n_layers + 1.5)
    fig, axes = plt.subplots(1, 3, figsize=(14, height), gridspec_kw={"width_ratios": [1, 3, 1.2]})
    cmap = plt.get_cmap("Greens").with_extremes(bad="white")
    for ax, kind, title in ((axes[0], "attn", "attention KV groups"), (axes[1], "mlp", "MLP channels")):
        ax.imshow(grids[kind], aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="antialiased", origin="upper")
        ax.set_title(f"kept {title} (green)")
        ax.set_xlabel("original index")
        ax.set_ylabel("layer")
        ax.set_yticks(range(0, n_layers, max(1, n_layers // 16)))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    y = np.arange(n_layers)
    axes[2].barh(y - 0.2, frac["attn"], height=0.4, label="attn groups")
    axes[2].barh(y + 0.2, frac["mlp"], height=0.4, label="MLP channels")
    axes[2].set_ylim(n_layers - 0.5, -0.5)
    axes[2].set_yticks(range(0, n_layers, max(1, n_layers // 16)))
    axes[2].set_xlim(0, 1)
    axes[2].set_xlabel("kept share")
    axes[2].set_title("kept share per layer")
    axes[2].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.06 - 0.4 / height), ncol=2)
    _save_fig_atomic(fig, path)


# ---------------------------------------------------------------------------------------------------- sections


def _section_summary(record: Mapping[str, Any]) -> str:
    lines = []
    info = [(k, record.get(k)) for k in ("source_model", "method", "preset", "tool", "seed") if record.get(k)]
    calib = record.get("calibration") or {}
    if calib:
        info.append(("calibration", f"{calib.get('source')} ({calib.get('n_windows')} × {calib.get('seq_len')})"))
    summary = record.get("summary") or {}
    info += [(k, v) for k, v in summary.items() if not isinstance(v, Mapping | list)]
    if info:
        lines.append(_table(["key", "value"], [[k, v] for k, v in info]))
    return "\n".join(lines)


def _section_rounds(record: Mapping[str, Any]) -> str:
    rounds = record.get("rounds") or []
    if not rounds:
        return "_No rounds recorded._\n"
    rows = []
    for r in rounds:
        nll = r.get("calib_nll")
        rows.append(
            [
                r.get("round"),
                r.get("budget"),
                r.get("non_embedding_params"),
                r.get("total_params"),
                math.exp(nll) if nll is not None else None,
                r.get("removed_attn_groups"),
                r.get("removed_mlp_channels"),
            ]
        )
    return _table(
        [
            "round",
            "budget",
            "non-emb. params",
            "total params",
            "calib. ppl",
            "attn groups removed",
            "MLP channels removed",
        ],
        rows,
    )


def _section_kept(kept, attn_n, mlp_n, how) -> str:
    rows = []
    for li in range(len(attn_n)):
        rows.append([li, f"{len(kept['attn'][li])} / {attn_n[li]}", f"{len(kept['mlp'][li])} / {mlp_n[li]}"])
    tot_a = sum(len(v) for v in kept["attn"])
    tot_m = sum(len(v) for v in kept["mlp"])
    rows.append(["**all**", f"{tot_a} / {sum(attn_n)}", f"{tot_m} / {sum(mlp_n)}"])
    return f"Original counts: {how}.\n\n" + _table(["layer", "attn KV groups kept", "MLP channels kept"], rows)


def _section_adaptation(adaptation: Mapping[str, Any]) -> str:
    """Post-pruning adaptation (bonsai.adapt): held-out perplexity before → after, training loss, knobs."""
    cfg = adaptation.get("config") or {}
    ev = adaptation.get("eval") or {}
    rows: list[list[Any]] = []
    if ev:
        rows.append(
            [
                f"held-out perplexity ({ev.get('data')}, {ev.get('n_windows')} × {ev.get('seq_len')})",
                f"{_fmt(ev.get('ppl_before'))} → {_fmt(ev.get('ppl_after'))}",
            ]
        )
    rows.append(["training loss (CE + KL weight · KL)", f"{_fmt(adaptation.get('loss_start'))} → "
                 f"{_fmt(adaptation.get('loss_end'))}"])
    rows += [
        ["steps", adaptation.get("steps")],
        ["tokens seen", adaptation.get("tokens_seen")],
        ["training data", (adaptation.get("data") or {}).get("source")],
        ["teacher", adaptation.get("teacher")],
    ]
    rows += [[k, v] for k, v in cfg.items() if k not in ("steps",)]
    return _table(["key", "value"], rows)


def _section_eval(eval_metrics: Mapping[str, Any]) -> str:
    nested = {k: v for k, v in eval_metrics.items() if isinstance(v, Mapping)}
    flat = {k: v for k, v in eval_metrics.items() if not isinstance(v, Mapping | list)}
    out = []
    if flat:
        out.append(_table(["metric", "value"], [[k, v] for k, v in flat.items()]))
    if nested:
        keys: list[str] = []
        for v in nested.values():
            keys += [k for k, x in v.items() if k not in keys and not isinstance(x, Mapping | list)]
        out.append(_table(["metric", *nested], [[k, *(v.get(k) for v in nested.values())] for k in keys]))
    return "\n".join(out) or "_empty_\n"


def _zeroshot_runs(zeroshot: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    if "tasks" in zeroshot:
        return {"model": zeroshot}
    runs = {k: v for k, v in zeroshot.items() if isinstance(v, Mapping) and "tasks" in v}
    if not runs:
        raise BonsaiError("zeroshot must be a run_zeroshot result or a dict of name -> run_zeroshot result")
    return runs


def _section_zeroshot(zeroshot: Mapping[str, Any]) -> str:
    runs = _zeroshot_runs(zeroshot)
    tasks: list[str] = []
    for r in runs.values():
        tasks += [t for t in r["tasks"] if t not in tasks]
    rows = []
    for t in tasks:
        first = next((r["tasks"][t] for r in runs.values() if t in r["tasks"]), {})
        row = [t, first.get("metric")]
        for r in runs.values():
            res = r["tasks"].get(t)
            if res is None:
                row.append(None)
                continue
            err = res.get(f"{res['metric']}_stderr")
            row.append(f"{res['value']:.4f}" + (f" ± {err:.4f}" if err is not None else ""))
        row.append(first.get("n"))
        rows.append(row)
    rows.append(["**mean**", "", *(f"**{r['mean']:.4f}**" for r in runs.values()), ""])
    meta = []
    for name, r in runs.items():
        limit = r.get("limit")
        meta.append(
            f"- {name}: lm-eval {r.get('lm_eval_version')}, data {r.get('source', '?')}, "
            + (f"first {limit} documents per task" if limit else "full splits")
        )
    note = (
        "Headline metric: `acc_norm` where the stock lm-eval task reports it (hellaswag, piqa, arc_easy, "
        "arc_challenge, openbookqa), `acc` otherwise (boolq, winogrande); ± is lm-eval's standard error.\n\n"
    )
    return note + _table(["task", "metric", *runs, "n"], rows) + "\n" + "\n".join(meta) + "\n"


def _speed_runs(speed: Mapping[str, Any]) -> tuple[dict[str, Mapping[str, Any]], dict[str, Mapping[str, Any]]]:
    if "models" in speed:
        return dict(speed["models"]), dict(speed.get("ratios") or {})
    if "prefill_tokens_per_s" in speed:
        return {"model": speed}, {}
    raise BonsaiError("speed must be a measure_speed or compare_speed result")


def _section_speed(speed: Mapping[str, Any]) -> str:
    runs, ratios = _speed_runs(speed)
    rows = []
    for name, r in runs.items():
        rat = ratios.get(name, {})

        def x(key: str, rat: Mapping[str, Any] = rat) -> str:
            v = rat.get(key)
            return f" ({v:.2f}×)" if v is not None and len(runs) > 1 else ""

        rows.append(
            [
                name,
                f"{_fmt(r.get('params'))}{x('params_ratio')}",
                f"{_tps(r.get('prefill_tokens_per_s'))}{x('prefill_speedup')}",
                f"{_tps(r.get('decode_tokens_per_s'))}{x('decode_speedup')}",
                f"{_tps(r.get('weight_stream_tokens_per_s'))}{x('weight_stream_speedup')}",
                _bytes(r.get("peak_memory_bytes")),
                f"{_bytes(r.get('peak_memory_delta_bytes'))}{x('peak_memory_delta_ratio')}",
                _bytes(r.get("model_bytes")),
                _bytes(r.get("disk_bytes")) if r.get("disk_bytes") is not None else "—",
            ]
        )
    first = next(iter(runs.values()))
    note = (
        f"Batch 1, prompt {first.get('prompt_len')} tokens, {first.get('new_tokens')} greedy new tokens with KV cache; "
        f"median of {first.get('runs')} runs after {first.get('warmup')} warm-up; device {first.get('device')}, "
        f"{first.get('torch_threads')} torch threads, {first.get('dtype')}. Memory: {first.get('memory_method', '—')} "
        "(peak = process/allocator peak; Δ = above the level at the start of the pass). Weight streaming: one "
        "token through every linear layer and nothing else, the decode rate if only reading the weights cost "
        "time; its ratio is the decode speed-up's ceiling on this machine. Ratios are against the first model.\n\n"
    )
    return note + _table(
        ["model", "params", "prefill tok/s", "decode tok/s", "weight streaming tok/s", "peak mem", "Δ mem", "weights",
         "on disk"],
        rows,
    )


# ---------------------------------------------------------------------------------------------------- entry point


def write_report(
    run_dir: Path,
    *,
    record: dict,
    eval_metrics: dict | None,
    zeroshot: dict | None,
    speed: dict | None,
    title: str,
    original_shapes: Any = None,
) -> Path:
    """Write ``report.md`` and its PNG plots into ``run_dir``; return the report's path.

    ``record``: a pruning record (``rounds`` with ``non_embedding_params`` / ``calib_nll``; ``kept_units`` =
    ``{"attn": [[original indices kept] per layer], "mlp": [...]}``; optional ``summary``). ``eval_metrics``: a
    flat metrics dict (e.g. ``evaluation_summary``) or ``{name: metrics}``. ``zeroshot``: a ``run_zeroshot``
    result or ``{name: result}`` (one column each). ``speed``: a ``measure_speed`` or ``compare_speed`` result.
    ``original_shapes``: the unpruned model's per-layer counts — a list of ``{"attn_groups", "mlp_channels"}``
    (as ``layer_shapes`` of the dense model gives) or its config (``num_key_value_heads``,
    ``intermediate_size``); without it the record's ``original_shapes`` is used, else the counts are inferred
    from the kept indices (and the report says so).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not isinstance(record, Mapping):
        raise BonsaiError("record must be a dict (the pruning record)")
    parts = [f"# {title}\n"]
    summary = _section_summary(record)
    if summary:
        parts.append("## Run\n\n" + summary)

    parts.append("## Rounds\n\n" + _section_rounds(record))
    _write_rounds_csv(record, run_dir / ROUNDS_CSV)
    if _plot_ppl(record, run_dir / PPL_PLOT):
        parts.append(f"![perplexity vs non-embedding parameters]({PPL_PLOT})\n")

    if record.get("adaptation"):
        parts.append("## Adaptation\n\n" + _section_adaptation(record["adaptation"]))

    kept = record.get("kept_units")
    if kept and kept.get("attn") is not None and kept.get("mlp") is not None:
        attn_n, mlp_n, how = _original_counts(record, kept, original_shapes)
        shapes = record.get("layer_shapes")
        if shapes:  # the checkpoint's own shapes must agree with the kept lists
            for li, s in enumerate(shapes):
                if s["attn_groups"] != len(kept["attn"][li]) or s["mlp_channels"] != len(kept["mlp"][li]):
                    raise BonsaiError(f"layer {li}: record layer_shapes {s} disagree with kept_units")
        _plot_kept(kept, attn_n, mlp_n, run_dir / KEPT_PLOT)
        parts.append("## Kept units per layer\n\n" + _section_kept(kept, attn_n, mlp_n, how))
        parts.append(f"![kept attention groups and MLP channels per layer]({KEPT_PLOT})\n")

    if eval_metrics:
        parts.append("## Perplexity evaluation\n\n" + _section_eval(eval_metrics))
    if zeroshot:
        parts.append("## Zero-shot accuracy\n\n" + _section_zeroshot(zeroshot))
    if speed:
        parts.append("## Speed and memory\n\n" + _section_speed(speed))

    path = run_dir / REPORT_FILE
    _write_text_atomic(path, "\n".join(parts))
    return path
