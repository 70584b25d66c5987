"""Generation: qa-lab's batched greedy decoding against three baselines on the same prompts.

    .venv/bin/python bench/generation.py [--n 272] [--max-new-tokens 100] [--batch-size 192]
    .venv/bin/python bench/generation.py --n 8 --original-n 2 --max-new-tokens 32   # smoke run

Sides, all greedy on the embedded SmolLM2-135M-Instruct and the original study's test questions:
(a) the original's loop: one prompt at a time, always `max_new_tokens` new tokens, no stopping;
(b) plain transformers `generate`, length-sorted batches, left padding, stopping at end of turn
    and stop strings (finished rows keep decoding padding until the batch ends);
(c) qa-lab's `LocalGenerator` (finished rows leave the batch and the KV cache, waiting prompts
    take their places);
(d) llama.cpp on the same Q4_1 GGUF, one request at a time, when llama-cpp-python is installed
    (`make bench-deps`).
qa-lab's answers must equal (b)'s exactly and be a prefix of (a)'s (the original suppresses the
end-of-turn token, so it goes on where qa-lab stops); the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from bench.common import (  # noqa: E402
    machine,
    matmul_peak_gflops,
    reference_questions,
    usable_cpus,
    versions,
)
from qa_lab.config import PROJECT_ROOT  # noqa: E402

STOP_STRINGS = ("\nQuestion:", "\nQ:", "<|im_start|>")  # conf/generation.yaml's defaults
GENERATION = OmegaConf.load(PROJECT_ROOT / "conf" / "generation.yaml").generation
# Greedy, with the model's own sampling defaults (generation_config.json) switched off.
GREEDY: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


@dataclass
class Side:
    """One way of answering the prompts: what it produced and how long it took."""

    name: str
    answers: list[str]
    generated_tokens: int
    seconds: float

    @property
    def answers_per_s(self) -> float:
        return len(self.answers) / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds


def timed(name: str, run: Callable[[], tuple[list[str], int]]) -> Side:
    """Run one side and time it (the wall time of the whole side, batching included)."""
    start = time.perf_counter()
    answers, tokens = run()
    side = Side(name, answers, tokens, time.perf_counter() - start)
    print(
        f"{name}: {len(answers)} answers in {side.seconds:.1f}s, {side.answers_per_s:.3f} "
        f"answers/s, {side.tokens_per_s:.1f} tokens/s, {tokens / len(answers):.1f} tokens/answer",
        flush=True,
    )
    return side


def original_loop(model: Any, tok: Any, texts: list[str], max_new: int) -> tuple[list[str], int]:
    """The original study: one prompt at a time, exactly `max_new` tokens, no stopping."""
    import torch

    answers, tokens = [], 0
    for text in texts:
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                **GREEDY,
                pad_token_id=tok.pad_token_id,
            )
        new = out[0, enc["input_ids"].shape[1] :]
        tokens += len(new)
        answers.append(tok.decode(new, skip_special_tokens=True))
    return answers, tokens


def plain_generate(gen: Any, texts: list[str]) -> tuple[list[str], int]:
    """transformers `generate` on qa-lab's length-sorted batches, with the same stopping."""
    import torch

    answers: dict[int, dict[str, Any]] = {}
    for batch in gen.batches(texts):
        enc = gen.tokenizer(
            [texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.inference_mode():
            out = gen.model.generate(
                **enc,
                max_new_tokens=gen.params.max_new_tokens,
                **GREEDY,
                eos_token_id=gen.eos_ids,
                pad_token_id=gen.tokenizer.pad_token_id,
                stop_strings=list(gen.params.stop_strings),
                tokenizer=gen.tokenizer,
            )
        for i, new in zip(batch, out[:, enc["input_ids"].shape[1] :].tolist()):
            answers[i] = gen._finish(new, 0, 0.0)
    ordered = [answers[i] for i in range(len(texts))]
    return [a["prediction"] for a in ordered], sum(a["generated_tokens"] for a in ordered)


def qa_lab(gen: Any, texts: list[str]) -> tuple[list[str], int]:
    """qa-lab's `LocalGenerator`, streaming answers as `generate_cached` drives it."""
    ordered = gen.generate_batch(texts)
    return [a["prediction"] for a in ordered], sum(a["generated_tokens"] for a in ordered)


def llama_cpp(texts: list[str], max_new: int, threads: int) -> Callable[[], tuple[list[str], int]]:
    """llama.cpp on the embedded Q4_1 GGUF, one request at a time (model loaded untimed)."""
    from llama_cpp import Llama

    from qa_lab.models import embedded_gguf

    llm = Llama(
        model_path=str(embedded_gguf("SmolLM2-135M-Instruct")),
        n_ctx=2048,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def run() -> tuple[list[str], int]:
        answers, tokens = [], 0
        for text in texts:
            ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            out = llm.create_completion(
                ids, max_tokens=max_new, temperature=0.0, top_k=1, stop=list(STOP_STRINGS)
            )
            answers.append(out["choices"][0]["text"].strip())
            tokens += int(out["usage"]["completion_tokens"])
        return answers, tokens

    return run


def check_answers(ours: list[str], plain: Side, original: Side) -> bool:
    """qa-lab equals plain `generate` everywhere and is a prefix of the original's answers."""
    from qa_lab.generation import cut_at_stop

    same = sum(a == b for a, b in zip(ours, plain.answers))
    prefix = sum(
        cut_at_stop(o, STOP_STRINGS)[0].strip().startswith(a)
        for a, o in zip(ours, original.answers)
    )
    print(
        f"greedy answers: {same}/{len(ours)} identical to plain generate, "
        f"{prefix}/{len(original.answers)} a prefix of the original loop's"
    )
    return same == len(ours) and prefix == len(original.answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=272, help="test prompts (272: the whole split)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument(
        "--batch-size", type=int, default=GENERATION.batch_size, help="conf/generation.yaml's"
    )
    parser.add_argument(
        "--batch-tokens", type=int, default=GENERATION.batch_tokens, help="conf/generation.yaml's"
    )
    parser.add_argument("--original-n", type=int, default=8, help="prompts run the original way")
    parser.add_argument("--threads", type=int, default=usable_cpus(), help="torch and llama.cpp")
    args = parser.parse_args()

    import torch

    from qa_lab import models, prompts
    from qa_lab.generation import GenParams
    from qa_lab.local_engine import LocalGenerator

    torch.set_num_threads(args.threads)
    print(machine())
    print(versions("torch", "transformers", "llama-cpp-python"))
    peak = matmul_peak_gflops()
    llm = OmegaConf.load(PROJECT_ROOT / "conf" / "llm" / "smollm2_135m_instruct.yaml")
    llm.device = "cpu"
    models_dir = PROJECT_ROOT / ".cache" / "models"
    tok = models.load_tokenizer(llm, models_dir)
    model = models.load_llm(llm, models_dir)
    n_params = sum(p.numel() for p in model.parameters())
    bound = peak * 1e9 / (2 * n_params)
    system = OmegaConf.load(PROJECT_ROOT / "conf" / "prompt" / "default.yaml").system
    texts = [
        prompts.render_prompt(tok, prompts.build_messages(q, [], system=system, context_header=""))
        for q in reference_questions(args.n)
    ]
    print(
        f"matmul peak {peak:.0f} GFLOP/s -> bound {bound:.0f} tokens/s for "
        f"{n_params / 1e6:.0f}M params; {len(texts)} prompts, max {args.max_new_tokens} new tokens"
    )
    params = GenParams(max_new_tokens=args.max_new_tokens, stop_strings=STOP_STRINGS)
    gen = LocalGenerator(model, tok, params, args.batch_size, args.batch_tokens)

    sample = texts[: args.original_n]
    original = timed(
        f"(a) original loop, {len(sample)} prompts",
        lambda: original_loop(model, tok, sample, args.max_new_tokens),
    )
    plain = timed(
        f"(b) transformers generate, batch {args.batch_size}", lambda: plain_generate(gen, texts)
    )
    ours = timed(f"(c) qa-lab LocalGenerator, batch {args.batch_size}", lambda: qa_lab(gen, texts))
    try:
        run_llama = llama_cpp(texts, args.max_new_tokens, args.threads)
    except ImportError:
        print("(d) llama.cpp: skipped, llama-cpp-python is not installed (make bench-deps)")
        llama = None
    else:
        llama = timed(f"(d) llama.cpp, {args.threads} threads, one at a time", run_llama)

    print(
        f"qa-lab vs original: {ours.answers_per_s / original.answers_per_s:.1f}x answers/s (goal >= 5x)"
    )
    print(
        f"qa-lab vs transformers generate: {ours.answers_per_s / plain.answers_per_s:.2f}x answers/s"
    )
    if llama is not None:
        print(
            f"qa-lab vs llama.cpp: {ours.answers_per_s / llama.answers_per_s:.2f}x answers/s (goal >= 3x)"
        )
    shares = ", ".join(
        f"{side.name.split(')')[0]}) {side.tokens_per_s / bound:.0%}"
        for side in (original, plain, ours, llama)
        if side is not None
    )
    print(f"share of the matmul bound in tokens/s: {shares} (goal for (c): >= 40%)")
    if not check_answers(ours.answers, plain, original):
        sys.exit(1)


if __name__ == "__main__":
    main()
