"""Sample completions of prompts from a checkpoint, reproducibly.

Each prompt gets `num_samples` completions drawn from a torch.Generator seeded with
`sample.seed`, so the same checkpoint, prompts and settings give the same texts on the
same device (and the first n samples of a prompt do not depend on num_samples or on the
other prompts). Generation uses the model's KV cache, which gives the tokens the uncached
forward gives. Only GPT-2's 50257 real token ids are sampled, never the padding ids of the
50304-wide head. A sample ends at `<|endoftext|>` (not part of its text) unless
`stop_at_eot` is off, and never ends in U+FFFD marks from a character whose UTF-8 bytes
were cut by max_new_tokens.

Usage, without Prefect (like nanoGPT's sample.py):

    python -m gpt.sample --run demo                       # latest checkpoint of <storage.root>/runs/demo
    python -m gpt.sample --run demo --step 80 --prompt "The module" --prompt "import"
    python -m gpt.sample --run demo --best --top-p 0.9 --top-k none --num-samples 5 --seed 7
    python -m gpt.sample --checkpoint artifacts/runs/demo/checkpoints/step_000120 --max-new-tokens 200

The storage root is --config's storage.root (default preset: demo), or FWP_STORAGE_ROOT.
Settings not given on the command line come from --config's sample section.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken
import torch
from pydantic import ValidationError

from configs.errors import TransientError, UserError
from configs.schema import SampleConfig, load_config
from gpt.checkpoint import list_checkpoints, load_model, select_checkpoint
from gpt.encoding import EOT, gpt2_encoding
from gpt.runtime import Runtime, resolve_device, resolve_dtype, trained_dtype
from storage.artifacts import ArtifactStore


class SampleError(UserError):
    """A sampling request that cannot be served; the message is one line."""


@dataclass
class Sample:
    """One completion of a prompt."""

    prompt: str
    text: str  # the prompt followed by its completion
    tokens: list[int]  # the sampled token ids, without the <|endoftext|> that ended them
    stopped_at_eot: bool  # False: max_new_tokens ran out (or stop_at_eot is off)

    @property
    def completion(self) -> str:
        return self.text[len(self.prompt):]

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)


def sample(checkpoint_dir: str | Path, config: SampleConfig, device: str = "auto", dtype: str | None = None) -> list[Sample]:
    """`config.num_samples` completions of each of `config.prompts`, prompt by prompt, under the
    autocast the checkpoint was trained with (its train.dtype, resolved on `device`; `dtype` overrides)."""
    torch_device = resolve_device(device)
    model, state = load_model(checkpoint_dir, torch_device)
    dtype = resolve_dtype(dtype or trained_dtype(state), torch_device)
    encoding = gpt2_encoding()
    stop_token = EOT if config.stop_at_eot else None
    samples = []
    with Runtime.single(torch_device, dtype).autocast():
        for prompt in config.prompts:
            prompt_tokens = encoding.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT]
            context = torch.tensor([prompt_tokens], dtype=torch.long, device=torch_device)
            generator = torch.Generator(device=torch_device).manual_seed(config.seed)
            for _ in range(config.num_samples):
                tokens = model.generate(
                    context,
                    config.max_new_tokens,
                    temperature=config.temperature,
                    top_k=config.top_k,
                    top_p=config.top_p,
                    generator=generator,
                    vocab_limit=encoding.n_vocab,
                    stop_token=stop_token,
                )
                samples.append(completion(encoding, prompt, tokens[0, len(prompt_tokens):].tolist(), stop_token))
    return samples


def completion(encoding: tiktoken.Encoding, prompt: str, new_tokens: list[int], stop_token: int | None) -> Sample:
    """The Sample of a prompt and its sampled tokens, cut before the first stop_token."""
    stopped = stop_token is not None and stop_token in new_tokens
    if stopped:
        new_tokens = new_tokens[: new_tokens.index(stop_token)]
    return Sample(prompt=prompt, text=prompt + decode_complete(encoding, new_tokens), tokens=new_tokens, stopped_at_eot=stopped)


def decode_complete(encoding: tiktoken.Encoding, tokens: list[int]) -> str:
    """The text of tokens without a UTF-8 character left incomplete at the end (a sample that
    stopped between the tokens of one character); invalid bytes elsewhere show as U+FFFD."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return decoder.decode(encoding.decode_bytes(tokens), final=False)  # final=False holds back the incomplete tail


# ---------------------------------------------------------------------------------------------
# The command line


SETTING_FLAGS = {  # SampleConfig field: its flag
    "prompt": "--prompt",
    "num_samples": "--num-samples",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "stop_at_eot": "--stop-at-eot",
    "seed": "--seed",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt.sample",
        description=__doc__.splitlines()[0],
        epilog="Settings not given come from --config's sample section.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="a checkpoint folder, e.g. <root>/runs/demo/checkpoints/step_000120")
    which.add_argument("--run", help="a run under <storage.root>/runs: its latest checkpoint, or --step/--best")
    step = parser.add_mutually_exclusive_group()
    step.add_argument("--step", help="with --run: the checkpoint of this step")
    step.add_argument("--best", action="store_true", help="with --run: the checkpoint with the lowest val loss")
    parser.add_argument("--config", default="demo", help="a YAML file or preset: storage root and default settings (default: demo)")
    parser.add_argument("--prompt", action="append", help="a prompt; repeat it for several")
    parser.add_argument("--num-samples", help="completions per prompt")
    parser.add_argument("--max-new-tokens", help="tokens to sample at most per completion")
    parser.add_argument("--temperature", help="> 0; lower is more conservative")
    parser.add_argument("--top-k", help="sample among the k most likely tokens; 'none': all")
    parser.add_argument("--top-p", help="nucleus sampling in (0, 1]; 'none': off")
    parser.add_argument("--stop-at-eot", action=argparse.BooleanOptionalAction, default=None,
                        help="end a completion at <|endoftext|>")
    parser.add_argument("--seed", help="the same seed gives the same texts")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    args = parser.parse_args(argv)

    try:
        config = load_config(args.config)
        settings = sample_settings(config.sample, args)
        checkpoint = checkpoint_of(args, config.storage.root)
        samples = sample(checkpoint, settings, args.device)
    except (UserError, TransientError) as exc:  # one line; anything else is a bug and keeps its traceback
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(format_samples(checkpoint, settings, samples), flush=True)
    return 0


def sample_settings(base: SampleConfig, args: argparse.Namespace) -> SampleConfig:
    """The config's sample section with the flags given on top; a bad value is a SampleError naming its flag."""
    given: dict[str, Any] = {}
    for field in SETTING_FLAGS:
        value = getattr(args, field)
        if value is not None:
            given[field] = None if field in ("top_k", "top_p") and str(value).lower() == "none" else value
    try:
        return SampleConfig.model_validate({**base.model_dump(), **given})
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            field = str(item["loc"][0]) if item["loc"] else "prompt"
            problems.append(f"{SETTING_FLAGS.get(field, field)} {given.get(field, getattr(base, field, None))!r}: {item['msg']}")
        raise SampleError("; ".join(problems) + " (see python -m gpt.sample --help)") from None


def checkpoint_of(args: argparse.Namespace, storage_root: str) -> Path:
    """The checkpoint folder that --checkpoint names, or --run's with --step/--best."""
    if args.checkpoint is not None:
        if args.step is not None or args.best:
            raise SampleError("--step and --best pick a checkpoint of --run; with --checkpoint, name that step's folder itself")
        return args.checkpoint
    run_dir = ArtifactStore(storage_root).run_dir(args.run)
    if not list_checkpoints(run_dir):
        runs_dir = run_dir.parent
        runs = sorted(p.name for p in runs_dir.iterdir() if list_checkpoints(p)) if runs_dir.is_dir() else []
        raise SampleError(
            f"no run {args.run!r} with checkpoints under {runs_dir} (runs with checkpoints: {', '.join(runs) or 'none'}); "
            "pass one of those to --run, or point --config or FWP_STORAGE_ROOT at the storage root that holds it"
        )
    which = "best" if args.best else args.step if args.step is not None else "latest"
    return select_checkpoint(run_dir, which)


def format_samples(checkpoint: Path, config: SampleConfig, samples: list[Sample]) -> str:
    """The samples for a terminal: one header line, then each sample under a rule naming it."""
    header = (f"checkpoint {checkpoint}: temperature {config.temperature}, top-k {config.top_k or 'off'}, "
              f"top-p {config.top_p or 'off'}, seed {config.seed}, up to {config.max_new_tokens} new tokens")
    lines = [header]
    prompts = config.prompts
    for index, item in enumerate(samples):
        prompt_number, sample_number = divmod(index, config.num_samples)
        ending = "stopped at <|endoftext|>" if item.stopped_at_eot else "max_new_tokens reached"
        lines.append(f"\n===== prompt {prompt_number + 1}/{len(prompts)}, sample {sample_number + 1}/{config.num_samples}: "
                     f"{item.new_tokens} new tokens, {ending} =====")
        lines.append(item.text)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
