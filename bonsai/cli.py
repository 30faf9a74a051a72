"""Command line: `bonsai prune` and `bonsai eval`. Both run the Prefect flows (flows/), never a loop of their own."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from bonsai.config import PRESETS, resolve_config
from bonsai.errors import BonsaiError

KNOB_FLAGS = {  # flag -> (config key, type)
    "--prior": ("prior", str),
    "--p-iter": ("p_iter", float),
    "--n-samples": ("n_samples", int),
    "--calib-windows": ("calib_windows", int),
    "--calib-seq-len": ("calib_seq_len", int),
    "--utility": ("utility", str),
    "--regression": ("regression", str),
    "--cv-folds": ("cv_folds", int),
    "--batch-size": ("eval_batch_size", int),
    "--shard-size": ("shard_size", int),
    "--workers": ("workers", int),
    "--method": ("method", str),
    "--mosaic-outlier-m": ("mosaic_outlier_m", float),
    "--mosaic-lambda": ("mosaic_lambda", float),
    "--structural-share": ("structural_share", float),
}


def _quiet_services() -> None:
    """No telemetry, no hub lookups unless the user configured otherwise."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bonsai", description="Forward-pass-only structured pruning (Bonsai).")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prune", help="prune a model to a target sparsity")
    pr.add_argument(
        "--model",
        default="smollm2-135m",
        help="hub id, local HF dir, .gguf file, or the alias smollm2-135m (default)",
    )
    pr.add_argument("--sparsity", type=float, default=None, help="share of non-embedding parameters to remove")
    pr.add_argument("--out", required=True, help="output directory of the pruned checkpoint")
    pr.add_argument("--preset", choices=sorted(PRESETS), default=None)
    pr.add_argument(
        "--calib", default=None, help="self (default), a .txt/.jsonl/.parquet file, or hf:NAME[:CFG][@SPLIT]"
    )
    pr.add_argument("--seed", type=int, default=None)
    pr.add_argument("--config", default=None, help="YAML/JSON file of config keys (CLI flags win)")
    pr.add_argument("--work-dir", default=None, help="where round artifacts live (default: OUT.work)")
    pr.add_argument("--resume", action="store_true", help="continue an interrupted run from its work dir")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    for flag, (_, typ) in KNOB_FLAGS.items():
        pr.add_argument(flag, type=typ, default=None)
    ev = sub.add_parser("eval", help="perplexity (and KL / top-1 agreement to a reference) of a model")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", default="self", help="self, a local text file, or hf:NAME[:CFG][@SPLIT]")
    ev.add_argument("--reference", default=None, help="dense model to compare against (KL, top-1 agreement)")
    ev.add_argument("--windows", type=int, default=32)
    ev.add_argument("--seq-len", type=int, default=256)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--json", default=None, help="write the metrics here (atomically)")
    ev.add_argument(
        "--zeroshot",
        default=None,
        metavar="TASKS",
        help="zero-shot tasks through lm-eval: 'all' (boolq, piqa, hellaswag, winogrande, arc_easy, "
        "arc_challenge, openbookqa) or a comma-separated list",
    )
    ev.add_argument(
        "--zeroshot-dir",
        default=None,
        help="local task files (e.g. ../shared/assets/zeroshot); without it the stock tasks need the hub",
    )
    ev.add_argument("--limit", type=int, default=None, help="zero-shot: first N documents per task")
    return p


def _print_summary(s: dict) -> None:
    print(
        "\nBonsai prune finished\n"
        f"  parameters (non-embedding): {s['non_embedding_params_before']:,} -> {s['non_embedding_params_after']:,}"
        f"  (sparsity {s['sparsity']:.2%}, target {s['target_sparsity']:.2%})\n"
        f"  parameters (total):         {s['total_params_before']:,} -> {s['total_params_after']:,}"
        f"  ({s['total_sparsity']:.2%} fewer)\n"
        + (
            f"  non-zero (non-embedding):   {s['nonzero_non_embedding_params_after']:,} (method {s['method']})\n"
            if "nonzero_non_embedding_params_after" in s
            else ""
        )
        + f"  calibration perplexity:     {s['calib_ppl_before']:.3f} -> {s['calib_ppl_after']:.3f}\n"
        f"  rounds: {s['rounds']}   forward tokens: {s['forward_tokens']:,}   wall time: {s['wall_seconds']:.1f} s\n"
        f"  pruned model: {Path(s['out']).resolve()}"
    )


def cmd_prune(args: argparse.Namespace) -> int:
    overrides = {
        "model": args.model,
        "sparsity": args.sparsity,
        "preset": args.preset,
        "calib": args.calib,
        "seed": args.seed,
    }
    overrides.update({key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _) in KNOB_FLAGS.items()})
    cfg = resolve_config(overrides, args.config)
    work = Path(args.work_dir or f"{args.out}.work")
    if work.exists() and any(work.iterdir()) and not args.resume:
        raise BonsaiError(f"work directory {work} holds an earlier run; pass --resume to continue it, or remove it")
    from flows.prune import run_prune

    fresh_work = not work.exists()
    try:
        summary = run_prune(cfg, args.out, work_dir=str(work), overwrite=args.overwrite)
    except BonsaiError:
        # a bad input found before any round finished leaves nothing behind; finished rounds are always kept
        if fresh_work and work.is_dir() and not any(work.glob("round_*/checkpoint-*.sha256")):
            shutil.rmtree(work)
        raise
    _print_summary(summary)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from bonsai.zeroshot import ZEROSHOT_TASKS
    from flows.evaluation import evaluation_flow

    tasks = None
    if args.zeroshot:
        tasks = list(ZEROSHOT_TASKS) if args.zeroshot == "all" else [t.strip() for t in args.zeroshot.split(",")]
        unknown = sorted(set(tasks) - set(ZEROSHOT_TASKS))
        if unknown:
            raise BonsaiError(
                f"unknown zero-shot task(s) {', '.join(unknown)}; choose from {', '.join(ZEROSHOT_TASKS)}"
            )
    for flag, value, least in (
        ("--windows", args.windows, 1),
        ("--seq-len", args.seq_len, 2),
        ("--batch-size", args.batch_size, 1),
        ("--limit", args.limit, 1),
    ):
        if value is not None and value < least:
            raise BonsaiError(f"{flag} must be >= {least}, got {value}")
    metrics = evaluation_flow(
        args.model,
        data=args.data,
        n_windows=args.windows,
        seq_len=args.seq_len,
        seed=args.seed,
        reference=args.reference,
        batch_size=args.batch_size,
        json_path=args.json,
        zeroshot_tasks=tasks,
        zeroshot_dir=args.zeroshot_dir,
        zeroshot_limit=args.limit,
    )
    line = f"perplexity {metrics['ppl']:.4f} on {metrics['n_windows']} windows × {metrics['seq_len']} tokens"
    if "kl" in metrics:
        line += f"; KL to reference {metrics['kl']:.5f}, top-1 agreement {metrics['top1_agreement']:.4f}"
    print(line)
    if "zeroshot" in metrics:
        zs = metrics["zeroshot"]
        accs = ", ".join(f"{t} {v['value']:.3f} ({v['metric']})" for t, v in zs["tasks"].items())
        print(f"zero-shot (lm-eval {zs['lm_eval_version']}, limit {zs['limit']}): {accs}; mean {zs['mean']:.3f}")
    if args.json:
        print(f"metrics written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    _quiet_services()
    args = build_parser().parse_args(argv)
    try:
        return cmd_prune(args) if args.command == "prune" else cmd_eval(args)
    except BonsaiError as e:
        print(f"bonsai: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bonsai: interrupted; finished shards and rounds are kept, rerun with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
