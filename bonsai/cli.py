"""Command line: `bonsai prune`, `bonsai eval`, `bonsai adapt` and `bonsai compare`. They run the Prefect flows
(flows/), never a loop of their own."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path

from bonsai.config import METHODS, PRESETS, resolve_config
from bonsai.errors import BonsaiError
from bonsai.memory import cap_heap_growth
from bonsai.workdir import RUN_DATABASE, WorkDirLock, check_output_dir, check_work_dir, holds_earlier_run

KNOB_FLAGS = {  # flag -> (config key, type)
    "--prior": ("prior", str),
    "--p-iter": ("p_iter", float),
    "--n-samples": ("n_samples", int),
    "--calib-windows": ("calib_windows", int),
    "--calib-seq-len": ("calib_seq_len", int),
    "--utility": ("utility", str),
    "--regression": ("regression", str),
    "--module-share": ("module_share", str),
    "--sample-windows": ("sample_windows", int),
    "--compensation": ("compensation", str),
    "--refit-damping": ("refit_damping", float),
    "--cv-folds": ("cv_folds", int),
    "--channel-multiple": ("channel_multiple", int),
    "--batch-size": ("eval_batch_size", int),
    "--shard-size": ("shard_size", int),
    "--workers": ("workers", int),
    "--scheduler": ("scheduler", str),
    "--method": ("method", str),
    "--mosaic-outlier-m": ("mosaic_outlier_m", float),
    "--mosaic-lambda": ("mosaic_lambda", float),
    "--structural-share": ("structural_share", float),
}


# prune knobs `bonsai compare` does not take: the first four it sets per run itself; workers / scheduler because it
# runs every prune flow inside its own flow, on the prune flow's default runner. The other knobs apply to every run.
COMPARE_OWN_FLAGS = ("--method", "--calib-windows", "--calib-seq-len", "--batch-size", "--workers", "--scheduler")


ADAPT_FLAGS = {  # flag -> (AdaptConfig field, type, help); unset flags keep AdaptConfig's defaults
    "--steps": ("steps", int, "optimizer steps in total (default 100)"),
    "--rank": ("rank", int, "LoRA rank (default 128)"),
    "--alpha": ("alpha", float, "LoRA alpha (default 512)"),
    "--lr": ("lr", float, "learning rate (default 1e-4)"),
    "--kl-weight": ("kl_weight", float, "weight of KL(teacher || student) next to the CE (default 0.01)"),
    "--seq-len": ("seq_len", int, "training window length in tokens (default 256)"),
    "--batch-size": ("batch_size", int, "windows per step (default 4)"),
    "--windows": ("n_windows", int, "distinct training windows (default 128)"),
    "--save-every": ("save_every", int, "save a resumable state every N steps (default 25)"),
    "--seed": ("seed", int, "seed of the adapters, batch order and windows (default 0)"),
    "--dropout": ("dropout", float, "LoRA dropout (default 0)"),
    "--max-grad-norm": ("max_grad_norm", float, "gradient clipping norm, 0 = off (default 1)"),
}


def _quiet_services() -> None:
    """No telemetry, no hub lookups unless the user configured otherwise."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # the temporary Prefect API gets 20 s to start by default; on a loaded 2-core box that was measured to time out
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


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
        "--heldout-windows",
        type=int,
        default=16,
        help="after pruning, compare dense and pruned perplexity on this many held-out windows (0 skips)",
    )
    pr.add_argument("--heldout-seq-len", type=int, default=256, help="tokens per held-out window (default 256)")
    pr.add_argument(
        "--heldout-data",
        default="self",
        help="held-out text: self (sampled from the dense model with the evaluation seed) or a text file",
    )
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
    ex = sub.add_parser("export", help="write a pruned (or dense) checkpoint as a GGUF file for llama.cpp")
    ex.add_argument("--format", choices=["gguf"], default="gguf")
    ex.add_argument("--model", required=True, help="a pruned checkpoint or a supported Hugging Face model directory")
    ex.add_argument("--out", required=True, help="the .gguf file to write")
    ex.add_argument("--quant", default="f16", help="weight type: f32, f16 (default) or q8_0")
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
    ad = sub.add_parser("adapt", help="LoRA fine-tuning of a pruned model, distilled from its dense source, merged")
    ad.add_argument("--pruned", required=True, help="a pruned checkpoint directory (from bonsai prune)")
    ad.add_argument("--out", required=True, help="output directory of the adapted (merged) checkpoint")
    ad.add_argument("--data", default=None, help="training text (default: the pruning calibration source)")
    ad.add_argument("--teacher", default=None, help="dense model to distil from (default: the pruned model's source)")
    for flag, (_, typ, help_text) in ADAPT_FLAGS.items():
        ad.add_argument(flag, type=typ, default=None, help=help_text)
    ad.add_argument("--eval-data", default="self", help="held-out text for perplexity before/after (default: self)")
    ad.add_argument("--eval-windows", type=int, default=32, help="held-out windows (0: skip the measurement)")
    ad.add_argument("--eval-seq-len", type=int, default=None, help="held-out window length (default: --seq-len)")
    ad.add_argument("--eval-batch-size", type=int, default=8)
    ad.add_argument("--work-dir", default=None, help="training states and windows (default: OUT.work)")
    ad.add_argument("--resume", action="store_true", help="continue an interrupted run from its work dir")
    ad.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ad.add_argument("--report-dir", default=None, help="also write report.md (+ PNGs) of the adapted model here")
    cp = sub.add_parser("compare", help="prune with several methods x sparsities; one table, markdown and plot")
    cp.add_argument("--model", default="smollm2-135m", help="as for prune (default: the alias smollm2-135m)")
    cp.add_argument("--methods", nargs="+", required=True, metavar="METHOD",
                    help=f"'all' or any of {', '.join(METHODS)}")
    cp.add_argument("--sparsities", nargs="+", type=float, required=True, metavar="S",
                    help="targets in (0, 1); sparse24 always runs once, at 0.5")
    cp.add_argument("--out", required=True, help="comparison directory (runs, comparison.parquet/.md/.png)")
    cp.add_argument("--preset", choices=sorted(PRESETS), default="fast")
    cp.add_argument("--calib", default="self", help="calibration text shared by every run (as for prune)")
    cp.add_argument("--calib-windows", type=int, default=None, help="default: the preset's")
    cp.add_argument("--calib-seq-len", type=int, default=None, help="default: the preset's (0 = full context)")
    cp.add_argument("--eval-data", default="self", help="held-out text (as for eval)")
    cp.add_argument("--eval-windows", type=int, default=16)
    cp.add_argument("--eval-seq-len", type=int, default=128)
    cp.add_argument("--batch-size", type=int, default=8, help="windows per forward, pruning and evaluation")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--no-reference", action="store_true", help="perplexity only: no KL / top-1 to the dense model")
    cp.add_argument("--reference-windows", type=int, default=None,
                    help="KL / top-1 on the first N evaluation windows only (default: all)")
    cp.add_argument("--no-speed", action="store_true", help="skip the prefill speed-up measurement")
    cp.add_argument("--speed-prompt-len", type=int, default=512)
    cp.add_argument("--speed-runs", type=int, default=5, help="timed prefill runs per model (median)")
    cp.add_argument("--speed-threads", type=int, default=None, help="torch threads while timing (default: as set)")
    for flag, (_, typ) in KNOB_FLAGS.items():
        if flag not in COMPARE_OWN_FLAGS:
            cp.add_argument(flag, type=typ, default=None, help="applied to every run")
    return p


def _check_at_least(*checks: tuple[str, int | None, int]) -> None:
    """(flag, value, least) each: a given value below its least is a one-line error; None = not given."""
    for flag, value, least in checks:
        if value is not None and value < least:
            raise BonsaiError(f"{flag} must be >= {least}, got {value}")


@contextlib.contextmanager
def _run_database_in(work: Path):
    """A one-off run's temporary Prefect API keeps its database in the work directory instead of the shared
    ~/.prefect/prefect.db, so concurrent runs of different prunes never wait on one SQLite file (each run holds its
    work directory's lock). Only where the user configured neither an API nor a database (environment or profile);
    Prefect reads it when first imported, which in a CLI process happens inside this block."""
    keys = ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL")
    profiles = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")) / "profiles.toml"
    configured = profiles.is_file() and any(k in profiles.read_text(errors="replace") for k in keys)
    if configured or any(os.environ.get(k) for k in keys):
        yield
        return
    os.environ[keys[1]] = f"sqlite+aiosqlite:///{(work / RUN_DATABASE).absolute()}"
    try:
        yield
    finally:
        del os.environ[keys[1]]


@contextlib.contextmanager
def _locked(work: Path, resume: bool):
    """Hold the work directory's lock (taken before anything touches it); yields whether the run starts fresh.
    A directory holding an earlier run needs --resume."""
    with WorkDirLock(work) as lock:
        fresh = not holds_earlier_run(work)
        if lock.taken_over:
            print(f"bonsai: taking over {work} from {lock.taken_over}, which is gone", file=sys.stderr)
        if not fresh and not resume:
            raise BonsaiError(f"work directory {work} holds an earlier run; pass --resume to continue it, "
                              f"or remove it")
        with _run_database_in(work):
            yield fresh


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
        f"  rounds: {s['rounds']}   forward tokens: {s['forward_tokens']:,}"
        + (f" ({s['forward_tokens_computed']:,} computed now, the rest reused)"
           if s.get("forward_tokens_computed", s["forward_tokens"]) != s["forward_tokens"] else "")
        + f"   wall time: {s['wall_seconds']:.1f} s\n"
        f"  pruned model: {Path(s['out']).resolve()}\n"
        f"  for llama.cpp: bonsai export --model {s['out']} --out {Path(s['out']).name}.gguf --quant q8_0"
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
    _check_at_least(("--heldout-windows", args.heldout_windows, 0), ("--heldout-seq-len", args.heldout_seq_len, 2))
    work = Path(args.work_dir or f"{args.out}.work")
    check_output_dir(args.out, overwrite=args.overwrite)
    check_work_dir(work)
    if cfg.method == "bonsai" and Path(cfg.model).is_dir():
        from bonsai.selection import check_reachable_from_config

        check_reachable_from_config(cfg.model, cfg.sparsity)  # an impossible target: refused before any work
    with _locked(work, args.resume) as fresh_work:
        from flows.prune import run_prune

        try:
            summary = run_prune(cfg, args.out, work_dir=str(work), overwrite=args.overwrite)
        except BonsaiError:
            # a bad input found before any round finished leaves nothing behind; finished rounds are always kept
            if fresh_work and work.is_dir() and not any(work.glob("round_*/checkpoint-*.sha256")):
                shutil.rmtree(work)
            raise
    _print_summary(summary)
    if args.heldout_windows:
        from flows.evaluation import heldout_report_flow

        report = heldout_report_flow(
            args.out,
            cfg.model,
            data=args.heldout_data,
            n_windows=args.heldout_windows,
            seq_len=args.heldout_seq_len,
            seed=cfg.seed,
            batch_size=cfg.eval_batch_size,
        )
        _print_heldout(report)
    return 0


def _print_heldout(r: dict) -> None:
    where = "self-generated text, held out from calibration" if r["data"] == "self" else r["data"]
    print(
        f"  held-out perplexity:        {r['dense_ppl']:.3f} -> {r['pruned_ppl']:.3f}"
        f"  ({r['n_windows']} windows x {r['seq_len']} tokens of {where}; KL to dense {r['kl']:.4f}, "
        f"top-1 agreement {r['top1_agreement']:.3f})\n"
        f"  greedy continuation of {r['prompt']!r}:\n"
        f"    dense:  {r['dense_continuation']!r}\n"
        f"    pruned: {r['pruned_continuation']!r}"
    )


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
    _check_at_least(
        ("--windows", args.windows, 1),
        ("--seq-len", args.seq_len, 2),
        ("--batch-size", args.batch_size, 1),
        ("--limit", args.limit, 1),
    )
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


def cmd_adapt(args: argparse.Namespace) -> int:
    from bonsai.adapt import AdaptConfig, check_adaptable

    check_adaptable(args.pruned, args.out)
    knobs = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in ADAPT_FLAGS.items()}
    cfg = AdaptConfig(**{k: v for k, v in knobs.items() if v is not None}).validate()
    _check_at_least(
        ("--eval-windows", args.eval_windows, 0),
        ("--eval-seq-len", args.eval_seq_len, 2),
        ("--eval-batch-size", args.eval_batch_size, 1),
    )
    work = Path(args.work_dir or f"{args.out}.work")
    check_output_dir(args.out, overwrite=args.overwrite)
    check_work_dir(work)
    with _locked(work, args.resume):
        from flows.adapt import adapt_flow

        a = adapt_flow(
            args.pruned,
            args.out,
            cfg,
            data=args.data,
            teacher=args.teacher,
            eval_data=args.eval_data,
            eval_windows=args.eval_windows,
            eval_seq_len=args.eval_seq_len,
            eval_batch_size=args.eval_batch_size,
            work_dir=str(work),
            overwrite=args.overwrite,
            report_dir=args.report_dir,
        )
    ev = a.get("eval")
    print(
        f"\nBonsai adapt finished: {a['steps']} steps (resumed at {a['resumed_from']}), "
        f"training loss {a['loss_start']:.4f} -> {a['loss_end']:.4f}"
        + (f"\n  held-out perplexity: {ev['ppl_before']:.3f} -> {ev['ppl_after']:.3f}" if ev else "")
        + f"\n  adapted model: {Path(args.out).resolve()}"
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from flows.compare import compare_flow, plan_runs

    methods = list(METHODS) if args.methods == ["all"] else args.methods
    knobs = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _) in KNOB_FLAGS.items()
             if flag not in COMPARE_OWN_FLAGS}
    preset = PRESETS.get(args.preset, {})
    params = dict(
        calib=args.calib,
        calib_windows=preset.get("calib_windows") if args.calib_windows is None else args.calib_windows,
        calib_seq_len=preset.get("calib_seq_len") if args.calib_seq_len is None else args.calib_seq_len,
        seed=args.seed,
        preset=args.preset,
        overrides={k: v for k, v in knobs.items() if v is not None},
        batch_size=args.batch_size,
        eval_windows=args.eval_windows,
        eval_seq_len=args.eval_seq_len,
        reference_windows=args.reference_windows,
        speed_prompt_len=args.speed_prompt_len,
        speed_runs=args.speed_runs,
        speed_threads=args.speed_threads,
    )
    plan_runs(args.model, methods, args.sparsities, **params)  # bad inputs fail here, before Prefect starts
    res = compare_flow(args.model, methods, args.sparsities, args.out, eval_data=args.eval_data,
                       reference_metrics=not args.no_reference, speed=not args.no_speed, **params)
    import pandas as pd

    table = pd.read_parquet(res["table"])
    print(f"\nBonsai compare finished: {len(table) - 1} runs")
    for _, r in table.iterrows():
        print(f"  {r['method']:<17} target {r['target_sparsity']:.2f}  sparsity {r['sparsity']:.4f}  "
              f"ppl {r['eval_ppl']:10.3f}  prefill speed-up {r['prefill_speedup']:.2f}")
    print(f"  table: {res['table']}\n  markdown: {res['markdown']}\n  plot: {res['plot']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bonsai.export import export_gguf

    out = export_gguf(args.model, args.out, quant=args.quant)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.quant}); run it with llama.cpp, e.g. "
          f"llama-cli -m {out} -p 'Once upon a time'")
    return 0


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "adapt": cmd_adapt, "compare": cmd_compare, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    _quiet_services()
    cap_heap_growth()
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BonsaiError as e:
        print(f"bonsai: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bonsai: interrupted; finished shards and rounds are kept, rerun with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
