"""GPU smoke test: the 4-bit, QLoRA and adapter paths on CUDA (`make gpu-smoke`; docs/gpu.md).

Skipped without CUDA. It needs no hub: the models are random-initialised and Mistral-shaped
(grouped-query attention, no sliding window, as Mistral-7B-Instruct-v0.2), with the embedded
SmolLM2 tokenizer, whose files `make gpu-smoke` copies into `.cache/gpu-smoke/tokenizer` (a few
MB, so they travel to a device machine). It does not use tests/conftest.py (a device machine
has no Hydra), so run it with `--noconftest`. Figures go to `$GPU_SMOKE_OUT` (default
`gpu_smoke.json`), written as each test finishes so a timed-out run keeps what it measured.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = Path(os.environ.get("GPU_SMOKE_TOKENIZER", ROOT / ".cache/gpu-smoke/tokenizer"))
FIGURES = Path(os.environ.get("GPU_SMOKE_OUT", "gpu_smoke.json"))
QUESTIONS = [
    "What is a hash table?",
    "What does TCP guarantee that UDP does not?",
    "What is a deadlock?",
    "Explain the difference between a process and a thread.",
    "What is virtual memory?",
    "What does a load balancer do?",
    "What is a B-tree used for?",
    "What is the CAP theorem?",
]


class Cfg(dict):
    """A config node as `models.load_llm` reads it (attributes and `.get`), without OmegaConf."""

    __getattr__ = dict.get


def record(name: str, **values: Any) -> None:
    """Add this test's figures to the figures file (read, update, rewrite)."""
    figures = json.loads(FIGURES.read_text()) if FIGURES.is_file() else {}
    figures[name] = values
    figures["device"] = torch.cuda.get_device_name()
    figures["versions"] = {"torch": torch.__version__, **_versions()}
    FIGURES.write_text(json.dumps(figures, indent=1))


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("transformers", "peft", "trl", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    if not (TOKENIZER / "tokenizer.json").is_file():
        pytest.fail(f"{TOKENIZER}: no tokenizer files; `make gpu-smoke` copies them there")
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module")
def mistral_folder(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-initialised Mistral-shaped model, ~210M parameters, saved in bf16."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=3584,  # Mistral-7B's 14336/4096 ratio
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,  # grouped-query attention, 4 heads per KV head as in Mistral-7B
        max_position_embeddings=4096,
        sliding_window=None,  # v0.2 has none
        initializer_range=0.05,  # peakier logits than 0.02: fewer near-ties in greedy argmax
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("mistral")
    MistralForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _load(folder: Path, *, four_bit: bool, dtype: str = "bfloat16", training: bool = False) -> Any:
    from qa_lab import models

    cfg = Cfg(name=str(folder), dtype=dtype, device="cuda", load_in_4bit=four_bit)
    return models.load_llm(cfg, folder, for_training=training)


def _prompts(tokenizer: Any, n: int) -> list[str]:
    from qa_lab import prompts

    questions = [f"{QUESTIONS[i % len(QUESTIONS)]} ({i})" for i in range(n)]
    return [
        prompts.render_prompt(
            tokenizer, prompts.build_messages(q, [], system="Answer briefly.", context_header="")
        )
        for q in questions
    ]


def test_4bit_load_puts_linear4bit_layers_on_the_device(mistral_folder: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    from qa_lab import lora_trainer, models

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = _load(mistral_folder, four_bit=True)
    load_s = time.perf_counter() - started
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert models.is_quantized(model) and len(four_bit) == 8 * 7  # q k v o gate up down
    assert all(m.weight.device.type == "cuda" for m in four_bit)
    assert {m.compute_dtype for m in four_bit} == {torch.bfloat16}
    full = sum(p.numel() for p in _load(mistral_folder, four_bit=False).parameters())
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    _, total = lora_trainer._param_counts(peft_model)
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert total == full + lora  # packed 4-bit weights counted unpacked (PEFT's count)
    record(
        "load_4bit",
        seconds=round(load_s, 2),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
        total_params=total,
    )


def test_local_engine_matches_generate_in_fp32(mistral_folder: Path, tokenizer: Any) -> None:
    from qa_lab.generation import GenParams
    from qa_lab.local_engine import LocalGenerator

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here: argmax comparisons
    model = _load(mistral_folder, four_bit=False, dtype="float32")
    params = GenParams(max_new_tokens=24)
    texts = _prompts(tokenizer, 16)
    gen = LocalGenerator(model, tokenizer, params, batch_size=4)
    ours = gen.generate_batch(texts)
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            **enc.to("cuda"),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=gen.eos_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[:, enc["input_ids"].shape[1] :].tolist()
    reference = [gen._finish(tokens, 0, 0.0)["prediction"] for tokens in new]
    same = sum(a["prediction"] == b for a, b in zip(ours, reference))
    record("engine_vs_generate_fp32", prompts=len(texts), identical=same)
    assert same == len(texts)


def test_nf4_full_batch_answers_every_prompt(mistral_folder: Path, tokenizer: Any) -> None:
    pytest.importorskip("bitsandbytes")
    from qa_lab.generation import GenParams
    from qa_lab.local_engine import LocalGenerator

    model = _load(mistral_folder, four_bit=True)
    texts = _prompts(tokenizer, 384)
    enc = tokenizer(texts[:8], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        assert torch.isfinite(model(**enc.to("cuda")).logits).all()
    gen = LocalGenerator(model, tokenizer, GenParams(max_new_tokens=64), 192, 40960)
    torch.cuda.synchronize()
    started = time.perf_counter()
    answers = gen.generate_batch(texts)
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    tokens = sum(a["generated_tokens"] for a in answers)
    assert len(answers) == len(texts) and all(a["generated_tokens"] > 0 for a in answers)
    record(
        "nf4_batch_192",
        prompts=len(texts),
        seconds=round(wall, 2),
        tokens_per_s=round(tokens / wall, 1),
    )


def _lora_cfg(**extra: Any) -> dict[str, Any]:
    return {
        "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear",
        "learning_rate": 2e-3, "epochs": 8, "batch_size": 4, "grad_accum": 1,
        "max_length": 128, "warmup_ratio": 0.0, "weight_decay": 0.0, "lr_scheduler": "constant",
        "seed": 0, "group_by_length": False, "context": "none", "context_k": 3, **extra,
    }  # fmt: skip


def test_qlora_step_uses_the_stock_trainer_and_loss_falls(
    mistral_folder: Path, tokenizer: Any, tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")
    from trl import SFTTrainer

    from qa_lab import lora_trainer, prompts, training
    from qa_lab.records import QAItem

    model = _load(mistral_folder, four_bit=True, training=True)
    items = [QAItem(f"q{i}", q, f"Answer number {i}.") for i, q in enumerate(QUESTIONS)]
    examples = [
        prompts.sft_example(it, [], system="Answer briefly.", context_header="") for it in items
    ]
    trainer = training.build_trainer(
        model=model,
        tokenizer=tokenizer,
        train_examples=examples,
        val_examples=[],
        lora=training.lora_options(_lora_cfg()),
        out_dir=tmp_path,
    )
    assert type(trainer) is SFTTrainer  # the fused-loss trainer, not the CPU subclass
    assert trainer.args.activation_checkpointing and trainer.args.optim == "paged_adamw_8bit"
    summary = lora_trainer.run_training(trainer, tmp_path)
    record(
        "qlora_train",
        steps=summary["steps"],
        first_loss=summary["first_train_loss"],
        final_loss=summary["final_train_loss"],
        tokens_per_s=round(summary["tokens_per_s"], 1),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
    )
    assert summary["final_train_loss"] < 0.7 * summary["first_train_loss"]


def _adapter(folder: Path, out: Path, scale: float) -> Path:
    """A LoRA adapter on q_proj whose delta is `scale` times the weight's RMS, elementwise."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _load(folder, four_bit=False, dtype="float32"),
        LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj"], init_lora_weights=False),
    )
    torch.manual_seed(1)
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            weight = module.base_layer.weight
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            delta = b @ a
            b.data *= scale * weight.pow(2).mean().sqrt() / delta.pow(2).mean().sqrt()
    model.save_pretrained(out)
    return out


def _q_proj(model: Any) -> Any:
    return next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))


def _weight(layer: Any) -> Any:
    """The layer's weight as float32, dequantized if it is 4-bit."""
    import bitsandbytes as bnb

    layer = getattr(layer, "base_layer", layer)
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.detach().float()


def _cos(a: Any, b: Any) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_merge_into_nf4_erases_the_delta_and_unmerged_keeps_it(
    mistral_folder: Path, tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    from qa_lab import models

    adapter = _adapter(mistral_folder, tmp_path / "adapter", scale=5e-3)
    base_fp32 = _load(mistral_folder, four_bit=False, dtype="float32")
    peft_fp32 = models.load_adapter(base_fp32, adapter)
    layer = _q_proj(peft_fp32)
    delta = layer.get_delta_weight("default").float()
    found = {}
    for name, four_bit in (("bf16", False), ("nf4", True)):
        base = _load(mistral_folder, four_bit=four_bit)
        before = _weight(_q_proj(base)).clone()
        packed = _q_proj(base).weight.data.clone()
        merged = models.load_adapter(base, adapter).merge_and_unload()
        after = _q_proj(merged)
        found[f"{name}_merge_cosine"] = round(_cos(_weight(after) - before, delta), 4)
        if four_bit:
            changed = (after.weight.data != packed).float().mean()
            found["nf4_codes_changed"] = float(changed)
    kept = models.with_adapter(_load(mistral_folder, four_bit=True), adapter)
    assert isinstance(kept, PeftModel)  # the generator's choice on a quantized base
    x = torch.randn(4, delta.shape[1], device="cuda", dtype=torch.bfloat16)
    q = _q_proj(kept)
    with torch.no_grad():
        lora_out = (q(x) - q.base_layer(x)).float()
    found["unmerged_output_cosine"] = round(_cos(lora_out, x.float() @ delta.T), 4)
    record("merge_check", delta_scale=5e-3, **found)
    assert found["bf16_merge_cosine"] > 0.5
    assert found["nf4_merge_cosine"] < 0.2
    assert found["unmerged_output_cosine"] > 0.9  # 0.965 on CPU in bf16 (output difference noise)
