from pathlib import Path

import pytest

from qa_lab import keys, prompts
from qa_lab.cache import ItemCache
from qa_lab.errors import QaLabError
from qa_lab.generation import GenParams, cut_at_stop, generate_cached, request_key
from qa_lab.local_engine import (
    PREFILL_SLACK,
    LocalGenerator,
    _Running,
    length_chunks,
    shared_prefix,
)

QUESTIONS = [
    "What is a hash table?",
    "What does TCP guarantee that UDP does not?",
    "What is a deadlock?",
    "Explain the difference between a process and a thread in an operating system.",
]


# Greedy SmolLM2 ends these within a few tokens: with QUESTIONS they make a batch whose rows
# finish at different steps (end of turn, stop string, length).
SHORT = ["Reply with only the word yes.", "Name one prime number. One word only."]


def _prompts(tokenizer, questions=QUESTIONS):
    return [
        prompts.render_prompt(
            tokenizer, prompts.build_messages(q, [], system="Answer briefly.", context_header="")
        )
        for q in questions
    ]


def test_cut_at_stop():
    assert cut_at_stop("An answer.\nQuestion: next?", ["\nQuestion:"]) == ("An answer.", True)
    assert cut_at_stop("An answer.", ["\nQuestion:"]) == ("An answer.", False)


def test_request_key_depends_on_model_prompt_and_params_not_batch():
    p = GenParams(max_new_tokens=10)
    assert request_key("m", "x", p) != request_key("m2", "x", p)
    assert request_key("m", "x", p) != request_key("m", "y", p)
    assert request_key("m", "x", p) != request_key("m", "x", GenParams(max_new_tokens=11))
    assert request_key("m", "x", p) == request_key(
        "m", "x", GenParams(max_new_tokens=10, temperature=0.3)
    )


@pytest.mark.parametrize(
    "bad", [{"max_new_tokens": 0}, {"batch_size": 0}, {"batch_tokens": -5}], ids=lambda b: [*b][0]
)
def test_bad_generation_numbers_are_one_line_errors(bad):
    from omegaconf import OmegaConf

    cfg = {"max_new_tokens": 8, "do_sample": False, "temperature": 1.0, "stop_strings": []}
    with pytest.raises(QaLabError, match=f"generation.{[*bad][0]}="):
        GenParams.from_cfg(OmegaConf.create({**cfg, **bad}), 0)


def test_rows_join_as_others_finish_with_one_at_a_time_answers(base_model, tokenizer, monkeypatch):
    """Two rows at a time over six prompts: waiting prompts join a running batch mid-decode."""
    params = GenParams(max_new_tokens=24, stop_strings=("\nQuestion:",))
    texts = _prompts(tokenizer, QUESTIONS + SHORT)
    batched = LocalGenerator(base_model, tokenizer, params, batch_size=2)
    single = LocalGenerator(base_model, tokenizer, params, batch_size=1)
    prefills, joins = [], []
    prefill, stack = batched._prefill, _Running.stack

    def spy_prefill(rows, ids):
        prefills.append(len(rows))
        return prefill(rows, ids)

    def spy_stack(parts, room):
        joins.append(max(part.mask.shape[1] for part in parts))
        return stack(parts, room)

    monkeypatch.setattr(batched, "_prefill", spy_prefill)
    monkeypatch.setattr(_Running, "stack", staticmethod(spy_stack))
    out_b = batched.generate_batch(texts)
    out_s = [single.generate_batch([t])[0] for t in texts]
    assert [a["prediction"] for a in out_b] == [a["prediction"] for a in out_s]
    assert [a["generated_tokens"] for a in out_b] == [a["generated_tokens"] for a in out_s]
    assert sum(prefills) == len(texts) and max(prefills) == 2
    # a prompt joined a row that had been decoding (its cache longer than any prompt)
    assert any(width > max(len(r) for r in tokenizer(texts)["input_ids"]) for width in joins)
    for a in out_s:
        assert a["stop_reason"] in {"eos", "length", "stop_string"}
        assert 0 < a["generated_tokens"] <= 24
        assert "<|im_end|>" not in a["prediction"] and "assistant" not in a["prediction"][:10]
    assert sum(a["seconds"] for a in out_b) > 0


def test_batch_tokens_caps_rows_by_prompt_length(base_model, tokenizer):
    gen = LocalGenerator(base_model, tokenizer, GenParams(max_new_tokens=10), 8, batch_tokens=100)
    assert [gen.rows_for(n) for n in (5, 15, 40, 90, 500)] == [6, 4, 2, 1, 1]
    texts = ["a", "b c", "d " * 30, "e " * 60, "f " * 60]
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    for batch in gen.batches(texts):
        assert len(batch) <= gen.rows_for(max(lengths[i] for i in batch))
    assert sorted(i for b in gen.batches(texts) for i in b) == list(range(len(texts)))
    assert LocalGenerator(base_model, tokenizer, GenParams(10), 8).rows_for(10_000) == 8


def test_shared_prefix_leaves_every_row_a_token_of_its_own():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the whole first row is shared
    assert shared_prefix([[7], [7, 8]]) == 0
    assert shared_prefix([[1, 2], [3, 4]]) == 0


def test_length_chunks_keep_padding_within_slack():
    lengths = [16] * 20 + [17] * 20 + [18] * 5 + [40]
    chunks = length_chunks(lengths, slack=PREFILL_SLACK["cpu"])
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for chunk in chunks:
        assert sum(max(lengths[i] for i in chunk) - lengths[i] for i in chunk) <= 32
    assert len(chunks) == 3  # 16s+17s (20 padded tokens), the 18s, the 40 alone
    assert length_chunks([5, 5, 5], slack=0) == [[0, 1, 2]]


def test_finished_rows_leave_the_batch_with_generates_answers(base_model, tokenizer):
    """Dropping finished rows mid-batch changes no answer, token count or stop reason."""
    import torch

    params = GenParams(max_new_tokens=24, stop_strings=("\nQuestion:", " data structure"))
    texts = _prompts(tokenizer, QUESTIONS[:3] + SHORT)
    gen = LocalGenerator(base_model, tokenizer, params, batch_size=len(texts))
    # the chat header and system prompt are computed once for the batch
    assert shared_prefix(tokenizer(texts, add_special_tokens=False)["input_ids"]) >= 10
    ours = gen.generate_batch(texts)
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = base_model.generate(
            **enc,
            max_new_tokens=24,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=gen.eos_ids,
            pad_token_id=tokenizer.pad_token_id,
            stop_strings=list(params.stop_strings),
            tokenizer=tokenizer,
        )
    reference = [gen._finish(new, 0, 0.0) for new in out[:, enc["input_ids"].shape[1] :].tolist()]
    fields = ("prediction", "generated_tokens", "stop_reason")
    assert [[a[f] for f in fields] for a in ours] == [[a[f] for f in fields] for a in reference]
    assert {a["stop_reason"] for a in ours} == {"eos", "stop_string", "length"}


def test_cache_resumes_and_warm_rerun_generates_nothing(base_model, tokenizer, tmp_path: Path):
    params = GenParams(max_new_tokens=12)
    texts = _prompts(tokenizer)
    ids = [f"q{i}" for i in range(len(texts))]
    built = []

    def make():
        built.append(1)
        return LocalGenerator(base_model, tokenizer, params, batch_size=2)

    cache = ItemCache(tmp_path / "answers.sqlite")
    # an "interrupted" first run that finished two items
    first = generate_cached(ids[:2], texts[:2], params, make, cache, "smol", progress=False)
    generated = []
    full = generate_cached(
        ids, texts, params, make, cache, "smol", progress=False, on_batch=generated.append
    )
    assert sum(generated) == 2  # only the two missing answers
    assert [p.prediction for p in full[:2]] == [p.prediction for p in first]
    assert [p.extra["cached"] for p in full] == [True, True, False, False]

    def never():
        raise AssertionError("a warm rerun must not load the model")

    again = generate_cached(ids, texts, params, never, cache, "smol", progress=False)
    assert [p.prediction for p in again] == [p.prediction for p in full]
    other_model = []
    generate_cached(
        ids[:1],
        texts[:1],
        params,
        make,
        cache,
        "other-model",
        progress=False,
        on_batch=other_model.append,
    )
    assert other_model == [1]  # the model is part of the key


def test_local_model_key_adds_fields_only_off_the_cpu_default():
    """CPU keys stay as they were (the default study's cache stays valid)."""
    base = keys.model_id({"name": "SmolLM2-135M-Instruct", "dtype": "float32"})
    assert base == "SmolLM2-135M-Instruct:float32"  # the key the default study was cached under
    assert keys.local_model_key(base, device="cpu", merged=None) == base
    assert keys.local_model_key("lora:abc", device="cpu", merged=True) == "lora:abc"
    assert keys.local_model_key("lora:abc", device="cuda:1", merged=True) == "lora:abc:cuda"
    assert keys.local_model_key("lora:abc", device="cuda", merged=False) == "lora:abc:cuda:unmerged"


def test_prefill_chunks_allow_more_padding_on_cuda():
    lengths = [10] * 8 + [30] * 8
    assert len(length_chunks(lengths, PREFILL_SLACK["cpu"])) == 2
    assert len(length_chunks(lengths, PREFILL_SLACK["cuda"])) == 1
