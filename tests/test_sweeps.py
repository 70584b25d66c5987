"""The 2x2 sweep as a user runs it (a subprocess), under the basic and the joblib launchers,
and the result checked in the MLflow UI in a real headless browser."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Feedback
from playwright.sync_api import expect, sync_playwright

from qa_lab.config import PROJECT_ROOT
from tests.conftest import MODELS_DIR, TINY_RUN, write_small_source

pytestmark = pytest.mark.slow
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
VARIANTS = ("lora", "rag", "rag_lora", "vanilla")


def _sweep(tmp: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    source = tmp / "small.jsonl"
    if not source.exists():
        write_small_source(source)
    cmd = [
        sys.executable,
        "evaluate.py",
        "-m",
        "+experiment=rag_vs_ft",
        f"paths.cache={cache}",
        f"paths.models={MODELS_DIR}",
        f"paths.mlruns={tmp / 'mlruns'}",
        f"hydra.sweep.dir={tmp / 'multirun'}",
        f"dataset.source={source}",
        *TINY_RUN,
        "eval.train_sample=4",
        "metrics=lexical",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check_parent(store: Path, variants: tuple[str, ...] = VARIANTS) -> tuple[str, list]:
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    exp = mlflow.get_experiment_by_name("qa-lab")
    parents = mlflow.search_runs(
        [exp.experiment_id],
        filter_string="tags.`qa_lab.stage` = 'evaluate_sweep'",
        output_format="list",
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    children = mlflow.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
        output_format="list",
    )
    evals = [c for c in children if c.data.tags["qa_lab.stage"] == "evaluate"]
    assert sorted(c.data.tags["qa_lab.variant"] for c in evals) == sorted(variants)
    assert all("rougeL_f1_ci_low" in c.data.metrics for c in evals)
    report = mlflow.artifacts.load_text(f"runs:/{parent}/report/report.md")
    assert (
        "## Grid" in report and "2×2 decomposition" in report and "## Paired comparisons" in report
    )
    for section in ("Did fine-tuning learn?", "## Near-duplicate split", "## Leakage audit"):
        assert section in report, section
    html = mlflow.artifacts.load_text(f"runs:/{parent}/report/report.html")
    assert "data:image/png;base64," in html
    parent_metrics = mlflow.get_run(parent).data.metrics
    assert any(k.startswith("effect/rag/") for k in parent_metrics)
    assert any(k.startswith("compare/") for k in parent_metrics)
    return parent, children


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    proc = _sweep(tmp, tmp / "cache")
    return tmp, proc


def test_basic_launcher_groups_runs_and_reports(basic_sweep):
    tmp, proc = basic_sweep
    parent, children = _check_parent(tmp / "mlruns")
    stages = sorted(c.data.tags["qa_lab.stage"] for c in children)
    # the dataset and the adapter are built once, inside the sweep, and nested under it
    assert stages.count("train") == 1 and stages.count("dataset") == 1
    assert f"runs:/{parent}/report/report.html" in proc.stdout


def test_joblib_launcher_nests_jobs_and_pools_training_seed_replicates(basic_sweep, tmp_path):
    tmp, _ = basic_sweep
    _sweep(
        tmp_path,
        tmp / "cache",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "model.seeds=[42,7]",
    )
    variants = (*VARIANTS, "lora", "rag_lora")  # each LoRA cell once per seed
    parent, children = _check_parent(tmp_path / "mlruns", variants)
    # the shared cache held seed 42's adapter: only seed 7's is trained, once for both jobs
    # (the job that waited on the lock logs its own run of the same key, tagged reused)
    trained = [c for c in children if c.data.tags["qa_lab.stage"] == "train"]
    assert {c.data.tags["qa_lab.key"] for c in trained} == {trained[0].data.tags["qa_lab.key"]}
    assert sorted(c.data.tags["qa_lab.reused"] for c in trained)[0] == "false"
    assert [c.data.tags["qa_lab.reused"] for c in trained].count("false") == 1
    lora_runs = [
        c
        for c in children
        if c.data.tags["qa_lab.stage"] == "evaluate"
        and c.data.tags.get("qa_lab.variant") in ("lora", "rag_lora")
    ]
    assert sorted(c.data.tags["qa_lab.seed"] for c in lora_runs) == ["42", "42", "7", "7"]
    assert all(c.data.tags["qa_lab.replicates"] == "2" for c in lora_runs)
    assert all(f"seed{c.data.tags['qa_lab.seed']}" in c.info.run_name for c in lora_runs)
    report = mlflow.artifacts.load_text(f"runs:/{parent}/report/report.md")
    seeds = report.split("## Training seeds", 1)[1].split("\n## ", 1)[0]
    rows = [
        line
        for line in seeds.splitlines()
        if line.startswith("| lora") or line.startswith("| rag_lora")
    ]
    assert len(rows) == 2 and all("42: " in row and "7: " in row for row in rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_ui_shows_sweep_in_browser(basic_sweep):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian chromium is not installed: sudo apt-get install -y chromium")
    tmp, _ = basic_sweep
    store = tmp / "mlruns"
    parent, children = _check_parent(store)
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            f"sqlite:///{store}/mlflow.db",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        exp_id = mlflow.get_run(parent).info.experiment_id
        ARTIFACTS.mkdir(exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            # the runs table: the parent row expands to its four evaluate children
            page.goto(f"{url}/#/experiments/{exp_id}/runs", timeout=120_000)
            parent_name = mlflow.get_run(parent).info.run_name
            page.get_by_text(parent_name).first.wait_for(timeout=120_000)
            page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()
            evals = [c for c in children if c.data.tags["qa_lab.stage"] == "evaluate"]
            for c in evals:
                page.get_by_text(c.info.run_name).first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "mlflow_sweep_runs.png"), full_page=True)
            # each child run page shows its metrics
            for c in evals:
                page.goto(f"{url}/#/experiments/{exp_id}/runs/{c.info.run_id}", timeout=120_000)
                page.get_by_text("rougeL_f1_ci_low").first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "mlflow_child_run.png"), full_page=True)
            _check_adapter_model_page(page, url, exp_id, evals)
            # the parent's artifacts hold the report, and the report opens
            page.goto(f"{url}/#/experiments/{exp_id}/runs/{parent}/artifacts", timeout=120_000)
            page.get_by_text("report", exact=True).first.wait_for(timeout=60_000)
            page.get_by_text("report", exact=True).first.click()
            page.get_by_text("report.html").first.wait_for(timeout=60_000)
            # the server hands the artifact out as a download: fetch it through the browser's
            # context and render it, figures inline
            resp = page.request.get(f"{url}/get-artifact?path=report/report.html&run_uuid={parent}")
            assert resp.ok
            page.set_content(resp.text())
            page.wait_for_selector("text=qa-lab comparison report", timeout=60_000)
            assert page.locator("img").count() >= 2
            page.screenshot(path=str(ARTIFACTS / "mlflow_report.png"), full_page=True)
            _check_item_traces(page, url, exp_id, evals)
            browser.close()
    finally:
        server.terminate()
        server.wait(30)


def _check_adapter_model_page(page, url: str, exp_id: str, evals: list) -> None:
    """The adapter's logged-model page lists the LoRA evaluate runs linked to it."""
    models = mlflow.search_logged_models(
        experiment_ids=[exp_id], filter_string="name LIKE 'lora-%'", output_format="list"
    )
    assert len(models) == 1, [m.name for m in models]
    page.goto(f"{url}/#/experiments/{exp_id}/models/{models[0].model_id}", timeout=120_000)
    page.get_by_text(models[0].name).first.wait_for(timeout=60_000)
    for c in evals:
        if c.data.tags["qa_lab.variant"] in ("lora", "rag_lora"):
            page.get_by_text(c.info.run_name).first.wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "mlflow_adapter_model.png"), full_page=True)


def _item_traces(run) -> dict[str, object]:
    traces = mlflow.search_traces(
        locations=[run.info.experiment_id], run_id=run.info.run_id, return_type="list"
    )
    return {
        next(s for s in t.data.spans if s.parent_id is None).inputs["item_id"]: t for t in traces
    }


# Per-item scores that vary between configs. The UI shows the first few feedbacks by default,
# 0/1 flags (`copied`, `empty`, ...) equal in both runs on most items: a delta of 0 proves nothing.
SCORE_COLUMNS = ("rougeL_f1", "token_f1", "sentence_bleu")
COMPARE_PICKER = (
    'span:text-is("compare to") + div '
    '[data-component-id="mlflow.evaluations_review.table_ui.compare_to_run_button"]'
)


def _scores(traces: dict[str, object]) -> dict[str, dict[str, float]]:
    """Item id -> {feedback name: value}: what the UI's assessment columns show."""
    return {
        item: {a.name: a.value for a in t.info.assessments if isinstance(a, Feedback)}
        for item, t in traces.items()
    }


def _score_column(rag: dict, vanilla: dict) -> tuple[str, float]:
    """The score whose average differs most between the two runs, and that difference (rag minus
    vanilla), so the header's delta and the per-item arrows have something real to show."""
    deltas = {}
    for name in SCORE_COLUMNS:
        pairs = [
            (rag[i][name], vanilla[i][name]) for i in rag if name in rag[i] and name in vanilla[i]
        ]
        if len(pairs) == len(rag):  # the UI averages what is there; keep it comparable
            deltas[name] = sum(a - b for a, b in pairs) / len(pairs)
    assert deltas, "no score column has a value for every item in both runs"
    column = max(deltas, key=lambda n: abs(deltas[n]))
    assert abs(deltas[column]) >= 0.005, deltas  # shown with 2 decimals: must not round to 0
    return column, deltas[column]


def _compare_to(page, run) -> None:
    """Pick `run` in the "compare to" picker. Both pickers share one component id and the sweep's
    run names look alike, so: the button right after the "compare to" label, the listbox that
    this button controls, and the one option whose whole text is its colour swatch's hex code
    and the exact run name. The URL then names the run picked."""
    picker = page.locator(COMPARE_PICKER)
    picker.click()
    listbox = page.locator(f'[role="listbox"][id="{picker.get_attribute("aria-controls")}"]')
    swatch_and_name = re.compile(rf"^#[0-9a-fA-F]{{6}}\s*{re.escape(run.info.run_name)}$")
    option = listbox.get_by_role("option").filter(has_text=swatch_and_name)
    assert option.count() == 1, listbox.inner_text()
    option.click()
    expect(picker).to_have_text(swatch_and_name)
    assert f"compareToRunUuid={run.info.run_id}" in page.url, page.url


def _show_columns(page, wanted: set[str], names: set[str]) -> None:
    """Through the Columns selector, show the assessment columns in `wanted` and hide the rest
    of `names` (the selector's own state: checked options have aria-selected=true)."""
    button = page.get_by_test_id("column-selector-button")
    button.click()
    listbox = page.locator(f'[id="{button.get_attribute("aria-controls")}"]')
    for name in sorted(names):
        option = listbox.get_by_role("option").filter(has=page.get_by_text(name, exact=True))
        if option.count() == 0:  # a feedback the selector does not offer is not shown either
            continue
        if (option.get_attribute("aria-selected") == "true") != (name in wanted):
            option.click()
        expect(option).to_have_attribute("aria-selected", str(name in wanted).lower())
    page.keyboard.press("Escape")
    for name in wanted:
        expect(page.get_by_role("columnheader").get_by_title(name, exact=True)).to_be_visible()


def _arrow(cell) -> int:
    """The visible delta arrow of a paired score cell: +1 up (this run scores higher), -1 down,
    0 none (equal). The UI draws one arrow icon, rotated -45 or +45 degrees, the sign of the
    rotation matrix's sine is its direction."""
    sines = cell.evaluate(
        """el => [...el.querySelectorAll('[role="img"]')]
            .filter(i => getComputedStyle(i).visibility === 'visible')
            .map(i => new DOMMatrixReadOnly(getComputedStyle(i).transform).b)"""
    )
    assert len(sines) <= 1, sines
    return 0 if not sines else (1 if sines[0] < 0 else -1)


def _check_paired_rows(page, column: str, delta: float, traces: tuple, scores: tuple) -> None:
    """One table row per item holding both runs' traces of that item; in `column`, both scores
    (3 decimals) and an arrow with the sign of their difference; the header's average delta."""
    header_row = page.get_by_role("row").filter(has=page.get_by_title("Trace ID", exact=True))
    headers = [h.split("\n")[0] for h in header_row.get_by_role("columnheader").all_inner_texts()]
    index = headers.index(column)
    header = header_row.get_by_role("columnheader").nth(index)
    shown = [x for x in header.inner_text().split("\n") if re.fullmatch(r"[+-]\d+(\.\d+)?", x)]
    assert len(shown) == 1 and abs(float(shown[0]) - delta) <= 0.005 + 1e-9, (shown, delta)
    (rag_traces, vanilla_traces), (rag, vanilla) = traces, scores
    differs = 0
    for item in sorted(rag_traces):
        row = page.get_by_role("row").filter(has_text=f'"item_id": "{item}"')
        expect(row).to_have_count(1)
        for trace in (rag_traces[item], vanilla_traces[item]):
            expect(row.get_by_text(trace.info.trace_id, exact=True)).to_be_visible()
        cell = row.get_by_role("cell").nth(index)
        values = [float(v) for v in cell.inner_text().split()]
        a, b = rag[item][column], vanilla[item][column]
        assert len(values) == 2 and abs(values[0] - a) <= 5e-4 + 1e-9, (item, values, a, b)
        assert abs(values[1] - b) <= 5e-4 + 1e-9, (item, values, a, b)
        assert _arrow(cell) == (a > b) - (a < b), (item, a, b)
        differs += a != b
    assert differs >= 1


def _close_assistant(page) -> None:
    """Close the MLflow Assistant side panel, if open, so the screenshot shows more columns."""
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count():
        close.click()
        expect(close).to_have_count(0)


def _check_item_traces(page, url: str, exp_id: str, evals: list) -> None:
    """The rag run's Traces tab, compared to the vanilla run in the UI's picker, pairs the two
    runs' traces item by item with their score deltas; one item's trace shows the passages it
    was given."""
    by_variant = {c.data.tags["qa_lab.variant"]: c for c in evals}
    rag, vanilla = by_variant["rag"], by_variant["vanilla"]
    rag_traces, vanilla_traces = _item_traces(rag), _item_traces(vanilla)
    assert sorted(rag_traces) == sorted(vanilla_traces) and len(rag_traces) == 6
    rag_scores, vanilla_scores = _scores(rag_traces), _scores(vanilla_traces)
    column, delta = _score_column(rag_scores, vanilla_scores)
    item = sorted(rag_traces)[0]
    traces_tab = f"{url}/#/experiments/{exp_id}/runs/{rag.info.run_id}/traces"
    # the caller's page holds the report set as plain HTML, where going to another hash of the
    # same URL would not load the MLflow app again: leave the document first
    page.goto("about:blank")
    page.set_viewport_size({"width": 1900, "height": 1100})  # the paired table is wide
    page.goto(traces_tab, timeout=120_000)
    page.get_by_text(rag_traces[item].info.trace_id).first.wait_for(timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "mlflow_traces_run.png"))
    # compare to the vanilla run: rows pair up by item, the score columns show the deltas
    _compare_to(page, vanilla)
    page.get_by_text(vanilla_traces[item].info.trace_id).first.wait_for(timeout=60_000)
    names = {n for s in (*rag_scores.values(), *vanilla_scores.values()) for n in s}
    _show_columns(page, set(SCORE_COLUMNS), names)
    _check_paired_rows(
        page, column, delta, (rag_traces, vanilla_traces), (rag_scores, vanilla_scores)
    )
    _close_assistant(page)
    page.screenshot(path=str(ARTIFACTS / "mlflow_traces_compare.png"))
    # one item's trace: its retriever span lists the retrieved passages
    page.goto(traces_tab, timeout=120_000)
    page.reload()
    page.get_by_text(f'"item_id": "{item}"').first.click(timeout=120_000)
    page.get_by_text("retrieve", exact=True).first.click(timeout=60_000)
    retriever = next(s for s in rag_traces[item].data.spans if s.span_type == "RETRIEVER")
    for doc in retriever.outputs:
        page.get_by_text(f'"{doc["metadata"]["doc_uri"]}"').first.wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "mlflow_trace_retrieval.png"))
