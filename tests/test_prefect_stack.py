"""Operations through a real Prefect server and process worker: deploy from prefect.yaml,
`prefect deployment run`, continuation that resumes (not restarts), artifacts in the UI."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import pytest

from flows.stack import WORK_POOL, _prefect, down, stack_from_env, up
from tests.conftest import PROJECT_ROOT, free_port

pytestmark = pytest.mark.integration
TEST_OUTPUT = PROJECT_ROOT / "test-output"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, loopback_hub):
    """Server + work pool + every deployment in prefect.yaml + a worker, with a private PREFECT_HOME and
    storage root; the worker's Hugging Face Hub is the loopback one, which holds FineWeb's first file."""
    home = tmp_path_factory.mktemp("stack-home")
    root = tmp_path_factory.mktemp("stack-artifacts")
    stack = stack_from_env(folder=home / "stack", port=free_port(),
                           extra_env={"PREFECT_HOME": str(home), "FWP_STORAGE_ROOT": str(root),
                                      "PREFECT_LOGGING_LEVEL": "INFO", "OMP_NUM_THREADS": "2",
                                      "HF_ENDPOINT": loopback_hub.endpoint, "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"})
    up(stack)
    yield stack, root
    down(stack)


def prefect_cli(stack, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return _prefect(stack, *args, check=False, timeout=timeout)


def api(stack, method: str, path: str, **kwargs) -> object:
    response = httpx.request(method, f"{stack.api_url}{path}", timeout=30, **kwargs)
    response.raise_for_status()
    return response.json()


def run_deployment(stack, name: str, *params: str) -> dict:
    """`prefect deployment run NAME --watch`; return the flow run as the API reports it, with the
    log of it and its subflow runs."""
    result = prefect_cli(stack, "deployment", "run", name, *params, "--watch")
    assert "Created flow run" in result.stdout, result.stdout + result.stderr
    run_id = result.stdout.split("UUID:")[1].split()[0].strip()
    flow_run = api(stack, "GET", f"/flow_runs/{run_id}")
    subflows = api(stack, "POST", "/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}})
    ids = [run_id, *(run["id"] for run in subflows)]  # the dataset subflow logs its stages itself
    logs: list[dict] = []
    while len(logs) % 200 == 0:  # page by page, 200 a page
        page = api(stack, "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": ids}}, "sort": "TIMESTAMP_ASC",
                                                        "limit": 200, "offset": len(logs)})
        logs += page
        if not page:
            break
    flow_run["log_text"] = "\n".join(entry["message"] for entry in logs)
    return flow_run


@pytest.fixture(scope="module")
def demo_run(stack) -> dict:
    """`prefect deployment run fineweb-pretrain/demo --watch`, once for the module."""
    return run_deployment(stack[0], "fineweb-pretrain/demo")


def test_every_preset_is_deployed_on_the_process_pool(stack):
    stack, _ = stack
    deployments = api(stack, "POST", "/deployments/filter", json={})
    flows = {flow["id"]: flow["name"] for flow in api(stack, "POST", "/flows/filter", json={})}
    assert {f"{flows[d['flow_id']]}/{d['name']}" for d in deployments} == {
        "fineweb-pretrain/demo", "fineweb-pretrain/fineweb-40m", "fineweb-pretrain/gpt2-124m",
        "fineweb-pretrain/continue-to-20k", "fineweb-evaluate/fineweb-40m", "fineweb-evaluate/demo"}
    names = {d["name"]: d for d in deployments if flows[d["flow_id"]] == "fineweb-pretrain"}
    assert all(d["work_pool_name"] == WORK_POOL for d in names.values())
    continuation = names["continue-to-20k"]
    assert continuation["parameters"]["overrides"] == {"train": {"max_iters": 20000}}
    schedules = continuation["schedules"]
    assert len(schedules) == 1 and schedules[0]["active"] is False


@pytest.mark.parametrize(("parameter", "field"), [
    ("until=nowhere", "until"),
    ('overrides={"train": {"max_iters": 0}}', "max_iters"),
    ('overrides={"model": {"n_layers": 4}}', "n_layers"),
])
def test_bad_parameter_is_rejected_by_prefect_naming_the_field(stack, parameter, field):
    stack, _ = stack
    result = prefect_cli(stack, "deployment", "run", "fineweb-pretrain/demo", "--param", parameter)
    assert result.returncode != 0 and "Created flow run" not in result.stdout
    assert field in (result.stdout + result.stderr)


def test_deployment_run_then_continuation_resumes_from_the_last_checkpoint(stack, demo_run):
    stack, root = stack
    first = demo_run
    assert first["state"]["type"] == "COMPLETED", first["log_text"][-3000:]
    assert first["name"] == "demo/demo"
    checkpoints = sorted((root / "runs" / "demo" / "checkpoints").glob("step_*"))
    assert checkpoints[-1].name == "step_000120"

    continued = run_deployment(stack, "fineweb-pretrain/demo", "--param", 'overrides={"train": {"max_iters": 160}}',
                               "--param", "continue_run=true")
    assert continued["state"]["type"] == "COMPLETED", continued["log_text"][-3000:]
    log = continued["log_text"]
    for stage in ("download", "profile", "tokenize"):
        assert f"{stage}: cache hit" in log
    assert "resumed from iteration 120" in log
    state = json.loads((root / "runs" / "demo" / "checkpoints" / "step_000160" / "state.json").read_text())
    assert state["iteration"] == 160
    metrics = [json.loads(line) for line in (root / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()]
    train_iters = [m["iter"] for m in metrics if m["event"] == "train"]
    assert train_iters == sorted(train_iters), "the continuation restarted instead of resuming"

    again = run_deployment(stack, "fineweb-pretrain/demo", "--param", 'overrides={"train": {"max_iters": 160}}',
                           "--param", "continue_run=true")
    assert again["state"]["type"] == "COMPLETED"
    assert "already at iteration 160" in again["log_text"]


def test_the_evaluate_deployment_scores_a_kept_checkpoint_without_training(stack, demo_run):
    stack, root = stack
    checkpoints = root / "runs" / "demo" / "checkpoints"
    before = sorted(path.name for path in checkpoints.iterdir())
    scored = run_deployment(stack, "fineweb-evaluate/demo", "--param", "checkpoint=best")
    assert scored["state"]["type"] == "COMPLETED", scored["log_text"][-3000:]
    assert sorted(path.name for path in checkpoints.iterdir()) == before  # nothing trained, nothing pruned
    evaluations = [json.loads((folder / "eval.json").read_text()) for folder in (root / "evaluate").iterdir()
                   if (folder / "eval.json").is_file()]
    assert evaluations and all(e["val_loss"] > 0 for e in evaluations)
    keys = {a["key"] for a in api(stack, "POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [scored["id"]]}}})}
    assert {"demo-checkpoint-scores", "demo-progress", "demo-samples-gallery"} <= keys


def test_rehearsal_of_the_seed_run_from_the_hub_then_its_continuation(stack, loopback_hub, hellaswag_file):
    """`fineweb-pretrain/fineweb-40m` as a user runs it, with only the iterations, the micro-batch, the
    accumulation and the eval sizes shrunk: the 12 × 12 × 384 model at block 1024 trains on its hf://
    source, then `continue-to-20k` (its target shrunk the same way) resumes it. HellaSwag comes from a
    local file, as it does offline."""
    stack, root = stack
    shrunk = {"train": {"max_iters": 2, "batch_size": 1, "grad_accum_steps": 1, "eval_iters": 1, "hellaswag_items": 4},
              "eval": {"max_batches": 1, "batch_size": 1, "hellaswag_path": str(hellaswag_file), "hellaswag_max_items": 4}}
    loopback_hub.clear_log()
    first = run_deployment(stack, "fineweb-pretrain/fineweb-40m", "--param", f"overrides={json.dumps(shrunk)}")
    assert first["state"]["type"] == "COMPLETED", first["log_text"][-3000:]
    assert first["name"] == "fineweb-40m/fineweb-40m"
    assert loopback_hub.bytes_sent("/cdn-lfs/") > 0  # the parquet came from the Hub
    [download] = [p for p in (root / "download").iterdir() if (p / "manifest.json").exists()
                  and "hf://" in (p / "manifest.json").read_text()]
    files = json.loads((download / "manifest.json").read_text())["metrics"]["files"]
    assert [f["url"] for f in files] == ["hf://datasets/HuggingFaceFW/fineweb/data/CC-MAIN-2013-20/000_00000.parquet"]

    [card] = api(stack, "POST", "/artifacts/latest/filter", json={"artifacts": {"key": {"any_": ["fineweb-40m-model-card"]}}})
    assert "40.56M parameters" in card["data"] and "12 layers × 12 heads × n_embd 384, block 1024" in card["data"]
    assert "iter 2: HellaSwag acc_norm" in first["log_text"]  # scored during training, as the preset asks
    checkpoints = root / "runs" / "fineweb-40m" / "checkpoints"
    assert [p.name for p in sorted(checkpoints.glob("step_*"))] == ["step_000002"]
    model = json.loads((checkpoints / "step_000002" / "state.json").read_text())["config"]["model"]
    assert (model["n_layer"], model["n_head"], model["n_embd"], model["block_size"]) == (12, 12, 384, 1024)

    shrunk["train"]["max_iters"] = 3
    continued = run_deployment(stack, "fineweb-pretrain/continue-to-20k", "--param", f"overrides={json.dumps(shrunk)}")
    assert continued["state"]["type"] == "COMPLETED", continued["log_text"][-3000:]
    for stage in ("download", "profile", "tokenize"):
        assert f"{stage}: cache hit" in continued["log_text"]
    assert "resumed from iteration 2" in continued["log_text"]
    assert json.loads((checkpoints / "step_000003" / "state.json").read_text())["iteration"] == 3


@pytest.mark.browser
def test_ui_renders_profile_loss_curve_and_samples(stack, demo_run):
    """Headless Chromium opens the artifacts of the demo run and finds them rendered."""
    stack, _ = stack
    assert demo_run["state"]["type"] == "COMPLETED"
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it where apt-get is available)")
    from playwright.sync_api import sync_playwright

    TEST_OUTPUT.mkdir(exist_ok=True)
    expected = {"demo-data-profile": "Data profile", "demo-training-curves": "Training curves", "demo-samples": "Samples from"}
    images = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(f"{stack.ui_url}/artifacts/key/demo-training-curves")  # the history of one key across runs
        page.get_by_text("demo/demo").first.wait_for(timeout=30_000)
        page.screenshot(path=str(TEST_OUTPUT / "ui-training-curves-history.png"), full_page=True)
        for key, heading in expected.items():
            [latest] = api(stack, "POST", "/artifacts/latest/filter", json={"artifacts": {"key": {"any_": [key]}}})
            page.goto(f"{stack.ui_url}/artifacts/artifact/{latest['latest_id']}")
            page.get_by_text(heading).first.wait_for(timeout=30_000)
            page.wait_for_function("[...document.images].every(img => img.complete)")
            images[key] = page.evaluate("[...document.images].filter(img => img.naturalWidth > 0).length")
            page.screenshot(path=str(TEST_OUTPUT / f"ui-{key}.png"), full_page=True)
        browser.close()
    assert images["demo-training-curves"] >= 4  # loss, lr, ms/iter, MFU pictures decoded by the browser
    assert images["demo-data-profile"] >= 1  # the text-length histogram
