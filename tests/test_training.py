"""LoRA fine-tuning with the real embedded SmolLM2 and real TRL, kept tiny for 2 CPU cores.

One short training (8 short answers, a few epochs, lr 1e-3) is shared by the tests that need a
trained adapter: masking, learning, stopping, save/reload and merging are checked on it.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from qa_lab import models, training
from qa_lab.errors import QaLabError
from qa_lab.prompts import render_prompt, sft_example
from qa_lab.records import QAItem
from tests.conftest import MODELS_DIR, compose_cfg

pytestmark = pytest.mark.slow

QA = [
    ("What does CPU stand for?", "Central processing unit."),
    ("What does RAM stand for?", "Random access memory."),
    ("What does GPU stand for?", "Graphics processing unit."),
    ("What does SSD stand for?", "Solid state drive."),
    ("What does DNS stand for?", "Domain name system."),
    ("What does HTTP stand for?", "Hypertext transfer protocol."),
    ("What does SQL stand for?", "Structured query language."),
    ("What does API stand for?", "Application programming interface."),
]
MAX_NEW_TOKENS = 40
EPOCHS = 5
BASE_WEIGHT = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def train_cfg() -> Any:
    return compose_cfg(
        "train",
        [
            "model.learning_rate=1e-3",
            f"model.epochs={EPOCHS}",
            "model.batch_size=8",
            "model.max_length=128",
            "model.warmup_ratio=0.0",
        ],
    )


@pytest.fixture(scope="module")
def examples(train_cfg: Any) -> list[dict[str, Any]]:
    prompt = train_cfg.prompt
    return [
        sft_example(
            QAItem(id=f"q{i}", question=q, answer=a),
            [],
            system=prompt.system,
            context_header=prompt.context_header,
        )
        for i, (q, a) in enumerate(QA)
    ]


def fresh_model(llm_cfg: Any) -> Any:
    """A base model of our own: PEFT injects LoRA layers into the model it is given."""
    return models.load_llm(llm_cfg, MODELS_DIR, for_training=True)


def greedy(model: Any, tokenizer: Any, examples: list[dict[str, Any]]) -> list[list[int]]:
    """New token ids of greedy generation on the training prompts, stopping on end-of-turn."""
    eot = training.end_of_turn_id(tokenizer)
    texts = [render_prompt(tokenizer, ex["prompt"]) for ex in examples]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=eot,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[:, batch["input_ids"].shape[1] :].tolist()


def stopped(new_tokens: list[int], eot: int) -> bool:
    """Generation ended on end-of-turn before using up max_new_tokens."""
    return eot in new_tokens and new_tokens.index(eot) < MAX_NEW_TOKENS - 1


@pytest.fixture(scope="module")
def trained(llm_cfg, tokenizer, examples, train_cfg, tmp_path_factory) -> SimpleNamespace:
    """The shared short training, run from an empty working directory (MLflow checks)."""
    import mlflow

    workdir = tmp_path_factory.mktemp("cwd")
    out_dir = tmp_path_factory.mktemp("adapter")
    model = fresh_model(llm_cfg)
    base_before = model.get_parameter(BASE_WEIGHT).detach().clone()
    logged: list[tuple[dict[str, float], int]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        trainer = training.build_trainer(
            model=model,
            tokenizer=tokenizer,
            train_examples=examples,
            val_examples=examples[:2],
            lora_cfg=train_cfg.model,
            out_dir=out_dir,
            log_metrics=lambda metrics, step: logged.append((metrics, step)),
        )
        lora_before = {
            name: p.detach().clone()
            for name, p in trainer.model.named_parameters()
            if "lora_" in name
        }
        summary = training.run_training(trainer, out_dir)
        active_run = mlflow.active_run()
    return SimpleNamespace(
        trainer=trainer,
        model=trainer.model,
        summary=summary,
        out_dir=out_dir,
        workdir=workdir,
        base_before=base_before,
        lora_before=lora_before,
        logged=logged,
        active_run=active_run,
    )


def test_labels_mask_the_prompt_and_supervise_answer_and_end_of_turn(
    llm_cfg, tokenizer, examples, train_cfg, tmp_path
):
    trainer = training.build_trainer(
        model=fresh_model(llm_cfg),
        tokenizer=tokenizer,
        train_examples=examples,
        val_examples=[],
        lora_cfg=train_cfg.model,
        out_dir=tmp_path,
    )
    eot = training.end_of_turn_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"
    rows = [trainer.train_dataset[i] for i in range(len(examples))]
    batch = trainer.data_collator(rows)
    for i, example in enumerate(examples):
        # What generation sees: the prompt rendered for inference, tokenized on its own.
        prompt_ids = tokenizer(
            render_prompt(tokenizer, example["prompt"]), add_special_tokens=False
        )["input_ids"]
        answer_ids = tokenizer(example["completion"][0]["content"], add_special_tokens=False)[
            "input_ids"
        ]
        n = int(batch["attention_mask"][i].sum())
        input_ids = batch["input_ids"][i, :n].tolist()
        labels = batch["labels"][i].tolist()
        assert input_ids == prompt_ids + answer_ids + [eot]
        assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
        assert labels[len(prompt_ids) : n] == answer_ids + [eot]
        assert labels[n:] == [-100] * (len(labels) - n)  # padding carries no loss
        supervised = [t for t in labels if t != -100]
        assert supervised[-1] == eot
        assert tokenizer.decode(supervised) == QA[i][1] + "<|im_end|>"

    # On CPU the trainer uses the model's own loss instead of TRL's fused head (faster there):
    # the same number on the same batch.
    if not torch.cuda.is_available():
        from trl import SFTTrainer

        assert type(trainer) is not SFTTrainer
        trainer.model.eval()  # no LoRA dropout, so both see the same function
        with torch.no_grad():
            ours = trainer.compute_loss(trainer.model, dict(batch))
            trl_fused = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
        torch.testing.assert_close(ours, trl_fused, atol=1e-4, rtol=1e-5)


def test_truncation_is_counted_and_prompt_only_rows_dropped(tokenizer, examples, train_cfg):
    question = "In a computer, " * 10 + "what does CPU stand for?"
    long = sft_example(
        QAItem(id="long", question=question, answer="CPU."),
        [],
        system=train_cfg.prompt.system,
        context_header=train_cfg.prompt.context_header,
    )
    rows = [*examples[:2], long]
    prompt_lens = [
        len(tokenizer(render_prompt(tokenizer, ex["prompt"]), add_special_tokens=False).input_ids)
        for ex in rows
    ]
    _, cut = training.build_sft_dataset(tokenizer, rows, max_length=10_000)
    assert cut == {"truncated": 0, "dropped": 0}
    # The short prompts fit with one answer token (their end-of-turn is cut off); the long
    # prompt alone exceeds max_length, carries no loss and is dropped.
    max_length = max(prompt_lens[:2]) + 1
    assert prompt_lens[2] > max_length
    dataset, cut = training.build_sft_dataset(tokenizer, rows, max_length=max_length)
    assert cut == {"truncated": 3, "dropped": 1}
    assert len(dataset) == 2 and all(len(ids) <= max_length for ids in dataset["input_ids"])
    assert all(any(mask) for mask in dataset["completion_mask"])
    with pytest.raises(QaLabError, match="max_length"):
        training.build_sft_dataset(tokenizer, rows, max_length=min(prompt_lens))


def test_training_changes_lora_weights_only_and_lowers_loss(trained):
    model = trained.model
    base_after = model.get_base_model().get_parameter(
        BASE_WEIGHT.replace("q_proj.weight", "q_proj.base_layer.weight")
    )
    assert torch.equal(base_after, trained.base_before)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n), (
        "only LoRA parameters may be trainable"
    )
    changed = [
        name
        for name, p in model.named_parameters()
        if name in trained.lora_before and not torch.equal(p, trained.lora_before[name])
    ]
    assert len(changed) == len(trained.lora_before) > 0
    s = trained.summary
    assert s["final_train_loss"] < 0.5 * s["first_train_loss"]
    assert len(s["val_loss_per_epoch"]) == EPOCHS + 1  # plus the loss before training
    assert s["val_loss_per_epoch"][-1] < s["val_loss_per_epoch"][0]
    assert s["best_val_loss"] == min(s["val_loss_per_epoch"])
    assert 0 < s["trainable_params"] < s["total_params"]
    assert s["train_tokens"] == EPOCHS * sum(
        len(ids) for ids in trained.trainer.train_dataset["input_ids"]
    )
    assert s["tokens_per_s"] > 0 and s["steps"] == EPOCHS


def test_metrics_reach_the_callable_under_project_names(trained):
    steps = [(m, step) for m, step in trained.logged if "train/loss" in m]
    evals = [(m, step) for m, step in trained.logged if "val/loss" in m]
    assert [step for _, step in steps] == list(range(1, EPOCHS + 1))
    for metrics, _ in steps:
        assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/epoch"} <= set(
            metrics
        )
    assert [m["val/loss"] for m, _ in evals] == trained.summary["val_loss_per_epoch"]
    assert all(name.startswith(("train/", "val/")) for m, _ in trained.logged for name in m)


def test_trained_model_stops_on_end_of_turn(trained, tokenizer, examples, base_model):
    eot = training.end_of_turn_id(tokenizer)
    vanilla = greedy(base_model, tokenizer, examples)
    tuned = greedy(trained.model, tokenizer, examples)
    vanilla_stops = sum(stopped(t, eot) for t in vanilla)
    print(f"vanilla stops on end-of-turn for {vanilla_stops}/{len(examples)} prompts")
    assert all(stopped(t, eot) for t in tuned), [tokenizer.decode(t) for t in tuned]
    answers = [tokenizer.decode(t[: t.index(eot)]) for t in tuned]
    assert sum(a == qa[1] for a, qa in zip(answers, QA)) >= len(QA) - 1, answers


def test_saved_adapter_reloads_and_merges_to_the_same_outputs(
    trained, llm_cfg, tokenizer, examples
):
    files = {p.name for p in trained.out_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", training.TRAINER_LOG} <= files
    assert "tokenizer.json" in files and training.CHECKPOINTS not in files
    assert all("lora_" in k for k in load_file(trained.out_dir / "adapter_model.safetensors"))

    expected = greedy(trained.model, tokenizer, examples)
    reloaded = models.load_adapter(models.load_llm(llm_cfg, MODELS_DIR), trained.out_dir)
    assert greedy(reloaded, tokenizer, examples) == expected

    batch = tokenizer(
        [render_prompt(tokenizer, ex["prompt"]) for ex in examples],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    with torch.no_grad():
        unmerged_logits = reloaded(**batch).logits
    merged = reloaded.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(merged_logits[mask], unmerged_logits[mask], atol=1e-3, rtol=1e-4)
    assert greedy(merged, tokenizer, examples) == expected


def test_unmerged_adapter_answers_as_the_merged_model_through_the_engine(
    trained, llm_cfg, tokenizer, examples, base_model
):
    """What a quantized base runs (the PEFT wrapper) answers as the merged fp32 model does."""
    from peft import PeftModel

    from qa_lab.generation import GenParams
    from qa_lab.local_engine import LocalGenerator

    unmerged = models.load_adapter(models.load_llm(llm_cfg, MODELS_DIR), trained.out_dir)
    merged = models.with_adapter(models.load_llm(llm_cfg, MODELS_DIR), trained.out_dir)
    assert isinstance(unmerged, PeftModel) and not isinstance(merged, PeftModel)
    params = GenParams(max_new_tokens=MAX_NEW_TOKENS)
    texts = [render_prompt(tokenizer, ex["prompt"]) for ex in examples]

    def answers(model: Any) -> list[tuple[str, int]]:
        out = LocalGenerator(model, tokenizer, params, batch_size=4).generate_batch(texts)
        return [(a["prediction"], a["generated_tokens"]) for a in out]

    tuned = answers(unmerged)
    assert tuned == answers(merged)
    assert tuned != answers(base_model)  # the adapter changed the answers


def test_total_params_count_packed_4bit_weights_unpacked():
    """bitsandbytes stores two 4-bit values per byte; the summary counts values (PEFT's count)."""
    from peft import LoraConfig, get_peft_model

    class Params4bit(torch.nn.Parameter):  # PEFT recognises bitsandbytes' class by its name
        pass

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.packed = Params4bit(torch.zeros(32, dtype=torch.uint8), requires_grad=False)

    model = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["proj"]))
    trainable, total = training._param_counts(model)
    assert trainable == 2 * 8 + 8 * 2
    assert total == 8 * 8 + 8 + trainable + 2 * 32  # 32 bytes hold 64 weights


def test_training_opens_no_mlflow_run(trained):
    assert trained.active_run is None
    assert not (trained.workdir / "mlruns").exists()
    assert list(trained.workdir.iterdir()) == []  # nothing written to the working directory
    names = [type(cb).__name__ for cb in trained.trainer.callback_handler.callbacks]
    assert not any("mlflow" in name.lower() for name in names), names


def test_cpu_config_switches_off_bf16_and_checkpointing(base_model, train_cfg, tmp_path):
    args = training.sft_config(train_cfg.model, model=base_model, output_dir=tmp_path, has_val=True)
    if not torch.cuda.is_available():
        assert not args.bf16 and not args.gradient_checkpointing
        assert not args.activation_checkpointing
    assert args.report_to in ([], "none", ["none"])
    assert args.optim == "adamw_torch" and args.completion_only_loss
    assert args.eval_strategy == "epoch" and args.save_strategy == "no"
    assert args.train_sampling_strategy == "group_by_length"


def test_early_stopping_saves_per_epoch_and_needs_validation(base_model, train_cfg, tmp_path):
    cfg = dict(train_cfg.model, early_stopping_patience=1)
    args = training.sft_config(cfg, model=base_model, output_dir=tmp_path, has_val=True)
    assert args.save_strategy == "epoch" and args.load_best_model_at_end
    assert args.metric_for_best_model == "eval_loss" and not args.greater_is_better
    with pytest.raises(QaLabError, match="early_stopping_patience"):
        training.sft_config(cfg, model=base_model, output_dir=tmp_path, has_val=False)


def test_missing_lora_setting_is_a_one_line_error(base_model, train_cfg, tmp_path):
    cfg = {k: v for k, v in train_cfg.model.items() if k not in ("max_length", "target_modules")}
    assert training.lora_config(cfg).target_modules == "all-linear"  # the one default
    with pytest.raises(QaLabError, match=r"model\.max_length"):
        training.build_trainer(
            model=base_model,
            tokenizer=None,
            train_examples=[{"prompt": [], "completion": []}],
            val_examples=[],
            lora_cfg=cfg,
            out_dir=tmp_path,
        )


def test_early_stopping_run_leaves_only_the_adapter(
    llm_cfg, tokenizer, examples, train_cfg, tmp_path
):
    cfg = dict(train_cfg.model, early_stopping_patience=1, epochs=2, batch_size=4)
    summary = training.train_lora(
        model=fresh_model(llm_cfg),
        tokenizer=tokenizer,
        train_examples=examples[:4],
        val_examples=examples[:2],
        lora_cfg=cfg,
        out_dir=tmp_path,
    )
    assert 2 <= len(summary["val_loss_per_epoch"]) <= 3  # start + 1-2 epochs
    assert summary["best_val_loss"] == min(summary["val_loss_per_epoch"])
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert not (tmp_path / training.CHECKPOINTS).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_4bit_without_cuda_is_a_clear_error(llm_cfg):
    cfg = llm_cfg.copy()
    cfg.load_in_4bit = True
    with pytest.raises(QaLabError, match="CUDA"):
        models.load_llm(cfg, MODELS_DIR, for_training=True)


def test_threads_follow_the_cpus_this_process_may_use(monkeypatch):
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity on this platform")
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(1)
        training._use_all_cpus()
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        training._use_all_cpus()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cpu_loss_equals_stock_trl_loss_on_the_same_batch(
    llm_cfg, tokenizer, examples, train_cfg, tmp_path
):
    """The faster CPU loss path computes stock TRL's number: the speed-up changes no gradient."""
    from trl import SFTConfig, SFTTrainer

    ours = training.build_trainer(
        model=fresh_model(llm_cfg),
        tokenizer=tokenizer,
        train_examples=examples,
        val_examples=[],
        lora_cfg=train_cfg.model,
        out_dir=tmp_path / "ours",
    )
    if type(ours) is SFTTrainer:
        pytest.skip("with CUDA qa-lab trains with the stock SFTTrainer")
    plain = SFTTrainer(
        model=fresh_model(llm_cfg),
        args=SFTConfig(output_dir=str(tmp_path / "plain"), report_to="none", bf16=False),
        train_dataset=ours.train_dataset,
        processing_class=tokenizer,
        peft_config=training.lora_config(train_cfg.model),
    )
    batch = next(iter(ours.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    # every row starts with its prompt, so qa-lab skips the LM head on those positions
    assert (batch["labels"][:, :8] == -100).all()
    with torch.no_grad():
        loss = ours.compute_loss(ours.model, batch).item()
        stock = plain.compute_loss(plain.model, batch).item()
    assert loss == pytest.approx(stock, rel=1e-4)
