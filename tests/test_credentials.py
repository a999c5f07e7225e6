"""Credentials are used, never written. A whole pipeline run reads a gated hf:// dataset with
HF_TOKEN and an http source whose URL holds `user:password@` and `?token=`; afterwards no
file under the storage root, no line the run printed, and no artifact or log in the Prefect
API holds any of the three secrets. A failing run's error line does not either."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from configs.secrets import redact
from tests.conftest import FINEWEB_FILES, FINEWEB_FOLDER, run_pipeline_cli
from tests.test_download import Server

PASSWORD = "Pa55-Secret-Word-42"
QUERY_TOKEN = "QueryToken-9f8e7d6c"
HF_SECRET = "hf_" + "CredentialsTest0" * 3
GATED = "HuggingFaceFW/fineweb-credentials"
FILE = f"{FINEWEB_FOLDER}/{FINEWEB_FILES[0]}"
SECRETS = (PASSWORD, QUERY_TOKEN, HF_SECRET)


@pytest.fixture(scope="module")
def private_http(fineweb_parquet):
    """An http server that wants basic auth and a query token for its one parquet file."""
    server = Server()
    server.basic_auth = f"loader:{PASSWORD}"
    server.files[f"/private/fineweb.parquet?token={QUERY_TOKEN}"] = fineweb_parquet
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_redact_blanks_every_kind_of_credential(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    assert redact(f"https://user:{PASSWORD}@h/x.parquet?a=1&token={QUERY_TOKEN}#f") == "https://***@h/x.parquet?a=1&token=***#f"
    assert redact({"url": "s3://b/k?X-Amz-Signature=abc123&X-Amz-Credential=AKIA/x", "n": 3}) == {
        "url": "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***", "n": 3}
    assert redact([f"Bearer {HF_SECRET}", ("hf_abcdefghijklmnopqrstuvwxyz",)]) == ["Bearer hf_***", ("hf_***",)]
    assert redact("https://huggingface.co/datasets/HuggingFaceFW/fineweb/resolve/main/a.parquet") == (
        "https://huggingface.co/datasets/HuggingFaceFW/fineweb/resolve/main/a.parquet")  # nothing secret: unchanged


def _api(prefect_server, path: str, body: dict) -> list[dict]:
    """Every item of a Prefect API filter endpoint, page by page."""
    items, offset = [], 0
    while True:
        response = httpx.post(f"{prefect_server.api_url}{path}", json={**body, "limit": 200, "offset": offset}, timeout=30)
        response.raise_for_status()
        page = response.json()
        items += page
        if len(page) < 200:
            return items
        offset += 200


def test_no_secret_reaches_the_store_the_output_or_the_prefect_api(prefect_server, loopback_hub, private_http,
                                                                    fineweb_parquet, tmp_path):
    loopback_hub.add_file("datasets", GATED, FILE, fineweb_parquet)
    loopback_hub.gate("datasets", GATED, tokens={HF_SECRET}, files_only=True)
    port = private_http.server_address[1]
    sources = [f"hf://datasets/{GATED}/{FILE}", f"http://loader:{PASSWORD}@127.0.0.1:{port}/private/fineweb.parquet?token={QUERY_TOKEN}"]
    root = tmp_path / "artifacts"
    env = dict(prefect_server.env, FWP_STORAGE_ROOT=str(root), HF_ENDPOINT=loopback_hub.endpoint, HF_TOKEN=HF_SECRET,
               PREFECT_LOGGING_LEVEL="INFO")
    settings = {"data.source": json.dumps(sources), "train.run_name": "credentials", "train.max_iters": 4,
                "train.eval_interval": 2, "train.checkpoint_interval": 2}
    process, summary = run_pipeline_cli(["--config", "configs/demo.yaml", *(f"--set={k}={v}" for k, v in settings.items())], env)
    assert process.returncode == 0, process.stderr[-3000:]
    assert list(summary["stages"]) == ["download", "profile", "tokenize", "train", "evaluate", "sample"]

    manifest = json.loads((root / "download" / summary["stages"]["download"]["version"] / "manifest.json").read_text())
    assert [f["url"] for f in manifest["metrics"]["files"]] == [  # both read with their credentials, recorded without
        sources[0], f"http://***@127.0.0.1:{port}/private/fineweb.parquet?token=***"]
    assert any(r.auth for r in loopback_hub.log if r.server == "hub" and "/resolve/" in r.path)

    written = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    assert any(path.name == "state.json" for path in written)  # checkpoints are among what is searched
    [flow_run] = _api(prefect_server, "/flow_runs/filter", {"flow_runs": {"name": {"any_": ["demo/credentials"]}}})
    subflows = _api(prefect_server, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"operator": "and_", "any_": [flow_run["id"]]}}})
    assert [run["name"] for run in subflows] == ["dataset credentials"]
    ids = [flow_run["id"]] + [run["id"] for run in subflows]
    logs = _api(prefect_server, "/logs/filter", {"logs": {"flow_run_id": {"any_": ids}}})
    artifacts = _api(prefect_server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": ids}}})
    assert len(logs) > 20 and {"credentials-download", "credentials-model-card"} <= {a["key"] for a in artifacts}
    api_text = json.dumps(logs) + json.dumps(artifacts) + json.dumps([flow_run, *subflows])  # parameters included
    for secret in SECRETS:
        assert [str(path) for path, data in written.items() if secret.encode() in data] == []
        assert secret not in process.stdout + process.stderr
        assert secret not in api_text


def test_a_download_that_keeps_failing_leaves_no_secret_on_disk(tmp_path):
    """The resumable .partial and its sidecar stay behind for the next run: neither holds the URL's secrets."""
    from storage.download import DownloadFailed, download_sources

    server = Server()
    server.files[f"/private/fineweb.parquet?token={QUERY_TOKEN}"] = b"PAR1" + b"x" * 100_000
    server.drop_after[f"/private/fineweb.parquet?token={QUERY_TOKEN}"] = 50_000
    server.basic_auth = f"loader:{PASSWORD}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://loader:{PASSWORD}@127.0.0.1:{server.server_address[1]}/private/fineweb.parquet?token={QUERY_TOKEN}"
        with pytest.raises(DownloadFailed) as error:
            download_sources([url], tmp_path / "incoming", attempts=1)
    finally:
        server.shutdown()
        server.server_close()
    left = {path.name: path.read_bytes() for path in (tmp_path / "incoming").iterdir()}
    assert sorted(left) == ["fineweb.parquet.partial", "fineweb.parquet.partial.json"]  # resumable, and named by path only
    for secret in SECRETS:
        assert secret not in str(error.value) and not [name for name, data in left.items() if secret.encode() in data]


def test_an_error_about_a_source_with_credentials_does_not_print_them(prefect_server, private_http, tmp_path):
    port = private_http.server_address[1]
    missing = f"http://loader:{PASSWORD}@127.0.0.1:{port}/private/missing.parquet?token={QUERY_TOKEN}"
    env = dict(prefect_server.env, FWP_STORAGE_ROOT=str(tmp_path / "artifacts"))
    process, _ = run_pipeline_cli(["--config", "configs/demo.yaml", "--set", f"data.source={missing}"], env, timeout=300)
    assert process.returncode == 1
    line = process.stderr.strip().splitlines()[-1]
    assert line == (f"error: SourceError: source not found: http://***@127.0.0.1:{port}/private/missing.parquet?token=*** "
                    "— check data.source")
    for secret in SECRETS:
        assert secret not in process.stdout + process.stderr
