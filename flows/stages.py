"""DVC stage entry points: `python -m flows.stages {model,calibration,prune,evaluate,report,adapt} [--params FILE]`.

Each stage reads only its section(s) of `params.yaml` (the keys `dvc.yaml` lists for it), calls the Prefect flows
in `flows/` and writes its outputs under `data/` (or `reports/pipeline/`). No pruning logic lives here.
Paths are relative to the repository root, where DVC runs stage commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from bonsai.config import PRESETS
from bonsai.errors import BonsaiError

MODEL_DIR = "data/model"
CALIB_DIR = "data/calibration"
CALIB_WINDOWS = f"{CALIB_DIR}/windows.parquet"
CALIB_INFO = f"{CALIB_DIR}/windows.json"
WORK_DIR = "data/work"
PRUNED_DIR = "data/pruned"
METRICS_JSON = "data/metrics/eval.json"
EVAL_DETAILS = "data/metrics/eval_details"
REPORT_DIR = "reports/pipeline"
ADAPTED_DIR = "data/adapted"
ADAPT_WORK = "data/adapt_work"
ADAPT_METRICS = "data/metrics/adapt.json"
ADAPT_REPORT = "reports/adapt"
# keys of the adapt section that are not AdaptConfig fields: the held-out perplexity measurement of adapt_flow
ADAPT_EVAL_KEYS = ("eval_data", "eval_windows", "eval_seq_len", "eval_batch_size")

# The defaults of params.yaml; a missing section or key falls back to these.
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "model": {"source": "smollm2-135m"},
    "calibration": {
        "source": "self",
        "n_windows": PRESETS["fast"]["calib_windows"],
        "seq_len": PRESETS["fast"]["calib_seq_len"],
        "seed": 0,
    },
    "prune": {"preset": "fast", "sparsity": 0.5, "seed": 0},
    "evaluate": {
        "data": "self",
        "n_windows": 32,
        "seq_len": 256,
        "batch_size": 8,
        "zeroshot_tasks": [],
        "zeroshot_dir": None,
        "zeroshot_limit": None,
    },
}
# PruneConfig keys that come from other sections, so that one value has one home
PRUNE_KEYS_ELSEWHERE = {
    "model": "model.source (the prune stage always reads data/model)",
    "calib": "calibration.source",
    "calib_windows": "calibration.n_windows",
    "calib_seq_len": "calibration.seq_len",
}

log = logging.getLogger("bonsai.stages")


def load_params(path: str | Path, section: str) -> dict[str, Any]:
    """`section` of the params file over its defaults (a missing file means all defaults)."""
    import yaml

    values = dict(DEFAULT_PARAMS.get(section, {}))
    p = Path(path)
    if p.is_file():
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise BonsaiError(f"{p} must hold a mapping of sections")
        given = data.get(section) or {}
        if not isinstance(given, dict):
            raise BonsaiError(f"section {section!r} of {p} must be a mapping")
        values.update({k: v for k, v in given.items() if v is not None})
    return values


def _write_json(path: str | Path, data: Any) -> None:
    from bonsai.checkpoint import write_json_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


# ------------------------------------------------------------------------------------------------ stages


def stage_model(params_file: str) -> None:
    from flows.model import model_flow

    p = load_params(params_file, "model")
    model_flow(str(p["source"]), MODEL_DIR)


def stage_calibration(params_file: str) -> None:
    from flows.calibration import calibration_flow

    p = load_params(params_file, "calibration")
    out = Path(CALIB_DIR)
    out.mkdir(parents=True, exist_ok=True)
    ref = calibration_flow(
        MODEL_DIR, str(p["source"]), int(p["n_windows"]), int(p["seq_len"]), int(p["seed"]), "calibration", str(out)
    )
    produced = Path(ref["path"])
    # stable name for downstream readers; the content-keyed name is kept in windows.json (the prune stage seeds
    # its work directory with it, see stage_prune)
    os.replace(produced, CALIB_WINDOWS)
    Path(f"{produced}.sha256").unlink(missing_ok=True)
    info = {k: ref[k] for k in ("sha256", "n_windows", "seq_len", "source")}
    _write_json(CALIB_INFO, {**info, "seed": int(p["seed"]), "keyed_name": produced.name})


def prune_config(params_file: str):
    """The PruneConfig of the prune stage: `prune.*` knobs + data/model + the calibration section's windows."""
    from bonsai.config import resolve_config

    p = load_params(params_file, "prune")
    clash = sorted(k for k in p if k in PRUNE_KEYS_ELSEWHERE)
    if clash:
        raise BonsaiError(
            "set these in their own params sections, not under prune: "
            + ", ".join(f"prune.{k} → {PRUNE_KEYS_ELSEWHERE[k]}" for k in clash)
        )
    c = load_params(params_file, "calibration")
    if int(c["seed"]) != int(p["seed"]):
        log.warning(
            "calibration.seed %s != prune.seed %s: the prune flow draws its calibration windows with the prune "
            "seed, so it will compute its own windows instead of reusing data/calibration",
            c["seed"],
            p["seed"],
        )
    overrides = {
        **p,
        "model": MODEL_DIR,
        "calib": str(c["source"]),
        "calib_windows": int(c["n_windows"]),
        "calib_seq_len": int(c["seq_len"]),
    }
    return resolve_config(overrides)


def _seed_work_windows(work: Path) -> None:
    """Put the calibration stage's windows where prune_flow looks for its own, under their content-keyed name.

    prune_flow calls calibration_flow(cfg.model, cfg.calib, cfg.calib_windows, cfg.calib_seq_len, cfg.seed, ...)
    into `<work>/windows`; its windows task names the file by a hash of exactly those inputs and reuses a file
    whose sidecar checks out. The calibration stage ran the same task with the same inputs (same model, source,
    count, length; seed equal when calibration.seed == prune.seed), so linking its file in under the recorded
    name makes the flow reuse it instead of generating the windows a second time. With different inputs the
    names differ, the linked file is simply not used, and the flow computes (and records) its own windows.
    """
    from bonsai.artifacts import record_artifact, verified_sha

    info_path = Path(CALIB_INFO)
    if not info_path.is_file() or not Path(CALIB_WINDOWS).is_file():
        return
    info = json.loads(info_path.read_text())
    target = work / "windows" / info["keyed_name"]
    if verified_sha(target) is not None:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    shutil.copy2(CALIB_WINDOWS, tmp)  # a copy: DVC may make its cached windows.parquet read-only or a link
    os.replace(tmp, target)
    if record_artifact(target) != info["sha256"]:
        log.warning("data/calibration windows do not match their recorded hash; the prune flow recomputes them")
        Path(f"{target}.sha256").unlink(missing_ok=True)


def stage_prune(params_file: str) -> None:
    from flows.prune import run_prune

    cfg = prune_config(params_file)
    # Calibration is computed once: the calibration stage writes the windows, and this stage hands them to the
    # flow's content-keyed cache in data/work (see _seed_work_windows) rather than passing a file to the flow,
    # so the flow keeps its own provenance checks. data/work is a `persist: true` output: finished rounds and
    # shards survive a crash (DVC would otherwise delete them before re-running) and the next run resumes.
    work = Path(WORK_DIR)
    _seed_work_windows(work)
    summary = run_prune(cfg, out=PRUNED_DIR, work_dir=str(work), overwrite=True)
    calib_sha = json.loads(Path(CALIB_INFO).read_text())["sha256"] if Path(CALIB_INFO).is_file() else None
    from bonsai.checkpoint import read_record

    used = read_record(PRUNED_DIR)["calibration"]["windows_sha256"]
    if calib_sha and used != calib_sha:
        log.warning(
            "the prune flow used calibration windows %s…, not data/calibration's %s…", used[:12], calib_sha[:12]
        )
    print(
        f"pruned {summary['non_embedding_params_before']:,} → {summary['non_embedding_params_after']:,} "
        f"non-embedding parameters (sparsity {summary['sparsity']:.2%}) in {summary['rounds']} rounds"
    )


def stage_evaluate(params_file: str) -> None:
    from bonsai.checkpoint import read_record
    from flows.evaluation import evaluation_flow

    p = load_params(params_file, "evaluate")
    # One pass over the windows scores both models: the pruned checkpoint, and data/model as the reference
    # (its perplexity is `reference_ppl`, computed on exactly the same windows) for KL and top-1 agreement.
    # Windows live in the content-keyed cache of evaluation_flow ($BONSAI_CACHE/windows), so re-evaluating
    # another pruned model reuses them. With ../shared present, WikiText-2 test can be used:
    # evaluate.data: ../shared/assets/corpus/wikitext-2/wiki.test.raw
    m = evaluation_flow(
        PRUNED_DIR,
        data=str(p["data"]),
        n_windows=int(p["n_windows"]),
        seq_len=int(p["seq_len"]),
        reference=MODEL_DIR,
        batch_size=int(p["batch_size"]),
        json_path=f"{EVAL_DETAILS}/pruned.json",
        zeroshot_tasks=list(p["zeroshot_tasks"]) or None,
        zeroshot_dir=p["zeroshot_dir"],
        zeroshot_limit=p["zeroshot_limit"],
    )
    s = read_record(PRUNED_DIR)["summary"]
    metrics = {
        "dense": {
            "ppl": m["reference_ppl"],
            "non_embedding_params": s["non_embedding_params_before"],
            "total_params": s["total_params_before"],
        },
        "pruned": {
            "ppl": m["ppl"],
            "kl": m["kl"],
            "top1_agreement": m["top1_agreement"],
            "non_embedding_params": s["non_embedding_params_after"],
            "total_params": s["total_params_after"],
        },
        "ppl_ratio": m["ppl"] / m["reference_ppl"],
        "sparsity": s["sparsity"],
        "total_sparsity": s["total_sparsity"],
        "eval": {"data": str(p["data"]), "n_windows": m["n_windows"], "seq_len": m["seq_len"], "tokens": m["tokens"]},
    }
    if "zeroshot" in m:
        metrics["pruned"]["zeroshot_mean"] = m["zeroshot"]["mean"]
        metrics["pruned"].update({f"zeroshot_{t}": v["value"] for t, v in m["zeroshot"]["tasks"].items()})
    _write_json(METRICS_JSON, metrics)
    print(
        f"perplexity dense {m['reference_ppl']:.4f} → pruned {m['ppl']:.4f}; KL {m['kl']:.5f}, "
        f"top-1 agreement {m['top1_agreement']:.4f}"
    )


def stage_report(params_file: str) -> None:
    from flows.report import report_flow

    path = report_flow(PRUNED_DIR, METRICS_JSON, MODEL_DIR, REPORT_DIR, zeroshot_json=f"{EVAL_DETAILS}/pruned.json")
    print(f"report written: {path}")


def stage_adapt(params_file: str) -> None:
    import dataclasses

    from bonsai.adapt import AdaptConfig
    from flows.adapt import adapt_flow

    # `adapt.*` over AdaptConfig's own defaults (no copy of them here); training text = the calibration corpus
    p = load_params(params_file, "adapt")
    fields = {f.name for f in dataclasses.fields(AdaptConfig)}
    unknown = sorted(set(p) - fields - set(ADAPT_EVAL_KEYS))
    if unknown:
        raise BonsaiError(f"unknown keys in the adapt section: {', '.join(unknown)}")
    cfg = AdaptConfig(**{k: v for k, v in p.items() if k in fields})
    calib = load_params(params_file, "calibration")
    a = adapt_flow(
        PRUNED_DIR,
        ADAPTED_DIR,
        cfg,
        data=str(calib["source"]),
        teacher=MODEL_DIR,
        **{k: p[k] for k in ADAPT_EVAL_KEYS if k in p},
        work_dir=ADAPT_WORK,
        overwrite=True,
        report_dir=ADAPT_REPORT,
    )
    metrics = {k: a[k] for k in ("steps", "tokens_seen", "loss_start", "loss_end")}
    if "eval" in a:
        metrics.update(ppl_before=a["eval"]["ppl_before"], ppl_after=a["eval"]["ppl_after"])
    _write_json(ADAPT_METRICS, metrics)
    print(f"adapted {a['steps']} steps: training loss {a['loss_start']:.4f} → {a['loss_end']:.4f}")


STAGES = {
    "model": stage_model,
    "calibration": stage_calibration,
    "prune": stage_prune,
    "evaluate": stage_evaluate,
    "report": stage_report,
    "adapt": stage_adapt,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stages", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml; all defaults when it is absent)"
    )
    args = parser.parse_args(argv)
    if args.params != "params.yaml" and not Path(args.params).is_file():
        parser.error(f"params file not found: {args.params}")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bonsai").setLevel(logging.INFO)  # this package's progress (e.g. a GGUF conversion)
    try:
        STAGES[args.stage](args.params)
    except BonsaiError as e:
        print(f"bonsai: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
