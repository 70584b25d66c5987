"""The OpenAI-compatible backend and the LLM judge, against real servers.

Fast tests use a small scripted `http.server` (429/5xx/garbage replies on demand); the slow ones
run `transformers serve` on 127.0.0.1 with the embedded SmolLM2, the same weights the local
backend loads, so greedy answers can be compared token for token.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf

from qa_lab import generation, judge, keys, metrics, models, prompts, run_scores, stages
from qa_lab.cache import ItemCache
from qa_lab.config import PROJECT_ROOT
from qa_lab.errors import QaLabError
from qa_lab.generation import GenParams, generate_cached
from qa_lab.jsonl import read_jsonl, write_jsonl
from qa_lab.local_engine import LocalGenerator
from qa_lab.openai_client import OpenAIGenerator, chat_request
from qa_lab.records import EvalRow, QAItem
from tests.conftest import MODELS_DIR, compose_cfg

QUESTIONS = ["What is a hash table?", "What is a deadlock?", "What does DNS do?"]
SYSTEM = "Answer the computer-science interview question correctly in one to three sentences."


# --------------------------------------------------------------------------- scripted server


def _reply(content: str, finish: str = "stop") -> dict:
    return {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
    }  # fmt: skip


class Scripted:
    """A local HTTP server whose replies come from `respond(body) -> (status, json, headers)`."""

    def __init__(self, respond: Callable[[dict], tuple[int, dict | str, dict]]) -> None:
        self.requests: list[tuple[dict, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((dict(self.headers), body))
                status, payload, headers = respond(body)
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def start(respond: Callable[[dict], tuple[int, dict | str, dict]]) -> Scripted:
        servers.append(Scripted(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _sequence(*replies: tuple[int, dict | str, dict]) -> Callable[[dict], tuple]:
    queue = list(replies)
    return lambda body: queue.pop(0) if len(queue) > 1 else queue[0]


def test_backs_off_on_429_and_5xx_then_answers(scripted, monkeypatch):
    server = scripted(
        _sequence(
            (429, {"error": "slow down"}, {"Retry-After": "0"}),
            (503, {"error": "overloaded"}, {}),
            (200, _reply("A table of buckets.\nQuestion: next?"), {}),
        )
    )
    monkeypatch.setenv("QA_LAB_TEST_KEY", "sk-test-123")
    params = GenParams(max_new_tokens=9, stop_strings=("\nQuestion:",))
    gen = OpenAIGenerator(
        server.url, "m", params, api_key_env="QA_LAB_TEST_KEY", retries=3, backoff_s=0.01
    )
    out = gen.complete([{"role": "user", "content": "hi"}])
    assert out["prediction"] == "A table of buckets."
    assert out["stop_reason"] == "stop_string"
    assert len(server.requests) == 3
    headers, body = server.requests[-1]
    assert headers["Authorization"] == "Bearer sk-test-123"
    assert body["temperature"] == 0.0 and body["max_tokens"] == 9
    assert body["stop"] == ["\nQuestion:"] and body["model"] == "m"


def test_client_errors_fail_at_once_and_exhausted_retries_are_one_line(scripted):
    params = GenParams(max_new_tokens=4)
    bad = scripted(_sequence((400, {"error": "bad model"}, {})))
    with pytest.raises(QaLabError, match="HTTP 400") as err:
        OpenAIGenerator(bad.url, "m", params, retries=3, backoff_s=0.01).complete([])
    assert len(bad.requests) == 1 and "\n" not in str(err.value)
    down = scripted(_sequence((500, {"error": "boom"}, {})))
    with pytest.raises(QaLabError, match="HTTP 500.*after 3 tries"):
        OpenAIGenerator(down.url, "m", params, retries=2, backoff_s=0.01).complete([])
    assert len(down.requests) == 3
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with pytest.raises(QaLabError, match="unreachable after 2 tries"):
        OpenAIGenerator(closed, "m", params, retries=1, backoff_s=0.01).complete([])


def test_missing_base_url_names_the_config_key():
    cfg = OmegaConf.create({"base_url": None})
    with pytest.raises(QaLabError, match="llm.base_url is required"):
        OpenAIGenerator.from_cfg(cfg, "llm", GenParams(max_new_tokens=4), "m")


def _refuses_system_turns(body: dict) -> tuple[int, dict, dict]:
    """Like vLLM serving Mistral-7B-Instruct-v0.2: its template raises on a system turn."""
    if any(m["role"] == "system" for m in body["messages"]):
        return 400, {"error": "Conversation roles must alternate user/assistant/..."}, {}
    return 200, _reply(body["messages"][0]["content"][:40]), {}


def test_system_turn_is_folded_when_the_server_refuses_it(scripted):
    server = scripted(_refuses_system_turns)
    chats = [_messages(q) for q in QUESTIONS]
    gen = OpenAIGenerator(server.url, "m", GenParams(max_new_tokens=4), concurrency=1)
    answers = gen.generate_batch([chat_request(m) for m in chats])
    assert [a["prediction"] for a in answers] == [SYSTEM[:40]] * 3  # the system text came first
    sent = [body["messages"] for _, body in server.requests]
    assert len(sent) == len(QUESTIONS) + 1  # one refusal, then every request folded up front
    assert sent[0] == chats[0] and sent[1:] == [prompts.fold_system(m) for m in chats]
    folded_first = scripted(_refuses_system_turns)
    fold = OpenAIGenerator(folded_first.url, "m", GenParams(max_new_tokens=4), system_turn="fold")
    fold.complete(chats[0])
    assert [body["messages"] for _, body in folded_first.requests] == [
        prompts.fold_system(chats[0])
    ]
    with pytest.raises(QaLabError, match="HTTP 400") as err:
        OpenAIGenerator(server.url, "m", GenParams(4), system_turn="keep").complete(chats[0])
    assert "\n" not in str(err.value)
    with pytest.raises(QaLabError, match="llm.system_turn='never'"):
        OpenAIGenerator.from_cfg(
            OmegaConf.create({"base_url": server.url, "system_turn": "never"}), "llm",
            GenParams(4), "m",
        )  # fmt: skip


def test_requests_stay_in_flight_while_one_answer_is_slow(scripted):
    """A sliding window: one slow answer does not hold back the requests after it."""

    def respond(body: dict) -> tuple[int, dict, dict]:
        if body["messages"][0]["content"] == "slow":
            time.sleep(1.5)
        return 200, _reply(body["messages"][0]["content"]), {}

    server = scripted(respond)
    texts = ["slow", *(f"fast {i}" for i in range(7))]
    gen = OpenAIGenerator(server.url, "m", GenParams(max_new_tokens=4), concurrency=2)
    started, seen = time.perf_counter(), []
    for group in gen.stream([chat_request([{"role": "user", "content": t}]) for t in texts]):
        seen += [(texts[i], time.perf_counter() - started) for i, _ in group]
    assert sorted(t for t, _ in seen) == sorted(texts)
    assert seen[-1][0] == "slow"  # every fast answer came back while the slow one ran
    assert all(at < 1.4 for text, at in seen if text != "slow"), seen


def test_vllm_hint_rounds_the_rank_up_and_names_the_quantization():
    assert [generation.vllm_lora_rank(r) for r in (1, 2, 8, 9, 16, 33, 300, 512)] == [
        1, 8, 8, 16, 16, 64, 320, 512,
    ]  # fmt: skip
    with pytest.raises(QaLabError, match="model.r=600"):
        generation.vllm_lora_rank(600)
    cfg = compose_cfg("evaluate", ["llm=mistral_7b_instruct", "model=lora", "model.r=12"])
    command = generation.vllm_command(cfg, "qa", Path("/adapters/abc"))
    assert "--max-lora-rank 16 " in command and "--quantization bitsandbytes" in command
    assert command.endswith("--lora-modules qa=/adapters/abc")
    plain = compose_cfg("evaluate", ["model=lora", "model.r=12"])
    assert "--quantization" not in generation.vllm_command(plain, "qa", Path("/a"))


def test_served_answers_are_not_filed_under_the_local_precision(store):
    cfg = compose_cfg(
        "evaluate",
        [*store, "llm=mistral_7b_instruct", "llm.backend=openai", "llm.base_url=http://x/v1"],
    )
    params = GenParams.from_cfg(cfg.generation, 0)
    key = generation.backend(cfg, params, None, keys.model_id(cfg.llm)).model_key
    assert (
        key == "openai:mistralai/Mistral-7B-Instruct-v0.2:served:mistralai/Mistral-7B-Instruct-v0.2"
    )
    cfg.llm.served_precision = "bf16"
    assert ":bf16:" in generation.backend(cfg, params, None, keys.model_id(cfg.llm)).model_key
    cfg.llm.system_turn = "fold"  # other messages than auto/keep: other answers
    assert generation.backend(cfg, params, None, "x").model_key.endswith(":fold")


def test_lora_on_the_openai_backend_refuses_to_train_here(store, tmp_path):
    cfg = compose_cfg(
        "evaluate",
        [*store, "model=lora", "llm.backend=openai", "llm.base_url=http://127.0.0.1:9/v1"],
    )
    with pytest.raises(QaLabError, match=r"train\.py.*model\.adapter=") as err:
        stages.evaluate(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "mlruns").exists()  # no work


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"verdict": "correct", "score": 5}', ("correct", 5)),
        ('Sure!\n```json\n{"Verdict": "Partially Correct", "score": "3"}\n```',
         ("partially_correct", 3)),
        ('{"verdict": "incorrect", "score": 1.0} because...', ("incorrect", 1)),
        ("verdict: partially_correct, score: 2", ("partially_correct", 2)),
        ('{"verdict": "correct", "score": 7}', None),
        ('{"verdict": "great", "score": 4}', None),
        ("The answer looks right to me.", None),
        ("", None),
    ],
)  # fmt: skip
def test_parse_verdict_is_tolerant_but_never_guesses(text, expected):
    parsed = judge.parse_verdict(text)
    assert (None if parsed is None else (parsed["verdict"], parsed["score"])) == expected


def _judge_server(scripted) -> Scripted:
    """alpha: garbage then a valid reply after the reminder; beta: garbage twice; gamma: fenced."""

    def respond(body: dict) -> tuple[int, dict, dict]:
        repair = body["messages"][-1]["content"] == prompts.JUDGE_REPAIR
        user = body["messages"][-3 if repair else -1]["content"]
        if "gamma" in user:
            text = 'Sure! ```json\n{"verdict": "Correct", "score": 5}\n```'
        elif "alpha" in user:
            text = '{"verdict": "partially correct", "score": "3"}' if repair else "Looks good."
        else:
            text = "no idea"
        return 200, _reply(text), {}

    return scripted(respond)


def test_judge_retries_once_counts_unparseable_and_caches(scripted, store):
    server = _judge_server(scripted)
    cfg = compose_cfg(
        "evaluate",
        [
            *store,
            "metrics=judge",
            "metrics.groups=[lexical,judge]",
            "metrics.judge.model=judge-m",
            f"metrics.judge.base_url={server.url}",
            "metrics.bootstrap.resamples=200",
        ],
    )
    rows = [
        {"item_id": f"i{n}", "question": "What is X?", "reference": "X is a thing.",
         "prediction": word, "topic": topic, "seed_id": f"i{n}"}
        for n, (word, topic) in enumerate(
            [("alpha", "os"), ("beta", "os"), ("gamma", "networks"), ("gamma too", "networks")]
        )
    ]  # fmt: skip
    result = _score_rows(cfg, rows)
    per_item = [r.scores for r in result.rows]
    assert [p["judge_partially_correct"] for p in per_item] == [1.0, 0.0, 0.0, 0.0]
    assert [p["judge_unparseable"] for p in per_item] == [0.0, 1.0, 0.0, 0.0]
    assert math.isnan(per_item[1]["judge_score"]) and per_item[2]["judge_score"] == 5.0
    assert len(server.requests) == 4 + 2  # two unparseable first replies, each retried once
    ci = result.ci
    assert ci["judge_correct"]["mean"] == 0.5 and ci["judge_unparseable"]["mean"] == 0.25
    assert ci["judge_score"]["n"] == 3 and ci["judge_score"]["mean"] == pytest.approx(13 / 3)
    assert ci["judge_score"]["low"] <= ci["judge_score"]["mean"] <= ci["judge_score"]["high"]
    assert result.topics["networks"]["judge_correct"] == 1.0
    assert result.corpus["judge_prompt_hash"] == judge.prompt_hash()
    assert "rougeL_f1" in ci  # combined with another group
    _score_rows(cfg, rows)
    assert len(server.requests) == 6  # every reply, retries included, came from the cache


def test_judge_repeats_ask_one_seed_each_and_average_the_verdicts(scripted, store):
    """Sampled verdicts: repeat r sends seed 42 + r; an item's judge columns are the mean."""

    def respond(body: dict) -> tuple[int, dict, dict]:
        verdict = "correct" if body["seed"] == 42 else "incorrect"  # repeat 0, then 1 and 2
        return (
            200,
            _reply(f'{{"verdict": "{verdict}", "score": {5 if body["seed"] == 42 else 2}}}'),
            {},
        )

    server = scripted(respond)
    judged = [
        *store,
        "metrics=judge",
        "metrics.groups=[judge]",
        "metrics.judge.model=judge-m",
        f"metrics.judge.base_url={server.url}",
        "metrics.judge.temperature=0.7",
        "metrics.bootstrap.resamples=200",
    ]
    rows = [
        {"item_id": f"i{n}", "question": "What is X?", "reference": "X is a thing.",
         "prediction": f"answer {n}", "seed_id": f"i{n}"}
        for n in range(2)
    ]  # fmt: skip
    result = _score_rows(compose_cfg("evaluate", [*judged, "metrics.judge.repeats=3"]), rows)
    assert sorted(body["seed"] for _, body in server.requests) == [42, 42, 43, 43, 44, 44]
    assert [r.scores["judge_correct"] for r in result.rows] == pytest.approx([1 / 3, 1 / 3])
    assert [r.scores["judge_score"] for r in result.rows] == pytest.approx([3.0, 3.0])
    assert result.corpus["judge_repeats"] == 3
    assert result.corpus["judge_repeat_sd"] == pytest.approx(math.sqrt(1 / 3))  # sd of 1, 0, 0
    one = _score_rows(compose_cfg("evaluate", judged), rows)
    assert len(server.requests) == 6  # one verdict is repeat 0: every reply from the cache
    assert [r.scores["judge_correct"] for r in one.rows] == [1.0, 1.0]
    with pytest.raises(QaLabError, match=r"metrics.judge.repeats=2 needs metrics.judge.temp"):
        judge.JudgeOptions.from_cfg(
            compose_cfg("evaluate", [*judged[:-2], "metrics.judge.repeats=2"]).metrics.judge
        )


def _score_rows(cfg, rows: list[dict]) -> run_scores.RunScores:
    opts = metrics.MetricsOptions.from_cfg(cfg.metrics)
    records = [EvalRow.from_dict(r) for r in rows]
    return run_scores.score_rows(
        records, opts, embedder=cfg.embedder.name, cache_dir=cfg.paths.cache
    )


def test_judge_group_without_judge_config_is_one_line_error(store):
    cfg = compose_cfg("evaluate", [*store, "metrics.groups=[judge]"])
    rows = [{"item_id": "a", "question": "q", "reference": "r", "prediction": "p"}]
    with pytest.raises(QaLabError, match="metrics.judge.model is missing"):
        _score_rows(cfg, rows)


# --------------------------------------------------------------------------- transformers serve


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_serve(folder: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`transformers serve` on loopback, offline, pinned to the materialised SmolLM2 folder."""
    port = _free_port()
    cli = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [str(cli), "serve", folder, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--device", "cpu"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"transformers serve did not come up: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def smol_folder() -> str:
    return models.resolve_llm_path("SmolLM2-135M-Instruct", MODELS_DIR)


@pytest.fixture(scope="session")
def served(smol_folder: str, tmp_path_factory) -> Iterator[str]:
    """Base URL of a `transformers serve` serving the embedded SmolLM2 (its name: the folder)."""
    proc, url = _start_serve(smol_folder, tmp_path_factory.mktemp("serve") / "serve.log")
    yield url
    _stop(proc)


def _messages(question: str) -> list[dict[str, str]]:
    return prompts.build_messages(question, [], system=SYSTEM, context_header="")


@pytest.mark.slow
def test_greedy_answers_match_the_local_backend(served, smol_folder, base_model, tokenizer):
    params = GenParams(max_new_tokens=12, stop_strings=("\nQuestion:", "\nQ:", "<|im_start|>"))
    remote = OpenAIGenerator(served, smol_folder, params, concurrency=3)
    local = LocalGenerator(base_model, tokenizer, params, batch_size=1)
    got = remote.generate_batch([chat_request(_messages(q)) for q in QUESTIONS])
    for question, answer in zip(QUESTIONS, got):
        want = local.generate_batch([prompts.render_prompt(tokenizer, _messages(question))])[0]
        assert answer["prediction"] == want["prediction"]
        assert answer["prompt_tokens"] == want["prompt_tokens"]
        assert answer["stop_reason"] == want["stop_reason"]


@pytest.fixture
def small_source(tmp_path: Path) -> Path:
    rows = read_jsonl(PROJECT_ROOT / "data" / "seed" / "cs_interview.jsonl")
    path = tmp_path / "small.jsonl"
    write_jsonl(path, [r for i, r in enumerate(rows) if i % 5 == 0][:40])
    return path


@pytest.mark.slow
def test_evaluate_and_judge_end_to_end(served, smol_folder, store, small_source, monkeypatch):
    monkeypatch.setenv("QA_LAB_TEST_KEY", "sk-never-logged-42")
    cfg = compose_cfg(
        "evaluate",
        [
            *store,
            f"dataset.source={small_source}",
            "dataset.synthesis.backend=none",
            "eval.limit=2",
            "eval.train_sample=0",
            "generation.max_new_tokens=16",
            "llm.backend=openai",
            f"llm.base_url={served}",
            f"llm.served_model={smol_folder}",
            "llm.api_key_env=QA_LAB_TEST_KEY",
            "metrics=judge",
            "metrics.groups=[lexical,diagnostics,judge]",
            f"metrics.judge.model={smol_folder}",
            f"metrics.judge.base_url={served}",
            "metrics.judge.max_tokens=20",
            "metrics.bootstrap.resamples=200",
        ],
    )
    run_id = stages.evaluate(cfg)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    run = mlflow.get_run(run_id)
    metrics, params = run.data.metrics, run.data.params
    assert metrics["answers_generated"] == 2
    rates = sum(metrics[f"judge_{v}"] for v in (*judge.VERDICTS, "unparseable"))
    assert rates == pytest.approx(1.0)  # every item is counted exactly once
    assert "judge_correct_ci_high" in metrics
    # a 135M judge is weak but, with the worked example turn, replies in the JSON format
    assert metrics["judge_unparseable"] < 1.0 and 1.0 <= metrics["judge_score"] <= 5.0
    assert params["judge_prompt_hash"] == judge.prompt_hash()
    assert params["judge_model"] == smol_folder and params["judge_temperature"] == "0.0"
    assert params["llm.api_key_env"] == "QA_LAB_TEST_KEY"
    logged = json.dumps([params, run.data.tags])
    assert "sk-never-logged-42" not in logged
    assert run.data.tags["qa_lab.model_key"].startswith("openai:")
    again = mlflow.get_run(stages.evaluate(cfg)).data.metrics
    assert again["answers_generated"] == 0  # answers and verdicts both come from the cache


@pytest.mark.slow
def test_synthesis_runs_through_the_server(served, smol_folder, store):
    import functools

    from qa_lab import retrieval, synthesis
    from qa_lab.dataset import DatasetOptions

    seeds = [
        QAItem("s1", "What is a hash table?", "A map from keys to buckets.", topic="ds"),
        QAItem("s2", "What is a deadlock?", "Processes waiting on each other forever.", "os"),
    ]
    cfg = compose_cfg(
        "build_dataset",
        [
            *store,
            "dataset.synthesis.backend=openai",
            f"dataset.synthesis.base_url={served}",
            f"dataset.synthesis.model={smol_folder}",
            "dataset.synthesis.per_seed=2",
            "dataset.synthesis.max_new_tokens=24",
        ],
    )
    opts = DatasetOptions.from_cfg(cfg.dataset).synthesis
    embed = functools.partial(
        retrieval.embed, embedder=cfg.embedder.name, cache_dir=cfg.paths.cache
    )
    kept, rejects = synthesis.synthesize(
        opts, seeds, embed, cache_dir=cfg.paths.cache, models_dir=cfg.paths.models
    )
    assert len(kept) + sum(rejects.values()) == 4  # every candidate kept or counted
    assert all(it.source == "synthetic" and it.seed_id in {"s1", "s2"} for it in kept)
    assert len(ItemCache(Path(cfg.paths.cache) / "answers.sqlite")) == 4


@pytest.mark.slow
def test_server_stopped_mid_run_keeps_finished_answers(served, smol_folder, tmp_path):
    proc, url = _start_serve(smol_folder, tmp_path / "serve.log")
    params = GenParams(max_new_tokens=8)
    cache = ItemCache(tmp_path / "answers.sqlite")
    requests = [chat_request(_messages(q)) for q in QUESTIONS]
    ids = [f"q{i}" for i in range(len(QUESTIONS))]
    try:
        with pytest.raises(QaLabError, match="unreachable after 2 tries.*rerun to resume") as err:
            generate_cached(
                ids,
                requests,
                params,
                lambda: OpenAIGenerator(url, smol_folder, params, concurrency=1, retries=1,
                                        backoff_s=0.1),
                cache,
                "openai:smol",
                progress=False,
                on_batch=lambda n: _stop(proc),  # the server goes away after the first answer
            )  # fmt: skip
    finally:
        _stop(proc)
    assert "\n" not in str(err.value)
    assert len(cache) == 1
    resumed = generate_cached(
        ids,
        requests,
        params,
        lambda: OpenAIGenerator(served, smol_folder, params, concurrency=2),
        cache,
        "openai:smol",
        progress=False,
    )
    assert [p.extra["cached"] for p in resumed] == [True, False, False]
    assert len(cache) == 3 and all(p.prediction for p in resumed)
