"""What a run has become, checkpoint by checkpoint: one table of scores, its pictures, and one
gallery of samples per run, rebuilt from the store each time a checkpoint is scored or sampled,
under stable keys so the UI shows them growing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from gpt.checkpoint import STEP_PATTERN, checkpoint_path
from storage.artifacts import ArtifactStore
from storage.markdown import fenced, markdown_table
from tasks.charts import line_chart_svg, markdown_image
from tasks.common import ui_key

# HellaSwag acc_norm for comparison: completion-style scoring as in build-nanogpt.
HELLASWAG_REFERENCES = {"GPT-2 124M": 0.2955, "chance": 0.25}


def _of_run(store: ArtifactStore, run_name: str, stage: str) -> list[tuple[int, Any]]:
    """(step, manifest) of the run's checkpoints that a stage has processed; the newest per step.
    A checkpoint pruned since is still listed: its scores outlive its weights."""
    run_dir = store.run_dir(run_name)
    newest: dict[int, Any] = {}
    for manifest in store.manifests(stage):  # oldest first, so a newer one of the same step wins
        checkpoint = Path(manifest.inputs.get("checkpoint") or "")
        step = STEP_PATTERN.match(checkpoint.name)
        if step and checkpoint == checkpoint_path(run_dir, int(step.group(1))):  # a checkpoint of this run
            newest[int(step.group(1))] = manifest
    return sorted(newest.items())


def run_scores(store: ArtifactStore, run_name: str) -> list[dict[str, Any]]:
    """One row per evaluated checkpoint of the run: step, tokens seen, val loss, bpb, HellaSwag."""
    rows = []
    for step, manifest in _of_run(store, run_name, "evaluate"):
        metrics = manifest.metrics
        rows.append({"step": step, "tokens": metrics.get("tokens_trained"), "val_loss": metrics.get("val_loss"),
                     "bits_per_byte": metrics.get("bits_per_byte"), "hellaswag_acc": metrics.get("hellaswag_acc"),
                     "hellaswag_acc_norm": metrics.get("hellaswag_acc_norm"), "hellaswag_items": metrics.get("hellaswag_items")})
    return rows


def run_gallery(store: ArtifactStore, run_name: str) -> str | None:
    """Markdown of the samples of each sampled checkpoint of the run, step by step."""
    sections = []
    for step, manifest in _of_run(store, run_name, "sample"):
        structured = store.path("sample", manifest.version) / "samples.json"
        if not structured.is_file():  # written by a version before samples.json
            continue
        sections.append(f"## Step {step:,}\n")
        for sample in json.loads(structured.read_text(encoding="utf-8")):
            sections.append(f"**{sample['prompt']}**\n\n{fenced(sample['text'])}\n")
    if not sections:
        return None
    return f"# Samples of {run_name}, checkpoint by checkpoint\n\n" + "\n".join(sections)


def publish_run_report(store: ArtifactStore, run_name: str, ui_name: str) -> None:
    """The run's score table, its pictures against tokens seen, and its sample gallery, in the UI."""
    rows = run_scores(store, run_name)
    if rows:
        create_table_artifact(key=ui_key(ui_name, "checkpoint-scores"), table=rows,
                              description=f"every evaluated checkpoint of {run_name}")
        points = [row for row in rows if row["tokens"] is not None]
        val = line_chart_svg({"val loss": [(r["tokens"], r["val_loss"]) for r in points]}, "val loss against tokens seen",
                             x_label="tokens seen", y_label="loss")
        parts = [f"# Progress of {run_name}\n", markdown_image(val, "val loss"), ""]
        scored = [row for row in points if row["hellaswag_acc_norm"] is not None]
        if scored:
            span = (scored[0]["tokens"], scored[-1]["tokens"])
            series = {"acc_norm": [(r["tokens"], r["hellaswag_acc_norm"]) for r in scored]}
            series |= {f"{name} {value}": [(span[0], value), (span[1], value)] for name, value in HELLASWAG_REFERENCES.items()}
            parts += [markdown_image(line_chart_svg(series, "HellaSwag acc_norm against tokens seen", x_label="tokens seen",
                                                    y_label="acc_norm"), "HellaSwag"), ""]
        parts.append(markdown_table(rows))
        create_markdown_artifact(key=ui_key(ui_name, "progress"), markdown="\n".join(parts),
                                 description=f"val loss and HellaSwag of {run_name} against tokens seen")
    gallery = run_gallery(store, run_name)
    if gallery:
        create_markdown_artifact(key=ui_key(ui_name, "samples-gallery"), markdown=gallery,
                                 description=f"the same prompts at each sampled checkpoint of {run_name}")
