"""Sample stage: fixed-seed completions of a checkpoint, as text and as markdown in the UI."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from configs import SampleConfig
from gpt.sample import Sample
from gpt.sample import sample as sample_checkpoint
from storage.artifacts import ArtifactStore
from storage.markdown import fenced
from storage.versions import stage_code_version
from tasks.common import ui_key, version_cache_key

STAGE = "sample"


@task(name=STAGE, cache_key_fn=version_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def sample(store: ArtifactStore, version: str, checkpoint: str, config: SampleConfig, ui_name: str) -> dict[str, Any]:
    """Generate completions from a fixed seed; write samples.txt/.md/.json; publish markdown to the UI.

    samples.json holds one object per sample, prompt by prompt: prompt, text (prompt + completion),
    tokens (the sampled ids, without a final <|endoftext|>), new_tokens and stopped_at_eot."""

    def build(folder: Path) -> dict[str, Any]:
        samples = sample_checkpoint(checkpoint, config)
        (folder / "samples.txt").write_text("\n\n-----\n\n".join(item.text for item in samples) + "\n", encoding="utf-8")
        (folder / "samples.md").write_text(samples_markdown(checkpoint, config, samples), encoding="utf-8")
        records = [json.dumps({**asdict(item), "new_tokens": item.new_tokens}) for item in samples]  # ASCII: \u escapes
        (folder / "samples.json").write_text("[\n" + ",\n".join(records) + "\n]\n")
        return {"samples": len(samples), "prompts": len(config.prompts),
                "stopped_at_eot": sum(item.stopped_at_eot for item in samples),
                "new_tokens": sum(item.new_tokens for item in samples)}

    store.publish(STAGE, version, build, code=stage_code_version(STAGE),
                  inputs={"checkpoint": checkpoint}, config=config.model_dump())
    markdown = (store.path(STAGE, version) / "samples.md").read_text(encoding="utf-8")
    create_markdown_artifact(key=ui_key(ui_name, "samples"), markdown=markdown,
                             description=f"completions of {', '.join(map(repr, config.prompts))} from {Path(checkpoint).name}")
    print(markdown)
    return store.ref(STAGE, version).to_dict()


def samples_markdown(checkpoint: str, config: SampleConfig, samples: list[Sample]) -> str:
    prompts = ", ".join(f"`{prompt}`" for prompt in config.prompts)
    header = (f"# Samples from `{Path(checkpoint).name}`\n\nPrompts {prompts}; temperature {config.temperature}, "
              f"top-k {config.top_k or 'off'}, top-p {config.top_p or 'off'}, seed {config.seed}, "
              f"up to {config.max_new_tokens} new tokens{', stopping at `<|endoftext|>`' if config.stop_at_eot else ''}.\n")
    bodies = []
    for index, item in enumerate(samples):
        prompt_number, sample_number = divmod(index, config.num_samples)
        ending = "stopped at `<|endoftext|>`" if item.stopped_at_eot else "max_new_tokens reached"
        tokens = f"{item.new_tokens} new token{'' if item.new_tokens == 1 else 's'}"
        bodies.append(f"## Prompt {prompt_number + 1}, sample {sample_number + 1}\n\n{tokens}, {ending}.\n\n"
                      f"{fenced(item.text)}\n")
    return "\n".join([header, *bodies])
