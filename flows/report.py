"""Report flow: the pruning record + evaluation metrics → report.md and PNG plots, published as a Prefect
markdown artifact too."""

import json
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from bonsai.checkpoint import read_record
from bonsai.report import original_shapes_from_config, write_report


@flow(name="bonsai-report")
def report_flow(
    pruned_dir: str, metrics_json: str, dense_dir: str, out_dir: str, zeroshot_json: str | None = None
) -> str:
    """Write the report of a pruned model (rounds, kept units per layer, perplexity, zero-shot if evaluated)."""
    metrics = json.loads(Path(metrics_json).read_text())
    details = json.loads(Path(zeroshot_json).read_text()) if zeroshot_json and Path(zeroshot_json).exists() else {}
    dense_config = json.loads((Path(dense_dir) / "config.json").read_text())
    path = write_report(
        Path(out_dir),
        record=read_record(pruned_dir),
        eval_metrics={"dense": metrics["dense"], "pruned": metrics["pruned"]},
        zeroshot=details.get("zeroshot"),
        speed=None,
        title="Bonsai pipeline report",
        original_shapes=original_shapes_from_config(dense_config),
    )
    create_markdown_artifact(path.read_text(), key="bonsai-report", description=f"Bonsai report for {pruned_dir}")
    return str(path)
