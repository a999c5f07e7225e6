"""The pipeline's config tree (pydantic) and its YAML presets."""

from configs.schema import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    PipelineConfig,
    PipelineOverrides,
    ProfileConfig,
    SampleConfig,
    RunnerConfig,
    StorageConfig,
    TokenizeConfig,
    TrainConfig,
    describe,
    load_config,
    nest_overrides,
    parse_overrides,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "PipelineConfig",
    "PipelineOverrides",
    "ProfileConfig",
    "SampleConfig",
    "RunnerConfig",
    "StorageConfig",
    "TokenizeConfig",
    "TrainConfig",
    "describe",
    "load_config",
    "nest_overrides",
    "parse_overrides",
]
