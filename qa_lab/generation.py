"""Generation behind a per-item answer cache, and the two backends that answer prompts.

Each answer is cached under a key over (model, exact prompt text, generation params), committed
as soon as it is finished: an interrupted run resumes where it stopped, a rerun generates
nothing, and two models can never share an answer (the model is part of the key). Batch size is
not in the key: greedy answers do not depend on it beyond float noise.

The backends live in their own modules, imported only when an answer is missing:
`local_engine` (continuous batching in this process; imports torch) and `openai_client` (any
OpenAI-compatible server). `backend` builds either from the config, for `stages` to call once.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qa_lab import checks, keys, prompts
from qa_lab.cache import ItemCache, stable_hash
from qa_lab.errors import QaLabError, require_choice
from qa_lab.records import EvalRow, Passage, Prediction, QAItem

GENERATION_VERSION = 1
# LoRA ranks vLLM accepts for --max-lora-rank (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


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
        """Build from the `generation` config group, validating the numbers.

        The speed-only keys are checked here too (they change no answer, so they are not
        fields; `GenerationOptions` holds them): a bad value fails before any model is loaded.
        """
        _speed_keys(gen_cfg)
        stops = gen_cfg.stop_strings or ()
        return cls(
            max_new_tokens=checks.whole(gen_cfg.max_new_tokens, "generation.max_new_tokens", low=1),
            do_sample=checks.flag(gen_cfg.do_sample, "generation.do_sample"),
            temperature=checks.number(
                gen_cfg.temperature, "generation.temperature", low=0, above=True
            ),
            stop_strings=tuple(str(checks.text(s, "generation.stop_strings")) for s in stops),
            seed=checks.whole(seed, "seed"),
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


def _speed_keys(gen_cfg: Any) -> tuple[int | None, int | None, int | None]:
    """`generation.batch_size`, `batch_tokens` and `threads`, checked (None where unset)."""
    return tuple(  # type: ignore[return-value]
        checks.maybe_whole(gen_cfg.get(key), f"generation.{key}", low=1)
        for key in ("batch_size", "batch_tokens", "threads")
    )


@dataclass(frozen=True)
class GenerationOptions:
    """The `generation` node: what changes an answer, and the speed-only decoding limits."""

    params: GenParams
    batch_size: int  # rows decoded together at most
    batch_tokens: int | None  # prompt + max_new_tokens positions cached at most (None: no cap)
    threads: int | None  # torch CPU threads (None: all cores)
    repeats: int = 1  # sampled answers per item; per-item scores average over them

    @classmethod
    def from_cfg(cls, gen_cfg: Any, seed: int) -> GenerationOptions:
        """Read and check the node (conf/generation.yaml documents each key)."""
        batch_size, batch_tokens, threads = _speed_keys(gen_cfg)
        if batch_size is None:
            raise QaLabError("generation.batch_size is not set; see conf/generation.yaml")
        params = GenParams.from_cfg(gen_cfg, seed)
        repeats = checks.whole(gen_cfg.get("repeats", 1), "generation.repeats", low=1)
        if repeats > 1 and not params.do_sample:
            raise QaLabError(
                f"generation.repeats={repeats} needs generation.do_sample=true: greedy "
                "decoding gives the same answer every time"
            )
        return cls(params, batch_size, batch_tokens, threads, repeats)


# torch dtypes a model is loaded in (conf/llm/*.yaml), and the devices `models.pick_device` takes
DTYPES = ("float32", "bfloat16", "float16")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
BACKENDS = ("local", "openai")


@dataclass(frozen=True)
class LlmOptions:
    """The `llm` node: the model, how it is loaded locally, or the server that serves it."""

    name: str
    revision: str | None
    backend: str
    dtype: str
    device: str
    load_in_4bit: bool
    served_model: str | None
    served_adapter: str | None
    served_precision: str | None
    client: Any  # openai_client.ClientOptions (imported lazily: this module is imported first)

    @classmethod
    def from_cfg(cls, node: Any) -> LlmOptions:
        """Read and check `llm` (conf/llm/*.yaml, conf/llm_server/openai.yaml)."""
        from qa_lab.openai_client import ClientOptions

        device = str(node.device)
        if not DEVICE.fullmatch(device):
            raise QaLabError(f"llm.device={device!r} is not one of: auto, cpu, cuda, cuda:N, mps")
        return cls(
            name=str(checks.text(node.name, "llm.name")),
            revision=checks.text(node.get("revision"), "llm.revision", optional=True),
            backend=require_choice("llm.backend", node.get("backend", "local"), BACKENDS),
            dtype=require_choice("llm.dtype", node.dtype, DTYPES),
            device=device,
            load_in_4bit=checks.flag(node.get("load_in_4bit", False), "llm.load_in_4bit"),
            served_model=checks.text(node.get("served_model"), "llm.served_model", optional=True),
            served_adapter=checks.text(
                node.get("served_adapter"), "llm.served_adapter", optional=True
            ),
            served_precision=checks.text(
                node.get("served_precision"), "llm.served_precision", optional=True
            ),
            client=ClientOptions.from_cfg(node, "llm"),
        )


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


class Generator:
    """What `generate_cached` drives: `stream` answers prompts, yielding groups as they finish."""

    def stream(self, prompts: Sequence[str]) -> Iterator[list[tuple[int, dict[str, Any]]]]:
        """Yield (prompt position, answer) groups as they finish."""
        raise NotImplementedError

    def generate_batch(self, prompts: Sequence[str]) -> list[dict[str, Any]]:
        """All answers, in prompt order (no cache: for a handful of prompts)."""
        answers = dict(pair for group in self.stream(prompts) for pair in group)
        return [answers[i] for i in range(len(prompts))]


def generate_cached(
    item_ids: Sequence[str],
    prompts: Sequence[str],
    params: GenParams,
    make_generator: Callable[[], Generator],
    cache: ItemCache,
    model_key: str,
    *,
    salts: Sequence[str] | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> list[Prediction]:
    """Answer every prompt, generating only those whose answer is not cached yet.

    The generator is built only when something is missing, so a warm rerun loads no model.
    `on_batch` is called with the size of each group of answers committed to the cache.
    """
    from tqdm.auto import tqdm

    salts = salts or [""] * len(prompts)
    req_keys = [request_key(model_key, p, params, s) for p, s in zip(prompts, salts)]
    found = cache.get_many(req_keys)
    todo = [i for i, k in enumerate(req_keys) if k not in found]
    if todo:
        generator = make_generator()
        bar = tqdm(total=len(todo), unit="answer", desc="generate", disable=not progress)
        for group in generator.stream([prompts[i] for i in todo]):
            fresh = {req_keys[todo[j]]: answer for j, answer in group}
            cache.put_many(fresh)  # committed as they finish: an interrupted run loses none
            found.update(fresh)
            bar.update(len(fresh))
            if on_batch is not None:
                on_batch(len(fresh))
        bar.close()
    generated = set(todo)
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
            extra={"cached": i not in generated},
        )
        for i, (iid, key) in enumerate(zip(item_ids, req_keys))
    ]


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class Backend:
    """How one evaluate run answers: its model key, prompt renderer and (lazy) generator."""

    model_key: str
    render: Callable[[list[dict[str, str]]], str]
    make_generator: Callable[[], Generator]  # built once, only when an answer is missing
    # the prompt of a repeated sample where the seed travels in the request (openai: the
    # server would answer one seed once); None: the local engine's own sampler draws afresh
    render_seeded: Callable[[list[dict[str, str]], int], str] | None = None


def backend(cfg: Any, params: GenParams, adapter: Path | None, model_key: str) -> Backend:
    """The configured backend (`llm.backend`) for `model_key` (base id, or `lora:<train_key>`).

    The local one renders prompts with the model's own chat template; the openai one sends
    the messages and lets the server apply it.
    """
    kind = require_choice("llm.backend", cfg.llm.get("backend", "local"), BACKENDS)
    if kind == "openai":
        from qa_lab.openai_client import OpenAIGenerator, chat_request

        served = served_model(cfg, adapter)
        upstream = model_key if adapter is not None else keys.base_name(cfg.llm)
        return Backend(
            keys.served_model_key(
                served,
                cfg.llm.get("served_precision"),
                upstream,
                fold=cfg.llm.get("system_turn") == "fold",
            ),
            chat_request,
            functools.cache(
                functools.partial(OpenAIGenerator.from_cfg, cfg.llm, "llm", params, served)
            ),
            render_seeded=chat_request,
        )
    from qa_lab import models

    tokenizer = models.load_tokenizer(cfg.llm, cfg.paths.models)
    merged = None if adapter is None else models.merges_adapter(cfg.llm)
    return Backend(
        keys.local_model_key(model_key, device=models.pick_device(cfg.llm.device), merged=merged),
        functools.partial(prompts.render_prompt, tokenizer),
        functools.cache(functools.partial(local_generator, cfg, tokenizer, params, adapter)),
    )


def local_generator(cfg: Any, tokenizer: Any, params: GenParams, adapter: Path | None) -> Any:
    """The in-process generator: the base model, with the LoRA adapter if any.

    The adapter is merged into a full-precision base (same answers as the PEFT wrapper,
    tested, less overhead per step) and left unmerged on a quantized one, where merging would
    round the delta away (`models.with_adapter`).
    """
    import torch

    from qa_lab import models
    from qa_lab.local_engine import LocalGenerator

    gen = GenerationOptions.from_cfg(cfg.generation, int(cfg.seed))
    if gen.threads:
        torch.set_num_threads(gen.threads)
    torch.manual_seed(int(cfg.seed))
    model = models.load_llm(cfg.llm, cfg.paths.models)
    if adapter is not None:
        model = models.with_adapter(model, adapter)
    return LocalGenerator(model, tokenizer, params, gen.batch_size, gen.batch_tokens)


def served_model(cfg: Any, adapter: Path | None) -> str:
    """The model name sent to an OpenAI-compatible server.

    For `model=lora` it is the adapter's served name, as vLLM serves LoRA adapters
    (`--lora-modules NAME=FOLDER`): `llm.served_adapter`, or the adapter folder's name; the
    command that serves it is printed.
    """
    if adapter is None:
        return str(cfg.llm.get("served_model") or cfg.llm.name)
    name = str(cfg.llm.get("served_adapter") or adapter.name)
    print(f"openai backend: requesting adapter {name!r}; serve it with: "
          f"{vllm_command(cfg, name, adapter)}", flush=True)  # fmt: skip
    return name


def vllm_command(cfg: Any, name: str, adapter: Path) -> str:
    """A `vllm serve` command line that serves the base model with this adapter."""
    quantized = " --quantization bitsandbytes" if cfg.llm.get("load_in_4bit") else ""
    return (
        f"vllm serve {cfg.llm.name}{quantized} --enable-lora "
        f"--max-lora-rank {vllm_lora_rank(int(cfg.model.r))} --lora-modules {name}={adapter}"
    )


def vllm_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts that holds a rank-`r` adapter."""
    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise QaLabError(f"model.r={r}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}")


class Answerer:
    """Renders items' prompts and answers them through the per-item cache, as `EvalRow`s.

    With `repeats` > 1 (sampling) each item is answered that many times: repeat 0 is the
    answer a single-repeat run caches, repeat r its own cache entry (salt `repeat:r`, and for
    a server a seed of its own), so raising `repeats` keeps every answer already made.
    """

    def __init__(
        self, backend: Backend, params: GenParams, cache: ItemCache, prompt: Any, repeats: int = 1
    ) -> None:
        self.backend, self.params, self.cache = backend, params, cache
        self.system, self.context_header = prompt.system, prompt.context_header  # `prompt` node
        self.repeats = repeats

    def render(
        self, items: list[QAItem], passages: list[list[Passage]]
    ) -> tuple[list[list[dict[str, str]]], list[str]]:
        """Each item's chat messages (system prompt, context, question) and prompt text."""
        messages = [
            prompts.build_messages(
                it.question,
                ps,
                system=self.system,
                context_header=self.context_header,
            )
            for it, ps in zip(items, passages)
        ]
        return messages, [self.backend.render(m) for m in messages]

    def __call__(
        self,
        items: list[QAItem],
        passages: list[list[Passage]],
        rendered: tuple[list[list[dict[str, str]]], list[str]],
    ) -> tuple[list[EvalRow], dict[str, float]]:
        """The items' rows and the run's generation speed (over freshly generated answers).

        Rows come repeat by repeat (`rows[r * len(items) + i]`: item i's repeat r), each
        marked with its `repeat` when there are several.
        """
        messages, texts = rendered
        runs = range(self.repeats)
        prompts_ = [text for r in runs for text in self._repeat_texts(messages, texts, r)]
        started = time.perf_counter()
        preds = generate_cached(
            [it.id for _ in runs for it in items],
            prompts_,
            self.params,
            self.backend.make_generator,
            self.cache,
            self.backend.model_key,
            salts=[f"repeat:{r}" if r else "" for r in runs for _ in items],
        )
        wall = time.perf_counter() - started
        n, several = len(items), self.repeats > 1
        rows = [
            EvalRow.answered(
                items[j % n], p, passages[j % n], messages[j % n], text, self.params.max_new_tokens
            )
            for j, (p, text) in enumerate(zip(preds, prompts_))
        ]
        if several:
            rows = [replace(row, repeat=j // n) for j, row in enumerate(rows)]
        return rows, speed(rows, wall)

    def _repeat_texts(
        self, messages: list[list[dict[str, str]]], texts: list[str], repeat: int
    ) -> list[str]:
        """Repeat `repeat`'s prompts: the rendered ones, or with the repeat's seed in them."""
        if not repeat or self.backend.render_seeded is None:
            return texts
        return [self.backend.render_seeded(m, self.params.seed + repeat) for m in messages]


def speed(rows: list[EvalRow], wall_s: float) -> dict[str, float]:
    """Wall time, answers generated (not cached), answers and tokens per generation second.

    And what an answer costs, for the report's cost table: prompt and completion tokens per
    answer (mean over every row: a cached answer has the same tokens) and generation seconds
    per answer, mean, p50 and p95 over the freshly generated ones (an answer's `seconds` is
    its share of its batch's time, so p95 is of shares, not of single-request latency).
    """
    import numpy as np

    fresh = [r for r in rows if not r.cached]
    speed = {"generation_wall_s": wall_s, "answers_generated": len(fresh)}
    gen_s = sum(r.seconds or 0.0 for r in fresh)
    if fresh:
        speed["answers_per_s"] = len(fresh) / gen_s if gen_s else 0.0
        speed["tokens_per_s"] = (
            sum(r.generated_tokens or 0 for r in fresh) / gen_s if gen_s else 0.0
        )
        seconds = [r.seconds or 0.0 for r in fresh]
        speed["seconds_per_answer"] = gen_s / len(fresh)
        speed["seconds_per_answer_p50"] = float(np.percentile(seconds, 50))
        speed["seconds_per_answer_p95"] = float(np.percentile(seconds, 95))
    for name, field_ in (("prompt", "prompt_tokens"), ("completion", "generated_tokens")):
        counts = [getattr(r, field_) for r in rows if getattr(r, field_) is not None]
        if counts:
            speed[f"{name}_tokens_per_answer"] = sum(counts) / len(counts)
    return speed
