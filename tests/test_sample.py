"""Generation and sampling: the KV cache against the uncached forward, the sampling filters,
stopping at <|endoftext|>, the UTF-8 end rule, and the `python -m gpt.sample` command line.
Real torch on tiny models; checkpoints written by the trainer or by save_checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt.checkpoint
from configs import SampleConfig
from gpt.checkpoint import save_checkpoint
from gpt.encoding import EOT, gpt2_encoding
from gpt.model import GPT, GPTConfig, KVCache, top_p_filter
from gpt.sample import Sample, decode_complete, main, sample
from gpt.train import train
from storage.artifacts import ArtifactStore
from tests.gpt_fixtures import tiny_config, with_model, write_tiny_shards

PROJECT_ROOT = Path(__file__).resolve().parent.parent
N_VOCAB = 50257
torch.set_num_threads(1)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16, **overrides})).eval()


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def storage_root(tmp_path_factory) -> Path:
    """A storage root with runs/tiny: a 20-iteration tiny run, checkpoints at steps 10 and 20."""
    root = tmp_path_factory.mktemp("sample-root")
    shards = write_tiny_shards(root / "shards")
    train(tiny_config(max_iters=20), shards, ArtifactStore(root).run_dir("tiny"))
    return root


def checkpoint(root: Path, step: int) -> Path:
    return ArtifactStore(root).run_dir("tiny") / "checkpoints" / f"step_{step:06d}"


def rigged_checkpoint(folder: Path, logits: dict[int, float]) -> Path:
    """A checkpoint whose next-token logits are the same after every context: `logits` for
    the tokens named, 0 for all others (ln_f's gain is 0, so its bias alone reaches the head)."""
    config = with_model(tiny_config(), bias=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_model_config(config.model))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        for token, logit in logits.items():
            model.lm_head.weight[token, 0] = logit
    optimizer = model.configure_optimizers(0.0, 1e-3, (0.9, 0.95), "cpu")
    return save_checkpoint(folder, 1, model, optimizer, {"config": config.model_dump(mode="json")}, keep_last=1)


# --- the KV cache gives the uncached forward's logits ------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_cached_prefill_matches_the_uncached_forward(bias):
    model = tiny_model(bias=bias)
    for length in (1, 7, 16):
        idx = torch.randint(0, N_VOCAB, (3, length), generator=generator(length))
        cache = KVCache(model.config)
        cached, _ = model(idx, kv_cache=cache)
        uncached, _ = model(idx)
        assert cache.length == length
        torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)


def test_a_chunk_after_cached_positions_attends_causally():
    model = tiny_model()
    idx = torch.randint(0, N_VOCAB, (2, 12), generator=generator(1))
    targets = torch.zeros_like(idx)  # with targets the forward returns the logits of every position
    full, _ = model(idx, targets)
    cache = KVCache(model.config)
    model(idx[:, :5], kv_cache=cache)
    chunk, _ = model(idx[:, 5:], targets[:, 5:].contiguous(), kv_cache=cache)
    torch.testing.assert_close(chunk, full[:, 5:], rtol=1e-5, atol=1e-5)


def test_cached_decoding_matches_the_uncached_forward_past_block_size():
    model = tiny_model()
    block = model.config.block_size
    idx = torch.randint(0, N_VOCAB, (2, 2 * block + 5), generator=generator(2))
    cache = KVCache(model.config)
    for length in range(1, idx.size(1) + 1):
        cached = model.next_logits(idx[:, :length], cache)
        uncached = model.next_logits(idx[:, :length])
        torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5, msg=f"after {length} tokens")
        assert cache.length == min(length, block)  # past the block: the cropped context is the new prefill
    direct, _ = model(idx[:, -block:])  # what the uncached path means past the block: positions 0..block-1
    torch.testing.assert_close(model.next_logits(idx), direct[:, -1], rtol=0, atol=0)


@pytest.mark.parametrize("settings", [
    {"temperature": 1.0, "top_k": None},
    {"temperature": 0.8, "top_k": 50},
    {"temperature": 1.2, "top_k": None, "top_p": 0.9},
])
def test_cached_and_uncached_generate_give_the_same_tokens(settings):
    model = tiny_model()
    prompt = torch.tensor([[EOT, 464, 3290], [464, 11, 13]])
    max_new = 3 * model.config.block_size  # well past the block
    cached = model.generate(prompt, max_new, generator=generator(7), vocab_limit=N_VOCAB, **settings)
    uncached = model.generate(prompt, max_new, generator=generator(7), vocab_limit=N_VOCAB, use_cache=False, **settings)
    assert cached.shape == (2, 3 + max_new)
    assert torch.equal(cached, uncached)


def test_a_prompt_longer_than_the_block_is_cropped_the_same_way():
    model = tiny_model()
    prompt = torch.randint(0, N_VOCAB, (1, 40), generator=generator(3))
    cached = model.generate(prompt, 10, top_k=20, generator=generator(1))
    uncached = model.generate(prompt, 10, top_k=20, generator=generator(1), use_cache=False)
    assert torch.equal(cached, uncached) and torch.equal(cached[:, :40], prompt)


# --- sampling settings ----------------------------------------------------------------------------


def test_top_k_of_one_is_greedy():
    model = tiny_model()
    idx = torch.tensor([[464, 318]])
    expected = idx
    for _ in range(20):
        expected = torch.cat([expected, model.next_logits(expected)[:, :N_VOCAB].argmax(-1, keepdim=True)], dim=1)
    for seed in (0, 1):
        assert torch.equal(model.generate(idx, 20, top_k=1, generator=generator(seed), vocab_limit=N_VOCAB), expected)


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.tensor([[0.05, 0.5, 0.125, 0.25, 0.075]])  # sorted: 0.5, 0.25, 0.125, 0.075, 0.05
    logits = probs.log()

    def kept(p: float) -> set[int]:
        filtered = top_p_filter(logits, p)
        return {i for i in range(5) if filtered[0, i] > -float("inf")}

    assert kept(0.3) == {1}  # 0.5 alone reaches 0.3
    assert kept(0.5 - 1e-4) == {1}
    assert kept(0.6) == {1, 3}  # 0.5 + 0.25
    assert kept(0.8) == {1, 3, 2}  # 0.875
    assert kept(0.9) == {1, 3, 2, 4}  # 0.95
    assert kept(0.99) == {0, 1, 2, 3, 4}
    assert kept(1e-9) == {1}  # at least the most likely token
    filtered = top_p_filter(logits, 0.8)
    assert torch.equal(filtered[0, [1, 3, 2]], logits[0, [1, 3, 2]])  # kept logits are unchanged
    batch = top_p_filter(torch.stack([logits[0], logits[0].flip(0)]), 0.6)  # each row on its own
    assert (batch[0] > -float("inf")).tolist() == [False, True, False, True, False]
    assert (batch[1] > -float("inf")).tolist() == [False, True, False, True, False][::-1]


def test_a_tiny_top_p_is_greedy():
    model = tiny_model()
    idx = torch.tensor([[464]])
    greedy = model.generate(idx, 12, top_k=1, generator=generator(0), vocab_limit=N_VOCAB)
    assert torch.equal(model.generate(idx, 12, top_p=1e-6, generator=generator(5), vocab_limit=N_VOCAB), greedy)


@pytest.mark.parametrize("settings", [{"top_k": None}, {"top_k": 5}, {"top_p": 0.5, "top_k": None}])
def test_only_real_ids_are_sampled_when_the_padding_ids_have_the_largest_logits(settings):
    model = tiny_model()
    with torch.no_grad():  # real ids get logit 0, the padding ids (50257..50303) random ones: the largest win
        model.lm_head.weight[:N_VOCAB] = 0.0
        model.lm_head.weight[N_VOCAB:] = torch.randn(50304 - N_VOCAB, 32, generator=generator(0))
    idx = torch.tensor([[464]])
    assert int(model.generate(idx, 10, top_k=1, generator=generator(0))[0, 1:].min()) >= N_VOCAB  # unlimited: padding wins
    for cache in (True, False):
        tokens = model.generate(idx, 30, generator=generator(1), vocab_limit=N_VOCAB, use_cache=cache, **settings)
        assert int(tokens.max()) < N_VOCAB


def test_sample_never_returns_padding_ids(tmp_path):
    ckpt = rigged_checkpoint(tmp_path, {50300: 50.0, 50257: 50.0, 262: 1.0})
    [only] = sample(ckpt, SampleConfig(prompt="Hi", num_samples=1, max_new_tokens=6, top_k=None), device="cpu")
    assert only.new_tokens == 6 and max(only.tokens) < N_VOCAB


def test_generation_repeats_the_stop_token_and_ends_once_every_row_has_it():
    model = tiny_model()
    idx = torch.tensor([[464], [318]])
    free = model.generate(idx, 30, top_k=3, generator=generator(4))
    stop = int(free[0, 6])  # the sixth token row 0 samples when nothing stops it
    tokens = model.generate(idx, 30, top_k=3, generator=generator(4), stop_token=stop)
    assert stop in tokens[0, 1:7].tolist()
    for row in range(2):
        sampled, unstopped = tokens[row, 1:].tolist(), free[row, 1:].tolist()
        first = sampled.index(stop) if stop in sampled else len(sampled)
        assert sampled[:first] == unstopped[:first]  # the same draws up to the stop token
        assert set(sampled[first:]) <= {stop}  # then the stop token only

    alone_free = model.generate(idx[:1], 30, top_k=3, generator=generator(4))
    stop = int(alone_free[0, 6])
    alone = model.generate(idx[:1], 30, top_k=3, generator=generator(4), stop_token=stop)
    assert alone.size(1) <= 7 and int(alone[0, -1]) == stop  # every row stopped: generation ended
    assert torch.equal(alone, alone_free[:, :alone.size(1)])


# --- samples from checkpoints -----------------------------------------------------------------------


def test_samples_per_prompt_are_structured_and_reproducible(storage_root):
    ckpt = checkpoint(storage_root, 20)
    config = SampleConfig(prompt=["The", "Once upon"], num_samples=3, max_new_tokens=8, seed=5, top_p=0.95)
    samples = sample(ckpt, config, device="cpu")
    assert [s.prompt for s in samples] == ["The"] * 3 + ["Once upon"] * 3
    for item in samples:
        assert isinstance(item, Sample) and item.text == item.prompt + item.completion
        assert item.text.startswith(item.prompt)
        assert item.new_tokens == len(item.tokens) <= 8 and all(0 <= t < N_VOCAB and t != EOT for t in item.tokens)
        assert item.stopped_at_eot == (item.new_tokens < 8)
    assert sample(ckpt, config, device="cpu") == samples  # same seed: same texts
    other = sample(ckpt, config.model_copy(update={"seed": 6}), device="cpu")
    assert [s.text for s in other] != [s.text for s in samples]
    fewer = sample(ckpt, config.model_copy(update={"num_samples": 2, "prompt": "Once upon"}), device="cpu")
    assert fewer == samples[3:5]  # a prompt's first samples depend neither on num_samples nor on other prompts


def test_a_single_prompt_string_as_in_the_presets(storage_root):
    config = SampleConfig(prompt="The module", num_samples=2, max_new_tokens=4)
    samples = sample(checkpoint(storage_root, 10), config, device="cpu")
    assert len(samples) == 2 and all(s.text.startswith("The module") for s in samples)


def test_sampling_stops_at_endoftext_and_leaves_it_out(tmp_path):
    ckpt = rigged_checkpoint(tmp_path, {EOT: 50.0})  # <|endoftext|> is the only likely token
    config = SampleConfig(prompt="Hello", num_samples=2, max_new_tokens=5)
    for item in sample(ckpt, config, device="cpu"):
        assert item.stopped_at_eot and item.tokens == [] and item.text == "Hello"
    [kept] = sample(ckpt, config.model_copy(update={"stop_at_eot": False, "num_samples": 1}), device="cpu")
    assert not kept.stopped_at_eot and kept.tokens == [EOT] * 5
    assert kept.text == "Hello" + "<|endoftext|>" * 5


def test_sampling_stops_at_endoftext_in_the_middle(tmp_path):
    word = gpt2_encoding().encode(" la")[0]
    ckpt = rigged_checkpoint(tmp_path, {EOT: 50.0, word: 50.0})  # a fair coin: " la" or the end
    samples = sample(ckpt, SampleConfig(prompt="Tra", num_samples=12, max_new_tokens=6, seed=3), device="cpu")
    for item in samples:
        assert item.text == "Tra" + " la" * item.new_tokens and item.tokens == [word] * item.new_tokens
        assert item.stopped_at_eot == (item.new_tokens < 6)
    assert {item.new_tokens for item in samples} & {1, 2, 3, 4}  # some end part way (2**-12 odds to fail)


def test_decoding_drops_an_incomplete_character_at_the_end_only():
    encoding = gpt2_encoding()
    c3, a9 = encoding.encode_single_token(b"\xc3"), encoding.encode_single_token(b"\xa9")  # é = C3 A9
    cafe = encoding.encode("caf")
    assert decode_complete(encoding, cafe + [c3, a9]) == "café"
    assert decode_complete(encoding, cafe + [c3]) == "caf"  # cut between the bytes of é: not shown
    assert decode_complete(encoding, cafe + [c3, c3]) == "caf\ufffd"  # an invalid byte in the middle stays visible
    assert decode_complete(encoding, [a9] + cafe) == "\ufffdcaf"
    emoji = list(encoding.encode("🙂"))
    assert len(emoji) > 1 and decode_complete(encoding, emoji[:-1]) == "" and decode_complete(encoding, emoji) == "🙂"


def test_a_sample_whose_last_token_starts_a_character_ends_cleanly(tmp_path):
    c3 = gpt2_encoding().encode_single_token(b"\xc3")
    ckpt = rigged_checkpoint(tmp_path, {c3: 50.0})  # every token is the first byte of a two-byte character
    [one] = sample(ckpt, SampleConfig(prompt="caf", num_samples=1, max_new_tokens=1), device="cpu")
    assert one.text == "caf" and one.tokens == [c3] and not one.stopped_at_eot
    [three] = sample(ckpt, SampleConfig(prompt="caf", num_samples=1, max_new_tokens=3), device="cpu")
    assert three.text == "caf\ufffd\ufffd"  # two lone lead bytes are invalid; the last one may still complete


def test_a_list_of_prompts_must_not_be_empty():
    with pytest.raises(ValueError, match="non-empty list"):
        SampleConfig(prompt=[])
    assert SampleConfig(prompt="x").prompts == ["x"] and SampleConfig(prompt=["a", "b"]).prompts == ["a", "b"]


# --- the command line -------------------------------------------------------------------------------


def run_cli(*args: str, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT), "FWP_STORAGE_ROOT": str(root)}
    return subprocess.run([sys.executable, "-m", "gpt.sample", *args], capture_output=True, text=True, env=env,
                          cwd=root, timeout=120, check=False)


def test_cli_samples_a_run_step_and_a_checkpoint_folder(storage_root):
    settings = ["--prompt", "The", "--prompt", "A", "--num-samples", "2", "--max-new-tokens", "6", "--seed", "11",
                "--top-k", "none", "--top-p", "0.9"]
    by_run = run_cli("--run", "tiny", "--step", "10", *settings, root=storage_root)
    assert by_run.returncode == 0, by_run.stderr
    config = SampleConfig(prompt=["The", "A"], num_samples=2, max_new_tokens=6, seed=11, top_k=None, top_p=0.9)
    expected = sample(checkpoint(storage_root, 10), config, device="cpu")
    assert str(checkpoint(storage_root, 10)) in by_run.stdout.splitlines()[0]
    assert by_run.stdout.count("===== prompt") == 4 and "prompt 2/2, sample 2/2" in by_run.stdout
    for item in expected:
        assert f"\n{item.text}\n" in by_run.stdout + "\n"

    by_folder = run_cli("--checkpoint", str(checkpoint(storage_root, 10)), *settings, root=storage_root)
    assert by_folder.returncode == 0, by_folder.stderr
    assert by_folder.stdout == by_run.stdout


def test_cli_error_is_one_line_without_a_traceback(storage_root):
    result = run_cli("--run", "missing", root=storage_root)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: no run 'missing'")
    assert "tiny" in result.stderr  # names the runs there


@pytest.mark.parametrize("args, message", [
    (["--run", "tiny", "--step", "15"], "steps there: 10, 20"),
    (["--run", "tiny", "--step", "latest-ish"], "name latest, best or a step number"),
    (["--run", "tiny", "--top-p", "1.5"], "--top-p '1.5': Input should be less than or equal to 1"),
    (["--run", "tiny", "--temperature", "hot"], "--temperature 'hot': Input should be a valid number"),
    (["--run", "tiny", "--num-samples", "0"], "--num-samples '0'"),
    (["--run", "tiny", "--device", "gpu0"], "device 'gpu0' is not a torch device"),
    (["--checkpoint", "nowhere", "--best"], "--step and --best pick a checkpoint of --run"),
    (["--checkpoint", "nowhere"], "is not a complete checkpoint"),
])
def test_cli_bad_input_names_the_fix(storage_root, monkeypatch, capsys, args, message):
    monkeypatch.setenv("FWP_STORAGE_ROOT", str(storage_root))
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err


def test_cli_names_only_the_runs_that_have_a_checkpoint(tmp_path, monkeypatch, capsys):
    store = ArtifactStore(tmp_path)
    rigged_checkpoint(store.run_dir("trained"), {})
    store.run_dir("stopped-before-its-first-checkpoint").mkdir(parents=True)
    monkeypatch.setenv("FWP_STORAGE_ROOT", str(tmp_path))
    assert main(["--run", "stopped-before-its-first-checkpoint"]) == 1
    assert "(runs with checkpoints: trained)" in capsys.readouterr().err


def test_cli_finds_a_run_s_checkpoints_where_gpt_checkpoint_keeps_them(tmp_path, monkeypatch, capsys):
    """Only gpt.checkpoint knows where a run keeps its checkpoints: --run asks it."""
    monkeypatch.setattr(gpt.checkpoint, "CHECKPOINTS", "kept-elsewhere")
    saved = rigged_checkpoint(ArtifactStore(tmp_path).run_dir("elsewhere"), {})
    monkeypatch.setenv("FWP_STORAGE_ROOT", str(tmp_path))
    assert main(["--run", "elsewhere", "--max-new-tokens", "1", "--num-samples", "1", "--device", "cpu"]) == 0
    assert str(saved) in capsys.readouterr().out.splitlines()[0]


def test_cli_best_and_latest(storage_root, monkeypatch, capsys):
    monkeypatch.setenv("FWP_STORAGE_ROOT", str(storage_root))
    assert main(["--run", "tiny", "--max-new-tokens", "2", "--num-samples", "1"]) == 0
    assert str(checkpoint(storage_root, 20)) in capsys.readouterr().out.splitlines()[0]
    assert main(["--run", "tiny", "--best", "--max-new-tokens", "2", "--num-samples", "1"]) == 0
    assert "checkpoints/step_0000" in capsys.readouterr().out.splitlines()[0]
