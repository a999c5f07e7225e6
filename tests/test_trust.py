"""Trust: no name reaches outside the store, no pickle runs code, the local server listens on
loopback only, and a damaged file is found by its checksum and never used."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs import ConfigError, load_config
from gpt.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from gpt.model import GPT, GPTConfig
from storage.artifacts import ArtifactError, ArtifactStore
from tests.conftest import PROJECT_ROOT, run_pipeline_cli
from tests.gpt_fixtures import tiny_config


# ---------------------------------------------------------------------------------------
# Names stay inside the store
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../../tmp/escaped", "/etc/cron.d/x", ".hidden", "a/b", "", "x" * 101, "run name"])
def test_a_run_name_that_would_leave_the_store_is_refused_in_one_line(name):
    with pytest.raises(ConfigError) as error:
        load_config("demo", [f"train.run_name={json.dumps(name)}"])
    message = str(error.value)
    assert "\n" not in message and "train.run_name" in message and "letters, digits, '.', '_' or '-'" in message


def test_the_cli_refuses_an_escaping_run_name_before_writing_anything(tmp_path):
    root, outside = tmp_path / "artifacts", tmp_path / "escaped"
    process, _ = run_pipeline_cli(["--config", "configs/demo.yaml", "--set", f"storage.root={root}",
                                   "--set", "train.run_name=../escaped"], dict(os.environ), timeout=120)
    assert process.returncode == 1 and "train.run_name" in process.stderr.strip().splitlines()[-1]
    assert not root.exists() and not outside.exists()


def test_the_store_never_builds_a_run_folder_outside_itself(tmp_path):
    store = ArtifactStore(tmp_path / "root")
    assert store.run_dir("demo") == (tmp_path / "root" / "runs" / "demo").resolve()
    for name in ("../x", "..", ".", "a/../../b"):
        with pytest.raises(ArtifactError, match="would leave"):
            store.run_dir(name)


def test_sampling_a_run_by_an_escaping_name_is_a_one_line_error(tmp_path):
    process = subprocess.run([sys.executable, "-m", "gpt.sample", "--run", "../../etc", "--prompt", "x"], cwd=PROJECT_ROOT,
                             env=dict(os.environ, FWP_STORAGE_ROOT=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert process.returncode == 1 and process.stderr.startswith("error: ") and "Traceback" not in process.stderr


# ---------------------------------------------------------------------------------------
# No pickle runs code
# ---------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this would create the file `target`."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _malicious(path: Path, target: Path, wrapped) -> None:
    with open(path, "wb") as handle:
        pickle.dump(wrapped(_Payload(target)), handle)


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_runs_nothing(tmp_path):
    config = tiny_config()
    model = GPT(GPTConfig.from_model_config(config.model))
    optimizer = torch.optim.AdamW(model.parameters())
    folder = save_checkpoint(tmp_path / "run", 1, model, optimizer, {"config": config.model_dump(mode="json")}, keep_last=2)
    target = tmp_path / "the-payload-ran"
    _malicious(folder / "model.pt", target, lambda payload: {"transformer.wte.weight": payload})
    manifest = json.loads((folder / "manifest.json").read_text())  # an attacker rewrites the checksums too
    import hashlib

    for entry in manifest["files"]:
        data = (folder / entry["path"]).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(folder)
    assert "refused" in str(error.value) and "\n" not in str(error.value)
    assert not target.exists()


def test_a_nanogpt_file_whose_pickle_would_run_code_is_refused_and_runs_nothing(tmp_path):
    from gpt.checkpoint import load_nanogpt_checkpoint

    target = tmp_path / "the-payload-ran"
    _malicious(tmp_path / "ckpt.pt", target, lambda payload: {"model": payload, "model_args": {}})
    with pytest.raises(CheckpointError, match="refused"):
        load_nanogpt_checkpoint(tmp_path / "ckpt.pt")
    assert not target.exists()


# ---------------------------------------------------------------------------------------
# The local server listens on loopback only
# ---------------------------------------------------------------------------------------


def _listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # LISTEN
                packed = bytes.fromhex(address)
                if width == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, packed[::-1]))
                else:
                    words = b"".join(packed[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def test_the_local_prefect_server_listens_on_loopback_only(prefect_server):
    assert _listening_addresses(prefect_server.port) == {"127.0.0.1"}


# ---------------------------------------------------------------------------------------
# A damaged file is found by its checksum and never used
# ---------------------------------------------------------------------------------------


def _checkpoints(tmp_path: Path, steps: list[int]) -> Path:
    config = tiny_config()
    model = GPT(GPTConfig.from_model_config(config.model))
    optimizer = torch.optim.AdamW(model.parameters())
    for step in steps:
        save_checkpoint(tmp_path / "run", step, model, optimizer, {"config": config.model_dump(mode="json")}, keep_last=5)
    return tmp_path / "run"


def test_a_checkpoint_with_flipped_bytes_is_never_loaded_and_the_previous_is_used(tmp_path):
    run = _checkpoints(tmp_path, [10, 20])
    weights = run / "checkpoints" / "step_000020" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte different
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=str(weights)):
        assert latest_checkpoint(run).name == "step_000010"
    with pytest.raises(CheckpointError, match=r"step_000020 is damaged \(model.pt"):
        load_checkpoint(run / "checkpoints" / "step_000020")


def test_a_half_written_artifact_folder_is_not_an_artifact_and_is_rebuilt(tmp_path):
    store = ArtifactStore(tmp_path)
    half = store.path("tokenize", "abc")
    half.mkdir(parents=True)
    (half / "train_000000.bin").write_bytes(b"half a shard")  # a crash before the manifest was written
    assert not store.exists("tokenize", "abc") and store.latest("tokenize") is None
    store.publish("tokenize", "abc", lambda folder: (folder / "train_000000.bin").write_bytes(b"whole") and {})
    assert (half / "train_000000.bin").read_bytes() == b"whole" and store.verify("tokenize", "abc") == []
