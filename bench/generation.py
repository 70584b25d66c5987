"""Generation: the original's loop (one prompt at a time, always 100 new tokens, no stopping)
versus qa-lab's batched generation with stopping, on the same prompts and model.

    .venv/bin/python bench/generation.py [--n 64] [--max-new-tokens 100] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, matmul_peak_gflops, reference_questions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--original-n", type=int, default=8, help="prompts run the original way")
    args = parser.parse_args()

    import torch
    from omegaconf import OmegaConf

    from qa_lab import models, prompts
    from qa_lab.config import PROJECT_ROOT
    from qa_lab.generation import GenParams, LocalGenerator

    print(machine())
    peak = matmul_peak_gflops()
    llm = OmegaConf.load(PROJECT_ROOT / "conf" / "llm" / "smollm2_135m_instruct.yaml")
    llm.device = "cpu"
    models_dir = PROJECT_ROOT / ".cache" / "models"
    tok = models.load_tokenizer(llm, models_dir)
    model = models.load_llm(llm, models_dir)
    n_params = sum(p.numel() for p in model.parameters())
    system = OmegaConf.load(PROJECT_ROOT / "conf" / "prompt" / "default.yaml").system
    texts = [
        prompts.render_prompt(tok, prompts.build_messages(q, [], system=system, context_header=""))
        for q in reference_questions(args.n)
    ]

    # (a) the original: one prompt at a time, 100 new tokens always (no EOS, no stop strings)
    orig_tokens, t0 = 0, time.perf_counter()
    for text in texts[: args.original_n]:
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        orig_tokens += out.shape[1] - enc["input_ids"].shape[1]
    orig_s = time.perf_counter() - t0
    orig_aps, orig_tps = args.original_n / orig_s, orig_tokens / orig_s

    # (b) qa-lab: length-sorted batches, stop at end of turn and stop strings
    params = GenParams(max_new_tokens=args.max_new_tokens, stop_strings=("\nQuestion:",))
    gen = LocalGenerator(model, tok, params, args.batch_size)
    t0 = time.perf_counter()
    answers = []
    for batch in gen.batches(texts):
        answers += gen.generate_batch([texts[i] for i in batch])
    ours_s = time.perf_counter() - t0
    ours_tokens = sum(a["generated_tokens"] for a in answers)
    ours_aps, ours_tps = len(texts) / ours_s, ours_tokens / ours_s
    bound = peak * 1e9 / (2 * n_params)

    print(
        f"matmul peak: {peak:.0f} GFLOP/s -> bound {bound:.0f} tokens/s for {n_params / 1e6:.0f}M params"
    )
    print(
        f"original loop ({args.original_n} prompts): {orig_aps:.3f} answers/s, {orig_tps:.1f} tokens/s"
    )
    print(
        f"qa-lab batched ({len(texts)} prompts, batch {args.batch_size}): {ours_aps:.3f} answers/s, "
        f"{ours_tps:.1f} tokens/s, mean {ours_tokens / len(texts):.1f} tokens/answer"
    )
    print(
        f"ratio answers/s: {ours_aps / orig_aps:.1f}x (goal >= 5x); tokens/s vs bound: {ours_tps / bound:.0%}"
    )


if __name__ == "__main__":
    main()
