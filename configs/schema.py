"""The one config tree of the pipeline, loaded from a YAML preset plus dotted overrides.

Each section maps to one stage (data → profile → tokenize → model/train → eval → sample)
and to one place in the code. Unknown keys and bad values are rejected with a one-line
`ConfigError` that names the key and how to fix it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo

from configs.errors import UserError
from configs.secrets import redact

PRESETS_DIR = Path(__file__).resolve().parent
STORAGE_ROOT_ENV = "FWP_STORAGE_ROOT"


class ConfigError(UserError):
    """A config file or override that cannot be used; the message is one line."""


# A name that becomes a folder (a run under <storage.root>/runs): it can neither climb out of the
# store (no "/", no leading ".") nor surprise a shell.
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_folder_name(value: str, what: str) -> str:
    if not FOLDER_NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r} names a folder under storage.root: use up to 100 letters, digits, "
                         "'.', '_' or '-', starting with a letter or digit")
    return value


class RedactedInJson(BaseModel):
    """A model whose JSON form has its credentials redacted (a source URL's password, a token):
    JSON is what Prefect records of a flow run's parameters, in its database and UI. The
    Python values, which the code uses, keep them."""

    @model_serializer(mode="wrap", when_used="json")
    def _redacted(self, handler: SerializerFunctionWrapHandler) -> Any:
        return redact(handler(self))


class Section(RedactedInJson):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Where the FineWeb parquet comes from."""

    source: str | list[str] = Field(
        description="URL, path or glob (or a list): local, file://, https://, hf://, s3://, "
        "memory://, or demo://python-docs for the embedded offline demo corpus"
    )
    text_column: str = "text"
    max_rows: int | None = Field(
        default=None, ge=1, description="take only the first row groups that hold this many rows"
    )

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @field_validator("source")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if not items or any(not str(item).strip() for item in items):
            raise ValueError("must name at least one non-empty URL, path or glob")
        return value


class ProfileConfig(Section):
    short_doc_chars: int = Field(default=200, ge=1, description="documents shorter than this count as short")
    top_domains: int = Field(default=20, ge=1)
    memory_limit: str | None = Field(
        default=None,
        pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$",
        description="DuckDB's memory cap, e.g. '4GB' (default: 80% of RAM); beyond it DuckDB spills to disk. Not part of the profile's version",
    )


class TokenizeConfig(Section):
    encoding: Literal["gpt2"] = "gpt2"
    val_fraction: float = Field(default=0.01, gt=0.0, lt=1.0, description="share of documents held out")
    shard_tokens: int = Field(default=100_000_000, ge=1024, description="tokens per .bin shard")
    num_workers: int = Field(default=0, ge=0, description="tokenizer encoders (threads for the native engine, else processes); 0 = one per core, as many as the text pays for")
    engine: Literal["auto", "native", "fastokens", "tiktoken"] = Field(
        default="auto", description="BPE engine: auto = the first of native (C, compiled on first use), fastokens that can run "
        "and is exact on a self-check, else tiktoken. "
        "Speed only, not part of the version: shards are byte-identical")
    verify_fraction: float = Field(
        default=0.01, ge=0.0, le=1.0, description="share of documents (seeded) re-encoded with tiktoken to check the engine; "
        "any difference fails the stage. Not part of the version")
    seed: int = 1337


class ModelConfig(Section):
    """nanoGPT's GPTConfig."""

    n_layer: int = Field(default=12, ge=1)
    n_head: int = Field(default=12, ge=1)
    n_embd: int = Field(default=768, ge=1)
    block_size: int = Field(default=1024, ge=2)
    vocab_size: int = Field(default=50304, ge=50257, description="GPT-2's 50257 padded to a multiple of 64")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    bias: bool = False

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        return self

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count exactly as nanoGPT reports it (position embeddings excluded by default)."""
        d, L, V, T = self.n_embd, self.n_layer, self.vocab_size, self.block_size
        bias = 1 if self.bias else 0
        ln = d + bias * d
        attn = d * 3 * d + bias * 3 * d + d * d + bias * d
        mlp = d * 4 * d + bias * 4 * d + 4 * d * d + bias * d
        per_layer = 2 * ln + attn + mlp
        total = V * d + T * d + L * per_layer + ln  # wte (tied with lm_head) + wpe + blocks + ln_f
        return total - T * d if non_embedding else total

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B as in nanoGPT."""
        return 6 * self.num_params() + 12 * self.n_layer * self.n_embd * self.block_size


class TrainConfig(Section):
    run_name: str | None = Field(default=None, description="checkpoints live under runs/<run_name>; default: the preset name")
    max_iters: int = Field(default=6000, ge=1)
    batch_size: int = Field(default=16, ge=1, description="micro-batch sequences per device")
    grad_accum_steps: int = Field(default=1, ge=1, description="micro-steps per optimizer step (whole job)")
    learning_rate: float = Field(default=6e-4, gt=0)
    min_lr: float = Field(default=6e-5, ge=0)
    schedule: Literal["cosine", "wsd"] = "cosine"
    warmup_iters: int = Field(default=700, ge=0)
    lr_decay_iters: int | None = Field(default=None, ge=1, description="default: max_iters")
    wsd_decay_fraction: float = Field(default=0.2, gt=0, le=1, description="WSD: share of iterations spent decaying")
    continue_policy: Literal["rewarm", "extend"] = Field(
        default="rewarm",
        description="when max_iters grows past a finished run: 'rewarm' warms up again to "
        "learning_rate then decays to the new max_iters; 'extend' stretches the "
        "schedule as if max_iters had been the target from the start (WSD: continue stable, then decay)",
    )
    rewarm_iters: int = Field(default=200, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = Field(default=1.0, ge=0, description="0 disables clipping")
    eval_interval: int = Field(default=250, ge=1)
    eval_iters: int = Field(default=20, ge=1, description="val batches per evaluation")
    log_interval: int = Field(default=10, ge=1)
    checkpoint_interval: int = Field(default=500, ge=1)
    hellaswag_interval: int | None = Field(
        default=None, ge=1, description="score HellaSwag on a subset every this many iterations (needs eval.hellaswag_path); none: off"
    )
    hellaswag_items: int = Field(default=500, ge=1, description="the subset scored during training: N items spread evenly over the file")
    keep_last_checkpoints: int = Field(default=3, ge=1)
    compile: bool = True
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N, mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="autocast precision; auto: bfloat16 on GPUs that have it (float16 on older ones) and on "
        "CPUs with AMX or AVX512-BF16, float32 on other CPUs")
    fused_adamw: bool | None = Field(default=None, description="default: fused where the device supports it")
    memory_check: bool = Field(
        default=True, description="estimate the memory a micro-batch needs before training and stop, naming the largest "
        "micro-batch that fits, when it exceeds the free memory (gpt/memory.py); false: train anyway")
    num_threads: int | None = Field(default=None, ge=1, description="torch CPU threads; default: all cores")
    peak_tflops: float | None = Field(default=None, gt=0, description="device peak for MFU; default: looked up by GPU name")
    nproc_per_node: int = Field(default=1, ge=1, description=">1 launches torchrun from the train task")
    seed: int = 1337

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_folder_name(cls, value: str | None) -> str | None:
        return None if value is None else check_folder_name(value, "train.run_name")

    @model_validator(mode="after")
    def _lr_order(self) -> TrainConfig:
        if self.min_lr > self.learning_rate:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.learning_rate ({self.learning_rate})")
        return self


class EvalConfig(Section):
    max_batches: int = Field(default=50, ge=1, description="val batches for the final evaluation")
    batch_size: int = Field(default=8, ge=1)
    hellaswag_path: str | None = Field(default=None, description="a HellaSwag jsonl (URL or path) to score; none skips it")
    hellaswag_max_items: int | None = Field(default=None, ge=1, description="score N items spread evenly over the file; none: all")
    hellaswag_items_per_batch: int = Field(
        default=4, ge=1, le=256,
        description="HellaSwag items scored per forward pass (4 rows each); the logits are 4 × items × width "
                    "× 50304 floats, so memory grows with it. 4 is fastest on CPU; raise it on a GPU",
    )


class SampleConfig(Section):
    prompt: str | list[str] = Field(default="The", description="one prompt or a list; num_samples completions of each")
    num_samples: int = Field(default=3, ge=1, description="completions per prompt")
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.8, gt=0)
    top_k: int | None = Field(default=200, ge=1, description="sample among the k most likely tokens; none: all")
    top_p: float | None = Field(
        default=None, gt=0, le=1, description="nucleus: the smallest set of likely tokens whose probability reaches p; none: off"
    )
    stop_at_eot: bool = Field(default=True, description="end a sample at <|endoftext|>, which is not part of its text")
    seed: int = Field(default=1337, description="the same seed gives the same texts")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("must be a prompt or a non-empty list of prompts")
        return value


class RunnerConfig(Section):
    """Where the per-file work (tokenizing each parquet file) runs: a Prefect task runner.
    Speed only: no artifact's version depends on it, and the shards are the same bytes."""

    kind: Literal["local", "dask", "ray"] = Field(
        default="local", description="local: threads of this process; dask: prefect-dask; ray: prefect-ray")
    address: str | None = Field(
        default=None, description="an existing Dask scheduler (tcp://host:8786) or Ray cluster (ray://host:10001); "
        "dask without it starts a LocalCluster on this machine")
    workers: int = Field(default=0, ge=0, description="files tokenized at once (local threads or LocalCluster processes); 0 = one per core")

    @model_validator(mode="after")
    def _ray_needs_an_address(self) -> RunnerConfig:
        if self.kind == "ray" and not self.address:
            raise ValueError("runner.kind ray needs runner.address (ray://host:10001) of a running Ray cluster")
        return self


class StorageConfig(Section):
    root: str = Field(default="./artifacts", description=f"every output lives here; env {STORAGE_ROOT_ENV} overrides the preset")


class PipelineConfig(Section):
    name: str = Field(description="preset name; the default run name")
    data: DataConfig
    profile: ProfileConfig = ProfileConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    sample: SampleConfig = SampleConfig()
    storage: StorageConfig = StorageConfig()
    runner: RunnerConfig = RunnerConfig()

    @property
    def run_name(self) -> str:
        return self.train.run_name or self.name

    @model_validator(mode="after")
    def _default_run_name_is_a_folder_name(self) -> PipelineConfig:
        if self.train.run_name is None:
            check_folder_name(self.name, "the run name (the config's name; set train.run_name to choose another)")
        return self

    def tokens_per_iter(self) -> int:
        """Tokens per optimizer step for the whole job (micro-steps are split across ranks)."""
        return self.train.batch_size * self.model.block_size * self.train.grad_accum_steps

    @model_validator(mode="after")
    def _batch_divides_accumulation(self) -> PipelineConfig:
        if self.train.grad_accum_steps % self.train.nproc_per_node:
            raise ValueError(
                f"train.grad_accum_steps ({self.train.grad_accum_steps}) must be divisible by "
                f"train.nproc_per_node ({self.train.nproc_per_node})"
            )
        return self


def _overrides_of(section: type[Section]) -> type[BaseModel]:
    """The same section with every field optional: None keeps the preset's value.

    Each field keeps its type and bounds, so Prefect validates deployment parameters
    against them and names the field when a value is bad.
    """
    fields = {
        name: (info.annotation | None, FieldInfo.merge_field_infos(info, default=None))
        for name, info in section.model_fields.items()
    }
    return create_model(f"{section.__name__}Overrides", __base__=_Overrides, **fields)


class _Overrides(RedactedInJson):
    model_config = ConfigDict(extra="forbid")


PipelineOverrides = create_model(
    "PipelineOverrides",
    __base__=_Overrides,
    __doc__="Per-section config overrides, e.g. {'train': {'max_iters': 20000}}.",
    **{
        name: (_overrides_of(info.annotation) | None, None)
        for name, info in PipelineConfig.model_fields.items()
        if isinstance(info.annotation, type) and issubclass(info.annotation, Section)
    },
)


def nest_overrides(flat: dict[str, Any]) -> dict[str, Any]:
    """`{"train.max_iters": 5}` → `{"train": {"max_iters": 5}}` (the shape of PipelineOverrides)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        _set_dotted(tree, key, value)
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolve_config_path(config: str | os.PathLike) -> Path:
    """A path, or a preset name such as `demo` that names configs/demo.yaml."""
    path = Path(config)
    if path.exists():
        return path
    preset = PRESETS_DIR / f"{config}.yaml"
    if preset.exists():
        return preset
    known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {config!s} not found; pass a YAML path or one of the presets: {known}")


def parse_overrides(overrides: list[str] | dict[str, Any] | BaseModel | None) -> dict[str, Any]:
    """`["train.max_iters=100", ...]`, `{"train.max_iters": 100}` or `{"train": {"max_iters": 100}}`
    → a flat dict of dotted keys."""
    if not overrides:
        return {}
    if isinstance(overrides, BaseModel):
        overrides = overrides.model_dump(exclude_none=True)
    if isinstance(overrides, dict):
        return _flatten(overrides)
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE; write e.g. --set train.max_iters=100")
        parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return parsed


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is a value, not a section")
        node = child
    node[leaf] = value


def _one_line(error: ValidationError, origin: str) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key (check the spelling against configs/schema.py)")
        elif item["type"] == "missing":
            problems.append(f"{where}: required but missing")
        else:
            got = item.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict) else ""
            problems.append(f"{where}: {item['msg'].removeprefix('Value error, ')}{shown}")
    return f"invalid config {origin}: " + "; ".join(problems) + " — fix the YAML or the --set override"


def load_config(
    config: str | os.PathLike = "demo", overrides: list[str] | dict[str, Any] | BaseModel | None = None
) -> PipelineConfig:
    """Read a preset or YAML file, apply FWP_STORAGE_ROOT then dotted overrides, validate."""
    path = resolve_config_path(config)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(tree).__name__}")
    tree.setdefault("name", path.stem)
    if os.environ.get(STORAGE_ROOT_ENV):
        _set_dotted(tree, "storage.root", os.environ[STORAGE_ROOT_ENV])
    for key, value in parse_overrides(overrides).items():
        _set_dotted(tree, key, value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, str(path))) from None


def describe(config: PipelineConfig) -> str:
    """One line that makes the model size impossible to miss."""
    m = config.model
    params = m.num_params()
    return (
        f"preset {config.name}: {params / 1e6:.2f}M parameters (nanoGPT count, without position "
        f"embeddings), {m.n_layer} layers × {m.n_head} heads × n_embd {m.n_embd}, block {m.block_size}, "
        f"{config.tokens_per_iter():,} tokens/iter, {m.flops_per_token() / 1e6:.1f} MFLOPs/token"
    )
