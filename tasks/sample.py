"""Sample stage: fixed-seed completions of a checkpoint, as text and as markdown in the UI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from configs import SampleConfig
from gpt.sample import sample as sample_checkpoint
from storage.artifacts import ArtifactStore
from storage.versions import stage_code_version
from tasks.common import ui_key, version_cache_key

STAGE = "sample"


@task(name=STAGE, cache_key_fn=version_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def sample(store: ArtifactStore, version: str, checkpoint: str, config: SampleConfig, ui_name: str) -> dict[str, Any]:
    """Generate completions from a fixed seed; write samples.txt/.md; publish markdown to the UI."""

    def build(folder: Path) -> dict[str, Any]:
        texts = sample_checkpoint(checkpoint, config)
        (folder / "samples.txt").write_text("\n\n-----\n\n".join(texts) + "\n")
        (folder / "samples.md").write_text(samples_markdown(checkpoint, config, texts))
        return {"samples": len(texts)}

    store.publish(STAGE, version, build, code=stage_code_version(STAGE),
                  inputs={"checkpoint": checkpoint}, config=config.model_dump())
    markdown = (store.path(STAGE, version) / "samples.md").read_text()
    create_markdown_artifact(key=ui_key(ui_name, "samples"), markdown=markdown,
                             description=f"completions of {config.prompt!r} from {Path(checkpoint).name}")
    print(markdown)
    return store.ref(STAGE, version).to_dict()


def samples_markdown(checkpoint: str, config: SampleConfig, texts: list[str]) -> str:
    header = (f"# Samples from `{Path(checkpoint).name}`\n\nPrompt `{config.prompt}`, temperature "
              f"{config.temperature}, top-k {config.top_k}, seed {config.seed}, {config.max_new_tokens} new tokens.\n")
    bodies = [f"## Sample {i + 1}\n\n```text\n{text}\n```\n" for i, text in enumerate(texts)]
    return "\n".join([header, *bodies])
