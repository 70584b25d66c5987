"""Batched generation behind a per-item answer cache.

Each answer is cached under a key over (model, exact prompt text, generation params), committed
per batch: an interrupted run resumes where it stopped, a rerun generates nothing, and two
models can never share an answer (the model is part of the key). Batch size is not in the key:
greedy answers do not depend on it beyond float noise.
"""

from __future__ import annotations

import functools
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from qa_lab.cache import ItemCache, stable_hash
from qa_lab.errors import QaLabError
from qa_lab.records import Prediction

GENERATION_VERSION = 1


@dataclass(frozen=True)
class GenParams:
    """The generation settings that change an answer (and so its cache key)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    stop_strings: tuple[str, ...] = ()
    seed: int = 42

    @classmethod
    def from_cfg(cls, gen_cfg: Any, seed: int) -> GenParams:
        """Build from the `generation` config group, validating the numbers."""
        if int(gen_cfg.max_new_tokens) <= 0:
            raise QaLabError(f"generation.max_new_tokens={gen_cfg.max_new_tokens} must be > 0")
        return cls(
            max_new_tokens=int(gen_cfg.max_new_tokens),
            do_sample=bool(gen_cfg.do_sample),
            temperature=float(gen_cfg.temperature),
            stop_strings=tuple(gen_cfg.stop_strings or ()),
            seed=int(seed),
        )

    def key_fields(self) -> dict[str, Any]:
        """Fields hashed into request keys (temperature only matters when sampling)."""
        fields = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "stop_strings": list(self.stop_strings),
        }
        if self.do_sample:
            fields.update(temperature=self.temperature, seed=self.seed)
        return fields


def request_key(model_key: str, prompt: str, params: GenParams, salt: str = "") -> str:
    """Cache key of one answer; `salt` tells apart repeated samples of the same prompt."""
    return stable_hash(
        {
            "model": model_key,
            "prompt": prompt,
            "gen": params.key_fields(),
            "salt": salt or None,
            "v": GENERATION_VERSION,
        }
    )


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """Cut the text at the earliest stop string; True when one was found."""
    positions = [text.find(s) for s in stop_strings if s and s in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


class LocalGenerator:
    """Batched generation with a transformers model (left padding, length-sorted batches)."""

    def __init__(self, model: Any, tokenizer: Any, params: GenParams, batch_size: int) -> None:
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.batch_size = max(1, int(batch_size))
        # The end-of-turn token ends an answer; the tokenizer's EOS may be another token.
        eos = {tokenizer.eos_token_id}
        end_turn = (
            tokenizer.convert_tokens_to_ids("<|im_end|>")
            if "<|im_end|>" in (tokenizer.get_vocab())
            else None
        )
        if end_turn is not None:
            eos.add(end_turn)
        self.eos_ids = sorted(i for i in eos if i is not None)
        # Tokens decoded to look for a stop string: every token is at least one character.
        self._stop_window = max((len(s) for s in params.stop_strings), default=0) + 1

    def batches(self, prompts: Sequence[str]) -> list[list[int]]:
        """Index batches of prompts sorted by token length, so padding stays small."""
        lengths = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def generate_batch(self, prompts: Sequence[str]) -> list[dict[str, Any]]:
        """Answer one batch; the answer is exactly the newly generated tokens."""
        import torch

        started = time.perf_counter()
        rows = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            new_tokens = self._sample(rows) if self.params.do_sample else self._greedy(rows)
        seconds = (time.perf_counter() - started) / len(prompts)
        return [self._finish(tokens, len(row), seconds) for tokens, row in zip(new_tokens, rows)]

    def _sample(self, rows: list[list[int]]) -> list[list[int]]:
        """Sampled answers through `generate` (its samplers honour the model's top-k/top-p)."""
        import torch

        enc = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(self.model.device)
        torch.manual_seed(self.params.seed)
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.params.max_new_tokens,
            "do_sample": True,
            "temperature": self.params.temperature,
            "eos_token_id": self.eos_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if self.params.stop_strings:
            kwargs.update(stop_strings=list(self.params.stop_strings), tokenizer=self.tokenizer)
        out = self.model.generate(**enc, **kwargs)
        return out[:, enc["input_ids"].shape[1] :].tolist()

    def _greedy(self, rows: list[list[int]]) -> list[list[int]]:
        """Greedy decoding that drops each sequence from the batch as soon as it is finished.

        `generate` keeps decoding padding for finished rows until the longest answer ends; with
        answers of 10 to 100 tokens that is most of the work. Here a row that emits an
        end-of-turn token or completes a stop string leaves the batch and the KV cache, so each
        step costs only the live rows. Argmax over the same logits: the same answers as
        `generate(do_sample=False)` (tested), up to float noise of the batch shape.
        """
        import torch

        model, eos = self.model, torch.tensor(self.eos_ids, device=self.model.device)
        cache, logits, attention_mask, last_pos = self._prefill(rows)
        out: list[list[int]] = [[] for _ in rows]
        live = list(range(len(rows)))  # batch row -> prompt index
        for step in range(self.params.max_new_tokens):
            tokens = logits.argmax(dim=-1)
            done = torch.isin(tokens, eos).tolist()
            for row, (index, token) in enumerate(zip(live, tokens.tolist())):
                out[index].append(token)
                done[row] = done[row] or self._hit_stop_string(out[index])
            if step + 1 == self.params.max_new_tokens or all(done):
                break
            if any(done):
                keep = torch.tensor([r for r, d in enumerate(done) if not d])
                cache.batch_select_indices(keep)
                tokens, last_pos = tokens[keep], last_pos[keep]
                attention_mask = attention_mask[keep]
                live = [live[r] for r in keep.tolist()]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], 1)
            last_pos = last_pos + 1
            logits = model(
                input_ids=tokens[:, None],
                attention_mask=attention_mask,
                position_ids=last_pos,
                cache=cache,
                use_cache=True,
            ).logits[:, -1]
        return out

    def _prefill(self, rows: list[list[int]]) -> tuple[Any, Any, Any, Any]:
        """Run the prompts, computing the batch's shared token prefix once.

        Every prompt of a study starts with the same chat header and system prompt (24 of ~40
        tokens on the embedded model), so the prefill spends most of its time on identical
        tokens. The shared prefix runs once, its KV cache is repeated for every row, and only
        the rest of each prompt runs batched, left-padded after the prefix (`[prefix | pad |
        rest]`, padding masked out, positions counted over real tokens, so each row sees the
        same tokens at the same positions as on its own). Returns the cache, the last
        position's logits, the attention mask and each row's last position.
        """
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        model, device = self.model, self.model.device
        cache = DynamicCache(config=model.config)
        room = max(len(row) for row in rows) + self.params.max_new_tokens
        cache.layers = [
            _preallocated_layer_class()(room) if type(layer) is DynamicLayer else layer
            for layer in cache.layers
        ]
        shared = _shared_prefix(rows) if len(rows) > 1 else 0
        if shared:
            model(
                input_ids=torch.tensor([rows[0][:shared]], device=device),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache.batch_repeat_interleave(len(rows))
        rests = self.tokenizer.pad(  # left-padded: the tokenizer's padding side (models.py)
            {"input_ids": [row[shared:] for row in rows]}, return_tensors="pt"
        ).to(device)
        mask = rests["attention_mask"]
        mask = torch.cat([mask.new_ones(len(rows), shared), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        logits = model(
            input_ids=rests["input_ids"],
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        return cache, logits, mask, positions[:, -1:]

    def _hit_stop_string(self, tokens: list[int]) -> bool:
        """Whether the answer so far ends in a stop string (only its tail is decoded)."""
        if not self.params.stop_strings:
            return False
        tail = self.tokenizer.decode(tokens[-self._stop_window :], skip_special_tokens=False)
        return any(s in tail for s in self.params.stop_strings)

    def _finish(self, tokens: list[int], prompt_len: int, seconds: float) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id
        generated: list[int] = []
        reason = "length"
        for tok in tokens:
            if tok in self.eos_ids:
                reason = "eos"
                break
            generated.append(tok)
        if reason == "length" and pad not in self.eos_ids:
            while generated and generated[-1] == pad and len(generated) < len(tokens):
                generated.pop()
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, self.params.stop_strings)
        if stopped:
            reason = "stop_string"
        gen_count = len(generated) + (1 if reason == "eos" else 0)
        return {
            "prediction": text.strip(),
            "prompt_tokens": prompt_len,
            "generated_tokens": gen_count,
            "stop_reason": reason,
            "seconds": seconds,
        }


@functools.cache
def _preallocated_layer_class() -> type:
    """A `DynamicLayer` that writes into a buffer sized for the whole answer up front.

    `DynamicLayer.update` concatenates the new key/value onto the whole cache every step:
    a copy of the KV cache per layer per token, ~10% of a CPU decode step at batch 64. Here
    each step writes one slot of a buffer allocated once for prompt + `max_new_tokens` and
    hands attention a view of the filled part; dropping finished rows copies only when rows
    leave. Built once, on first use, so that importing qa-lab does not import transformers.
    """
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, room: int) -> None:
            super().__init__()
            self.room, self.filled = room, 0

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:
                self.device, self.is_initialized = key_states.device, True
                shape = (*key_states.shape[:2], self.room, key_states.shape[-1])
                self.key_buf = key_states.new_empty(shape)
                self.value_buf = value_states.new_empty(shape)
            end = self.filled + key_states.shape[-2]  # room: the longest prompt + max new
            self.key_buf[:, :, self.filled : end] = key_states
            self.value_buf[:, :, self.filled : end] = value_states
            self.filled = end
            self.keys, self.values = self.key_buf[:, :, :end], self.value_buf[:, :, :end]
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._rebatch(lambda t: t.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: Any) -> None:
            self._rebatch(lambda t: t[indices])

        def _rebatch(self, pick: Any) -> None:
            if self.is_initialized:
                self.key_buf, self.value_buf = pick(self.key_buf), pick(self.value_buf)
                self.keys = self.key_buf[:, :, : self.filled]
                self.values = self.value_buf[:, :, : self.filled]

    return PreallocatedLayer


def _shared_prefix(rows: list[list[int]]) -> int:
    """How many leading tokens every row shares (each row keeps at least one of its own)."""
    limit = max(min(len(row) for row in rows) - 1, 0)
    first = rows[0]
    for n in range(limit):
        if any(row[n] != first[n] for row in rows):
            return n
    return limit


class PartialBatchError(QaLabError):
    """A batch that failed part-way; `done` maps batch positions to the answers that finished.

    `generate_cached` stores those before re-raising, so no finished answer is lost.
    """

    def __init__(self, message: str, done: dict[int, dict[str, Any]]) -> None:
        super().__init__(message)
        self.done = done


def chat_request(messages: list[dict[str, str]], seed: int | None = None) -> str:
    """The cached "prompt" of the openai backend: the chat messages (and a per-sample seed).

    The server applies the model's chat template itself, so the exact request body is what
    identifies an answer. `seed` tells apart repeated samples of one prompt (synthesis).
    """
    body: dict[str, Any] = {"messages": messages}
    if seed is not None:
        body["seed"] = seed
    return json.dumps(body, ensure_ascii=False, sort_keys=True)


class OpenAIGenerator:
    """Any OpenAI-compatible chat endpoint (vLLM, SGLang, Ollama, `transformers serve`, an API).

    The API key is read from the environment variable named in config, never from config.
    Greedy decoding is `temperature=0`, which vLLM and `transformers serve` treat as argmax.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        params: GenParams,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 600.0,
        retries: int = 4,
        concurrency: int = 4,
        backoff_s: float = 1.0,
        config_key: str = "base_url",
    ) -> None:
        if not base_url:
            raise QaLabError(
                f"{config_key} is required for the openai backend (e.g. http://127.0.0.1:8000/v1)"
            )
        self.url = str(base_url).rstrip("/") + "/chat/completions"
        self.model, self.params = model, params
        self.timeout, self.retries, self.backoff_s = float(timeout), int(retries), backoff_s
        self.api_key = os.environ.get(api_key_env or "", "")
        self.concurrency = max(1, int(concurrency))

    @classmethod
    def from_cfg(cls, node: Any, prefix: str, params: GenParams, model: str) -> OpenAIGenerator:
        """Build from a config node (base_url, api_key_env, timeout, retries, concurrency...).

        `prefix` is the node's dotted path, so a missing `base_url` error names the key to set.
        """
        return cls(
            node.get("base_url"),
            model,
            params,
            api_key_env=node.get("api_key_env") or "",
            timeout=float(node.get("timeout") or 600),
            retries=int(node.get("retries") if node.get("retries") is not None else 4),
            concurrency=int(node.get("concurrency") or 4),
            backoff_s=float(node.get("backoff_s") or 1.0),
            config_key=f"{prefix}.base_url",
        )

    def batches(self, prompts: Sequence[str]) -> list[list[int]]:
        """Requests go out `concurrency` at a time; each batch is committed to the cache."""
        step = self.concurrency
        return [list(range(i, min(i + step, len(prompts)))) for i in range(0, len(prompts), step)]

    def generate_batch(self, prompts: Sequence[str]) -> list[dict[str, Any]]:
        """Answer `chat_request` prompts concurrently; a failure keeps the finished answers."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(self.complete, **json.loads(p)) for p in prompts]
        done: dict[int, dict[str, Any]] = {}
        errors: list[BaseException] = []
        for i, future in enumerate(futures):
            err = future.exception()
            if err is None:
                done[i] = future.result()
            else:
                errors.append(err)
        if errors:
            if not isinstance(errors[0], QaLabError):
                raise errors[0]
            raise PartialBatchError(str(errors[0]), done)
        return [done[i] for i in range(len(prompts))]

    def complete(self, messages: list[dict[str, str]], seed: int | None = None) -> dict[str, Any]:
        """One chat completion, retried with exponential backoff on 429/5xx/connection errors."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.params.max_new_tokens,
            "temperature": self.params.temperature if self.params.do_sample else 0.0,
            "seed": self.params.seed if seed is None else seed,
        }
        if self.params.stop_strings:
            body["stop"] = list(self.params.stop_strings)[:4]  # the API allows at most 4
        started = time.perf_counter()
        reply = self._post(body)
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

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries: 429 and 5xx and connection errors back off, other codes fail."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        for attempt in range(self.retries + 1):
            wait = self.backoff_s * 2**attempt
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
                    raise QaLabError(
                        f"{self.url}: HTTP {err.code} {err.reason} {detail}"
                        f" (model {self.model!r}, after {attempt + 1} tries)"
                    ) from None
                wait = max(wait, _retry_after(err.headers.get("Retry-After")))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                if attempt == self.retries:
                    reason = getattr(err, "reason", err)
                    raise QaLabError(
                        f"{self.url}: unreachable after {attempt + 1} tries ({reason});"
                        " finished answers are cached, rerun to resume"
                    ) from None
            time.sleep(min(wait, 60.0))
        raise AssertionError("unreachable")  # the loop returns or raises


def _retry_after(value: str | None) -> float:
    """Seconds asked for by a Retry-After header (0 when absent or not a number)."""
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def generate_cached(
    item_ids: Sequence[str],
    prompts: Sequence[str],
    params: GenParams,
    make_generator: Callable[[], LocalGenerator | OpenAIGenerator],
    cache: ItemCache,
    model_key: str,
    *,
    salts: Sequence[str] | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> list[Prediction]:
    """Answer every prompt, generating only those whose answer is not cached yet.

    The generator is built only when something is missing, so a warm rerun loads no model.
    """
    from tqdm.auto import tqdm

    salts = salts or [""] * len(prompts)
    keys = [request_key(model_key, p, params, s) for p, s in zip(prompts, salts)]
    found = cache.get_many(keys)
    todo = [i for i, k in enumerate(keys) if k not in found]
    if todo:
        generator = make_generator()
        bar = tqdm(total=len(todo), unit="answer", desc="generate", disable=not progress)
        for batch in generator.batches([prompts[i] for i in todo]):
            idx = [todo[j] for j in batch]
            try:
                answers = generator.generate_batch([prompts[i] for i in idx])
            except PartialBatchError as err:
                cache.put_many({keys[idx[j]]: a for j, a in err.done.items()})
                raise
            fresh = {keys[i]: a for i, a in zip(idx, answers)}
            cache.put_many(fresh)
            found.update(fresh)
            bar.update(len(idx))
            if on_batch is not None:
                on_batch(len(idx))
        bar.close()
    return [
        Prediction(
            item_id=iid,
            **{
                k: found[key][k]
                for k in (
                    "prediction",
                    "prompt_tokens",
                    "generated_tokens",
                    "stop_reason",
                    "seconds",
                )
            },
            extra={"cached": i not in set(todo)},
        )
        for i, (iid, key) in enumerate(zip(item_ids, keys))
    ]
