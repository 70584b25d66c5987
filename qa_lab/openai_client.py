"""The OpenAI-compatible chat client: vLLM, SGLang, Ollama, `transformers serve`, a hosted API.

Standard library only (urllib and a thread pool), so it costs nothing to import.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from qa_lab import checks
from qa_lab.errors import QaLabError, require_choice
from qa_lab.generation import Generator, GenParams, cut_at_stop
from qa_lab.prompts import fold_system

SYSTEM_TURNS = ("auto", "keep", "fold")


@dataclass(frozen=True)
class ClientOptions:
    """How a client reaches an OpenAI-compatible server: `llm.*` or `metrics.judge.*`.

    The defaults here serve nodes that leave a key out (a hand-written judge node, tests);
    conf/llm_server/openai.yaml and conf/metrics/judge.yaml set and document every one.
    """

    base_url: str | None = None  # required only when a request must be sent
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var with the key, never the key
    timeout: float = 600.0  # s per request
    retries: int = 4  # on 429/5xx/connection errors
    concurrency: int = 4  # requests in flight
    backoff_s: float = 1.0  # first retry wait, doubling each try
    system_turn: str = "auto"

    @classmethod
    def from_cfg(cls, node: Any, prefix: str) -> ClientOptions:
        """Read and check the client keys of `node`, whose dotted path is `prefix`."""

        def get(name: str) -> Any:
            value = node.get(name)
            return getattr(cls, name) if value is None else value

        base_url = checks.text(node.get("base_url"), f"{prefix}.base_url", optional=True)
        if base_url and not base_url.startswith(("http://", "https://")):
            raise QaLabError(
                f"{prefix}.base_url={base_url!r} is not an http(s) URL, "
                "e.g. http://127.0.0.1:8000/v1"
            )
        return cls(
            base_url=base_url or None,
            api_key_env=str(node.get("api_key_env") or ""),
            timeout=checks.number(get("timeout"), f"{prefix}.timeout", low=0, above=True),
            retries=checks.whole(get("retries"), f"{prefix}.retries", low=0),
            concurrency=checks.whole(get("concurrency"), f"{prefix}.concurrency", low=1),
            backoff_s=checks.number(get("backoff_s"), f"{prefix}.backoff_s", low=0),
            system_turn=require_choice(f"{prefix}.system_turn", get("system_turn"), SYSTEM_TURNS),
        )


def chat_request(messages: list[dict[str, str]], seed: int | None = None) -> str:
    """The cached "prompt" of the openai backend: the chat messages (and a per-sample seed).

    The server applies the model's chat template itself, so the exact request body is what
    identifies an answer. `seed` tells apart repeated samples of one prompt (synthesis).
    """
    body: dict[str, Any] = {"messages": messages}
    if seed is not None:
        body["seed"] = seed
    return json.dumps(body, ensure_ascii=False, sort_keys=True)


class OpenAIGenerator(Generator):
    """Any OpenAI-compatible chat endpoint.

    The API key is read from the environment variable named in config, never from config.
    Greedy decoding is `temperature=0`, which vLLM and `transformers serve` treat as argmax.

    `system_turn` handles chat templates that refuse a system turn (Mistral-7B-Instruct-v0.2's:
    vLLM then answers HTTP 400 to every request). `fold` always puts the system text on top of
    the first user turn, as the local backend does for such templates (`prompts.fit_template`);
    `auto` sends it as is and, on the first 400 to a request with a system turn, retries it
    folded and folds every later request if that one is answered; `keep` never folds.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        params: GenParams,
        *,
        api_key_env: str = ClientOptions.api_key_env,
        timeout: float = ClientOptions.timeout,
        retries: int = ClientOptions.retries,
        concurrency: int = ClientOptions.concurrency,
        backoff_s: float = ClientOptions.backoff_s,
        system_turn: str = ClientOptions.system_turn,
        config_key: str = "base_url",
    ) -> None:
        prefix = config_key.rpartition(".")[0]
        if not base_url:
            raise QaLabError(
                f"{config_key} is required for the openai backend (e.g. http://127.0.0.1:8000/v1)"
            )
        if system_turn not in SYSTEM_TURNS:
            raise QaLabError(
                f"{prefix + '.' if prefix else ''}system_turn={system_turn!r}: "
                f"expected one of {', '.join(SYSTEM_TURNS)}"
            )
        self.url = str(base_url).rstrip("/") + "/chat/completions"
        self.model, self.params = model, params
        self.timeout, self.retries, self.backoff_s = float(timeout), int(retries), backoff_s
        self.api_key = os.environ.get(api_key_env or "", "")
        self.concurrency = max(1, int(concurrency))
        self.system_turn = system_turn
        self._fold = system_turn == "fold"
        self._fold_lock = threading.Lock()

    @classmethod
    def from_cfg(cls, node: Any, prefix: str, params: GenParams, model: str) -> OpenAIGenerator:
        """Build from a config node (`ClientOptions`: base_url, timeout, retries, ...).

        `prefix` is the node's dotted path, so a missing `base_url` error names the key to set.
        """
        opts = ClientOptions.from_cfg(node, prefix)
        return cls(
            opts.base_url or "",
            model,
            params,
            api_key_env=opts.api_key_env,
            timeout=opts.timeout,
            retries=opts.retries,
            concurrency=opts.concurrency,
            backoff_s=opts.backoff_s,
            system_turn=opts.system_turn,
            config_key=f"{prefix}.base_url",
        )

    def stream(self, prompts: Sequence[str]) -> Iterator[list[tuple[int, dict[str, Any]]]]:
        """Answer `chat_request` prompts with `concurrency` requests in flight at all times.

        A sliding window: as soon as one answer arrives it is yielded (and so committed to the
        cache) and the next request goes out, so one slow answer never idles the server. When a
        request fails for good no new one is sent; the answers still in flight are yielded
        before the error.
        """
        todo = iter(range(len(prompts)))
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            flying: dict[Future, int] = {}

            def submit(n: int) -> None:
                for i in [i for _, i in zip(range(n), todo)]:
                    flying[pool.submit(self.complete, **json.loads(prompts[i]))] = i

            submit(self.concurrency)
            error: BaseException | None = None
            while flying:
                done, _ = wait(flying, return_when=FIRST_COMPLETED)
                group = []
                for future in done:
                    i = flying.pop(future)
                    if future.exception() is None:
                        group.append((i, future.result()))
                    else:
                        error = error or future.exception()
                if group:
                    yield group
                if error is None:
                    submit(len(done))
            if error is not None:
                raise error

    def complete(self, messages: list[dict[str, str]], seed: int | None = None) -> dict[str, Any]:
        """One chat completion, retried with exponential backoff on 429/5xx/connection errors."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": fold_system(messages) if self._fold else messages,
            "max_tokens": self.params.max_new_tokens,
            "temperature": self.params.temperature if self.params.do_sample else 0.0,
            "seed": self.params.seed if seed is None else seed,
        }
        if self.params.stop_strings:
            body["stop"] = list(self.params.stop_strings)[:4]  # the API allows at most 4
        started = time.perf_counter()
        reply = self._post_folding(body)
        try:
            choice = reply["choices"][0]
            content = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise QaLabError(
                f"{self.url}: unexpected reply (no choices[0].message): {str(reply)[:200]}"
            ) from None
        text, stopped = cut_at_stop(content, self.params.stop_strings)
        # vLLM names the stop string that ended the answer; other servers just say "stop".
        stopped = stopped or choice.get("stop_reason") in self.params.stop_strings
        usage = reply.get("usage") or {}
        reason = "eos"
        if choice.get("finish_reason") == "length":
            reason = "length"
        elif stopped:
            reason = "stop_string"
        return {
            "prediction": text.strip(),
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "generated_tokens": int(usage.get("completion_tokens") or 0),
            "stop_reason": reason,
            "seconds": time.perf_counter() - started,
        }

    def _post_folding(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST; under `auto`, a 400 to a system turn is retried once with the turn folded."""
        try:
            return self._post(body)
        except _ClientError:
            folded = fold_system(body["messages"])
            if self.system_turn != "auto" or folded is body["messages"]:
                raise
            try:
                reply = self._post({**body, "messages": folded})
            except _ClientError:
                raise QaLabError(f"{self.url}: HTTP 400, with and without a system turn") from None
            with self._fold_lock:
                if not self._fold:
                    print(
                        f"{self.url}: the server refused a system turn (HTTP 400); folding it "
                        "into the first user turn from now on (llm.system_turn=fold says so)",
                        flush=True,
                    )
                self._fold = True
            return reply

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries: 429 and 5xx and connection errors back off, other codes fail."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        for attempt in range(self.retries + 1):
            wait_s = self.backoff_s * 2**attempt
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    raw = resp.read().decode("utf-8")
                try:
                    return json.loads(raw)
                except json.JSONDecodeError:
                    raise QaLabError(f"{self.url}: reply is not JSON: {raw[:200]!r}") from None
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:200]
                if (err.code != 429 and err.code < 500) or attempt == self.retries:
                    error = _ClientError if err.code == 400 else QaLabError
                    raise error(
                        f"{self.url}: HTTP {err.code} {err.reason} {detail}"
                        f" (model {self.model!r}, after {attempt + 1} tries)"
                    ) from None
                wait_s = max(wait_s, _retry_after(err.headers.get("Retry-After")))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                if attempt == self.retries:
                    reason = getattr(err, "reason", err)
                    raise QaLabError(
                        f"{self.url}: unreachable after {attempt + 1} tries ({reason});"
                        " finished answers are cached, rerun to resume"
                    ) from None
            time.sleep(min(wait_s, 60.0))
        raise AssertionError("unreachable")  # the loop returns or raises


class _ClientError(QaLabError):
    """HTTP 400 (bad request): what a chat template that refuses a system turn answers."""


def _retry_after(value: str | None) -> float:
    """Seconds asked for by a Retry-After header (0 when absent or not a number)."""
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0
