"""Config tree: presets, overrides, the environment root, and one-line rejections."""

from __future__ import annotations

import pytest

from configs import ConfigError, describe, load_config


def test_seed_preset_is_the_seed_run_exactly():
    config = load_config("configs/fineweb-40m.yaml")
    m, t = config.model, config.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (12, 12, 384, 1024, 0.0)
    assert (t.batch_size, t.grad_accum_steps, config.tokens_per_iter()) == (16, 32, 524_288)
    assert (t.learning_rate, t.max_iters, t.schedule, t.compile) == (5e-4, 6000, "cosine", True)
    assert config.data.source == "hf://datasets/HuggingFaceFW/fineweb/data/CC-MAIN-2013-20/000_00000.parquet"


@pytest.mark.parametrize(("preset", "millions"), [("fineweb-40m", "40.56M"), ("gpt2-124m", "123.59M"), ("demo", "3.32M")])
def test_loading_a_preset_reports_its_parameter_count(preset, millions):
    assert f"{millions} parameters" in describe(load_config(preset))


def test_dotted_overrides_are_typed_and_applied():
    config = load_config("demo", ["train.max_iters=300", "train.compile=true", "data.source=[a.parquet, b.parquet]"])
    assert config.train.max_iters == 300 and config.train.compile is True
    assert config.data.sources == ["a.parquet", "b.parquet"]
    assert load_config("demo", {"train.max_iters": 7}).train.max_iters == 7


def test_storage_root_from_environment_then_override(monkeypatch):
    monkeypatch.setenv("FWP_STORAGE_ROOT", "/tmp/from-env")
    assert load_config("demo").storage.root == "/tmp/from-env"
    assert load_config("demo", ["storage.root=/tmp/from-set"]).storage.root == "/tmp/from-set"


def test_run_name_defaults_to_the_preset_name():
    assert load_config("demo").run_name == "demo"
    assert load_config("demo", ["train.run_name=try2"]).run_name == "try2"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.max_iters=abc", "train.max_iters"),
        ("train.max_iters=0", "train.max_iters"),
        ("model.n_embd=65", "model.n_embd (65) must be divisible by model.n_head"),
        ("trian.max_iters=5", "trian: unknown key"),
        ("model.colour=red", "model.colour: unknown key"),
        ("train.schedule=linear", "train.schedule"),
        ("tokenize.val_fraction=1.5", "tokenize.val_fraction"),
        ("train.min_lr=1.0", "train.min_lr"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(override, named):
    with pytest.raises(ConfigError) as error:
        load_config("demo", [override])
    message = str(error.value)
    assert named in message and "\n" not in message


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="demo, fineweb-40m, gpt2-124m"):
        load_config("nonexistent-preset")


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("demo", ["train.max_iters"])


def test_nested_overrides_as_deployments_pass_them():
    config = load_config("demo", {"train": {"max_iters": 9}, "data": {"source": ["x.parquet"]}})
    assert config.train.max_iters == 9 and config.data.sources == ["x.parquet"]


def test_flow_override_model_keeps_each_fields_type_and_bounds():
    from pydantic import ValidationError

    from configs import PipelineOverrides

    assert load_config("demo", PipelineOverrides.model_validate({"model": {"n_layer": 3}})).model.n_layer == 3
    with pytest.raises(ValidationError, match="train.max_iters"):
        PipelineOverrides.model_validate({"train": {"max_iters": 0}})
    with pytest.raises(ValidationError, match="n_layers"):
        PipelineOverrides.model_validate({"model": {"n_layers": 3}})


@pytest.mark.parametrize("preset", ["fineweb-40m", "gpt2-124m"])
def test_real_presets_score_hellaswag_from_its_canonical_url_during_and_after_training(preset):
    config = load_config(preset)
    assert config.eval.hellaswag_path == "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
    assert config.train.hellaswag_interval == 250 and config.train.hellaswag_items == 500
