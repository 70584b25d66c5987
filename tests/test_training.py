"""LoRA fine-tuning with the real embedded SmolLM2 and real TRL, kept tiny for 2 CPU cores.

One short training (8 short answers, a few epochs, lr 1e-3) is shared by the tests that need a
trained adapter: masking, learning, stopping, save/reload and merging are checked on it.
"""

from __future__ import annotations

import os
import weakref
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from qa_lab import cpt, lora_trainer, models, training
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
            lora=training.lora_options(train_cfg.model),
            out_dir=out_dir,
            log_metrics=lambda metrics, step: logged.append((metrics, step)),
        )
        lora_before = {
            name: p.detach().clone()
            for name, p in trainer.model.named_parameters()
            if "lora_" in name
        }
        summary = lora_trainer.run_training(trainer, out_dir)
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
        lora=training.lora_options(train_cfg.model),
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
    assert {"adapter_model.safetensors", "adapter_config.json", lora_trainer.TRAINER_LOG} <= files
    assert "tokenizer.json" in files and lora_trainer.CHECKPOINTS not in files
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
    trainable, total = lora_trainer._param_counts(model)
    assert trainable == 2 * 8 + 8 * 2
    assert total == 8 * 8 + 8 + trainable + 2 * 32  # 32 bytes hold 64 weights


def test_training_opens_no_mlflow_run(trained):
    assert trained.active_run is None
    assert not (trained.workdir / "mlruns").exists()
    assert list(trained.workdir.iterdir()) == []  # nothing written to the working directory
    names = [type(cb).__name__ for cb in trained.trainer.callback_handler.callbacks]
    assert not any("mlflow" in name.lower() for name in names), names


def test_cpu_config_switches_off_bf16_and_checkpointing(base_model, train_cfg, tmp_path):
    lora = training.lora_options(train_cfg.model)
    args = lora_trainer.sft_config(lora, model=base_model, output_dir=tmp_path, has_val=True)
    if not torch.cuda.is_available():
        assert not args.bf16 and not args.gradient_checkpointing
        assert not args.activation_checkpointing
    assert args.report_to in ([], "none", ["none"])
    assert args.optim == "adamw_torch" and args.completion_only_loss
    assert args.eval_strategy == "epoch" and args.save_strategy == "no"
    assert args.train_sampling_strategy == "group_by_length"


def test_default_options_give_the_yaml_schedule(base_model, tmp_path):
    """conf/model/lora.yaml's numbers reach TRL and PEFT as the YAML states them."""
    node = compose_cfg("train").model
    lora = training.lora_options(node)
    assert lora == training.LoraOptions(
        r=16,
        alpha=32,
        dropout=0.05,
        target_modules="all-linear",
        learning_rate=1e-4,
        epochs=1.0,
        batch_size=8,
        grad_accum=1,
        max_length=256,
        warmup_ratio=0.05,
        weight_decay=0.0,
        lr_scheduler="linear",
        seed=42,
        group_by_length=True,
        early_stopping_patience=None,
        max_train_rows=None,
        context="none",
        context_k=3,
        knowledge="corpus",
        adapter=None,
        seeds=None,
    )
    args = lora_trainer.sft_config(lora, model=base_model, output_dir=tmp_path, has_val=True)
    assert (args.learning_rate, args.num_train_epochs, args.warmup_steps) == (1e-4, 1.0, 0.05)
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (8, 8)
    assert (args.gradient_accumulation_steps, args.weight_decay) == (1, 0.0)
    assert (args.seed, args.data_seed, args.lr_scheduler_type) == (42, 42, "linear")
    assert args.train_sampling_strategy == "group_by_length" and args.max_length is None
    assert (args.logging_steps, args.padding_free, args.load_best_model_at_end) == (1, False, False)
    peft = lora_trainer.lora_config(lora)
    assert (peft.r, peft.lora_alpha, peft.lora_dropout) == (16, 32, 0.05)
    assert peft.target_modules == "all-linear" and peft.bias == "none"
    assert cpt.cpt_options(node) == cpt.CptOptions(
        epochs=1.0, learning_rate=2e-4, batch_size=8, max_length=256
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("learning_rate", "abc", "model.learning_rate='abc' is not a number"),
        ("r", 0, "model.r=0 must be >= 1"),
        ("batch_size", 2.5, "model.batch_size=2.5 is not a whole number"),
        ("dropout", 1.0, "model.dropout=1.0 must be < 1"),
        ("warmup_ratio", 3, "model.warmup_ratio=3 must be < 1"),
        ("lr_scheduler", "linaer", "model.lr_scheduler='linaer' is not one of: linear, cosine"),
        ("context", "rag", "model.context='rag' is not one of: none, retrieved"),
        ("knowledge", "rag", "model.knowledge='rag' is not one of: qa, corpus, both"),
        ("group_by_length", "yes", "model.group_by_length='yes' is not true or false"),
        ("early_stopping_patience", 0, "model.early_stopping_patience=0 must be >= 1"),
        ("target_modules", [], "model.target_modules=[] is not a module name"),
        ("seed", None, "model.seed is not set; see conf/model/lora.yaml"),
    ],
)
def test_a_bad_lora_value_is_one_line_naming_its_key(train_cfg, key, value, message):
    with pytest.raises(QaLabError) as err:
        training.lora_options({**train_cfg.model, key: value})
    assert str(err.value).startswith(message)


def test_lora_options_read_every_key_and_the_nulls_mean_what_the_yaml_says(train_cfg):
    node = dict(train_cfg.model)
    left_out = ("target_modules", "early_stopping_patience", "max_train_rows", "knowledge")
    lora = training.lora_options({k: v for k, v in node.items() if k not in left_out})
    assert (lora.target_modules, lora.early_stopping_patience) == ("all-linear", None)
    assert (lora.max_train_rows, lora.knowledge, lora.adapter) == (None, "qa", None)
    names = training.lora_options({**node, "target_modules": ["q_proj", "v_proj"]})
    assert names.target_modules == ("q_proj", "v_proj")
    # a sweep value typed on the command line arrives as a string
    assert training.lora_options({**node, "learning_rate": "5e-5"}).learning_rate == 5e-5
    with pytest.raises(QaLabError, match=r"^model\.max_length is not set"):
        training.lora_options({k: v for k, v in node.items() if k != "max_length"})


def test_scheduler_names_are_the_ones_transformers_knows():
    from transformers.trainer_utils import SchedulerType

    assert set(training.LR_SCHEDULERS) == {s.value for s in SchedulerType}


def test_early_stopping_saves_per_epoch_and_needs_validation(base_model, train_cfg, tmp_path):
    lora = training.lora_options(dict(train_cfg.model, early_stopping_patience=1))
    args = lora_trainer.sft_config(lora, model=base_model, output_dir=tmp_path, has_val=True)
    assert args.save_strategy == "epoch" and args.load_best_model_at_end
    assert args.metric_for_best_model == "eval_loss" and not args.greater_is_better
    with pytest.raises(QaLabError, match="early_stopping_patience"):
        lora_trainer.sft_config(lora, model=base_model, output_dir=tmp_path, has_val=False)


def test_early_stopping_run_leaves_only_the_adapter(
    llm_cfg, tokenizer, examples, train_cfg, tmp_path
):
    cfg = dict(train_cfg.model, early_stopping_patience=1, epochs=2, batch_size=4)
    summary = training.train_lora(
        model=fresh_model(llm_cfg),
        tokenizer=tokenizer,
        train_examples=examples[:4],
        val_examples=examples[:2],
        lora=training.lora_options(cfg),
        out_dir=tmp_path,
    )
    assert 2 <= len(summary["val_loss_per_epoch"]) <= 3  # start + 1-2 epochs
    assert summary["best_val_loss"] == min(summary["val_loss_per_epoch"])
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert not (tmp_path / lora_trainer.CHECKPOINTS).exists()


def test_fit_and_release_frees_the_trainer_it_was_handed(
    llm_cfg, tokenizer, examples, train_cfg, tmp_path
):
    """The optimizer state and PEFT wrapper do not outlive the run (the next job's memory)."""
    refs: list[weakref.ref] = []

    def built() -> Any:
        trainer = training.build_trainer(
            model=fresh_model(llm_cfg),
            tokenizer=tokenizer,
            train_examples=examples[:2],
            val_examples=[],
            lora=training.lora_options(dict(train_cfg.model, epochs=1)),
            out_dir=tmp_path,
        )
        refs.append(weakref.ref(trainer))
        return trainer

    summary = lora_trainer.fit_and_release(built(), tmp_path)
    assert summary["steps"] == 1 and (tmp_path / "adapter_model.safetensors").is_file()
    assert refs[0]() is None


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
        lora_trainer._use_all_cpus()
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        lora_trainer._use_all_cpus()
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
        lora=training.lora_options(train_cfg.model),
        out_dir=tmp_path / "ours",
    )
    if type(ours) is SFTTrainer:
        pytest.skip("with CUDA qa-lab trains with the stock SFTTrainer")
    plain = SFTTrainer(
        model=fresh_model(llm_cfg),
        args=SFTConfig(output_dir=str(tmp_path / "plain"), report_to="none", bf16=False),
        train_dataset=ours.train_dataset,
        processing_class=tokenizer,
        peft_config=lora_trainer.lora_config(training.lora_options(train_cfg.model)),
    )
    batch = next(iter(ours.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    # every row starts with its prompt, so qa-lab skips the LM head on those positions
    assert (batch["labels"][:, :8] == -100).all()
    with torch.no_grad():
        loss = ours.compute_loss(ours.model, batch).item()
        stock = plain.compute_loss(plain.model, batch).item()
    assert loss == pytest.approx(stock, rel=1e-4)


# Continued pretraining (CPT): plain causal-LM loss on corpus-like texts, then the SFT continues
# the adapter. Made-up facts, so what the adapter learns is not already in the base model.
CPT_TEXTS = [
    "The Zorvane scheduler runs every task twice and keeps the faster result.",
    "In the Quillot file system, directories are called baskets and files are called eggs.",
    "The Brimmel protocol retries a lost packet after exactly seven heartbeats.",
    "Tarnish sort splits the list into thirds and merges them from the middle out.",
]


@pytest.fixture(scope="module")
def cpt_cfg() -> Any:
    return compose_cfg(
        "train",
        [
            "model.cpt.epochs=3",
            "model.cpt.learning_rate=1e-3",
            "model.cpt.batch_size=4",
            "model.cpt.max_length=64",
            "model.warmup_ratio=0.0",
            "model.epochs=1",
            "model.batch_size=4",
            "model.max_length=128",
        ],
    )


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """What CPT trains on for one short text: its tokens, no template, then eos."""
    return [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def lm_loss(model: Any, tokenizer: Any, texts: list[str]) -> float:
    """Mean causal-LM loss per token over the texts (each with its eos), in eval mode."""
    model.eval()
    losses = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([text_ids(tokenizer, text)])
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def cpt_run(llm_cfg, tokenizer, cpt_cfg, tmp_path_factory) -> SimpleNamespace:
    """One CPT of 3 steps (4 texts, batch 4, 3 epochs) shared by the CPT tests."""
    out_dir = tmp_path_factory.mktemp("cpt")
    model = fresh_model(llm_cfg)
    logged: list[tuple[dict[str, float], int]] = []
    summary = cpt.train_cpt(
        model=model,
        tokenizer=tokenizer,
        texts=[*CPT_TEXTS, "  \n"],
        lora=training.lora_options(cpt_cfg.model),
        cpt=cpt.cpt_options(cpt_cfg.model),
        out_dir=out_dir,
        log_metrics=lambda metrics, step: logged.append((metrics, step)),
    )
    return SimpleNamespace(model=model, summary=summary, out_dir=out_dir, logged=logged)


def test_cpt_loss_covers_the_text_and_its_eos_only(llm_cfg, tokenizer, cpt_cfg, tmp_path):
    texts = [CPT_TEXTS[0], "Short.", CPT_TEXTS[1]]
    schedule = cpt.cpt_options(cpt_cfg.model)
    trainer = cpt.build_cpt_trainer(
        model=fresh_model(llm_cfg),
        tokenizer=tokenizer,
        dataset=cpt.build_cpt_dataset(tokenizer, texts, max_length=schedule.max_length)[0],
        lora=training.lora_options(cpt_cfg.model),
        cpt=schedule,
        out_dir=tmp_path,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(texts))])
    eos = tokenizer.eos_token_id
    template_ids = set(tokenizer.all_special_ids) - {eos}  # <|im_start|>, <|endoftext|>
    for i, text in enumerate(texts):
        n = int(batch["attention_mask"][i].sum())
        input_ids = batch["input_ids"][i, :n].tolist()
        labels = batch["labels"][i].tolist()
        assert input_ids == text_ids(tokenizer, text)
        assert labels[:n] == input_ids  # every token of the text, and its eos, is a target
        assert labels[n:] == [-100] * (len(labels) - n)  # padding carries no loss
        assert input_ids.count(eos) == 1 and not template_ids & set(input_ids)
    assert len({int(m.sum()) for m in batch["attention_mask"]}) > 1  # padding was exercised

    # model.cpt's schedule, the model node's everything else, and no validation
    args, model_cfg = trainer.args, cpt_cfg.model
    assert (args.num_train_epochs, args.learning_rate, args.per_device_train_batch_size) == (
        3,
        1e-3,
        4,
    )
    assert args.seed == model_cfg.seed and args.lr_scheduler_type == model_cfg.lr_scheduler
    assert args.eval_strategy == "no" and not args.load_best_model_at_end
    assert trainer.eval_dataset is None


def test_long_cpt_text_becomes_windows_that_lose_no_token(tokenizer):
    long = " ".join(CPT_TEXTS)
    full = text_ids(tokenizer, long)
    max_length = 16
    assert len(full) > 3 * max_length
    dataset, counts = cpt.build_cpt_dataset(tokenizer, [long, "", "Short."], max_length=max_length)
    windows = dataset["input_ids"][: counts.windows - 1]  # the last row is the short text
    assert counts == cpt.CptCounts(texts=2, windows=len(windows) + 1, split_texts=1, empty_texts=1)
    # consecutive windows share one token (a row's first token is context, never a target)
    assert windows[0] + [t for w in windows[1:] for t in w[1:]] == full
    assert all(len(w) == max_length for w in windows[:-1]) and 2 <= len(windows[-1]) <= max_length
    assert all(a[-1] == b[0] for a, b in zip(windows, windows[1:]))
    assert dataset["input_ids"][-1] == text_ids(tokenizer, "Short.")
    assert all(all(mask) for mask in dataset["completion_mask"])
    with pytest.raises(QaLabError, match="empty"):
        cpt.build_cpt_dataset(tokenizer, ["", " "], max_length=max_length)


def test_cpt_options_are_required_and_a_window_holds_a_target(cpt_cfg):
    opts = cpt.cpt_options(cpt_cfg.model)
    assert opts == cpt.CptOptions(epochs=3, learning_rate=1e-3, batch_size=4, max_length=64)
    node = dict(cpt_cfg.model)
    with pytest.raises(QaLabError, match=r"model\.cpt is not set"):
        cpt.cpt_options({k: v for k, v in node.items() if k != "cpt"})
    with pytest.raises(QaLabError, match=r"model\.cpt\.learning_rate"):
        cpt.cpt_options({**node, "cpt": {"epochs": 1, "batch_size": 8, "max_length": 64}})
    with pytest.raises(QaLabError, match=r"model\.cpt\.max_length=1"):
        cpt.cpt_options({**node, "cpt": {**dict(cpt_cfg.model.cpt), "max_length": 1}})


def test_cpt_learns_the_texts_logs_under_cpt_and_saves_the_adapter(
    cpt_run, base_model, llm_cfg, tokenizer
):
    s = cpt_run.summary
    assert (s["texts"], s["windows"], s["split_texts"], s["empty_texts"]) == (4, 4, 0, 1)
    assert s["steps"] == 3 and s["epochs_run"] == pytest.approx(3)
    assert s["train_tokens"] == 3 * sum(len(text_ids(tokenizer, t)) for t in CPT_TEXTS)
    assert s["final_train_loss"] < s["first_train_loss"] and s["tokens_per_s"] > 0
    assert not {"val_loss_per_epoch", "truncated_examples"} & set(s)

    steps = [(m, step) for m, step in cpt_run.logged if "cpt/loss" in m]
    assert [step for _, step in steps] == [1, 2, 3]
    assert all(
        {"cpt/loss", "cpt/learning_rate", "cpt/grad_norm", "cpt/epoch"} <= set(m) for m, _ in steps
    )
    assert all(name.startswith("cpt/") for m, _ in cpt_run.logged for name in m)

    files = {p.name for p in cpt_run.out_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", lora_trainer.TRAINER_LOG} <= files
    assert "tokenizer.json" in files and lora_trainer.CHECKPOINTS not in files
    # the saved adapter, on a fresh base, models the texts better than the base model does
    before = lm_loss(base_model, tokenizer, CPT_TEXTS)
    after = lm_loss(
        models.with_adapter(models.load_llm(llm_cfg, MODELS_DIR), cpt_run.out_dir),
        tokenizer,
        CPT_TEXTS,
    )
    print(f"CPT texts: loss {before:.3f} -> {after:.3f}")
    assert after < 0.8 * before


def test_sft_continues_the_cpt_adapter_into_one_servable_adapter(
    cpt_run, llm_cfg, tokenizer, examples, cpt_cfg, tmp_path
):
    cpt_weights = load_file(cpt_run.out_dir / "adapter_model.safetensors")
    trainer = training.build_trainer(
        model=fresh_model(llm_cfg),
        tokenizer=tokenizer,
        train_examples=examples[:4],
        val_examples=[],
        lora=training.lora_options(cpt_cfg.model),
        out_dir=tmp_path,
        init_adapter=cpt_run.out_dir,
    )
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert all(trainer.model.get_parameter(n).requires_grad for n in lora)
    lora_b = [p for n, p in lora.items() if "lora_B" in n]
    # step 0 is the CPT's adapter (a fresh one's B matrices are all zero)
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    assert len(lora) == len(cpt_weights)
    saved = {n.replace(".default", ""): p for n, p in lora.items()}
    assert all(torch.equal(saved[n], cpt_weights[n]) for n in cpt_weights)

    summary = lora_trainer.run_training(trainer, tmp_path)
    assert summary["steps"] == 1
    sft_weights = load_file(tmp_path / "adapter_model.safetensors")
    assert set(sft_weights) == set(cpt_weights)  # one adapter, the same tensors, trained on
    assert any(not torch.equal(sft_weights[n], cpt_weights[n]) for n in cpt_weights)

    served = models.with_adapter(models.load_llm(llm_cfg, MODELS_DIR), tmp_path)
    batch = tokenizer(
        [render_prompt(tokenizer, ex["prompt"]) for ex in examples[:2]],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    with torch.no_grad():
        trained_logits = trainer.model(**batch).logits
        served_logits = served(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(served_logits[mask], trained_logits[mask], atol=1e-3, rtol=1e-4)


def test_init_adapter_needs_an_adapter_and_a_fresh_base(cpt_run, tokenizer, examples, cpt_cfg):
    def build(model: Any, adapter: Any) -> Any:
        return training.build_trainer(
            model=model,
            tokenizer=tokenizer,
            train_examples=examples[:2],
            val_examples=[],
            lora=training.lora_options(cpt_cfg.model),
            out_dir=cpt_run.out_dir / "unused",
            init_adapter=adapter,
        )

    with pytest.raises(QaLabError, match="adapter_config.json"):
        build(cpt_run.model, cpt_run.out_dir / "missing")
    # the model train_cpt trained carries LoRA layers in place: a second adapter would stack
    with pytest.raises(QaLabError, match="already has LoRA layers"):
        build(cpt_run.model, cpt_run.out_dir)


def test_cpt_texts_follow_the_knowledge_choice():
    chunks = ["Chunk one.", "Chunk two."]
    items = [QAItem(id="q1", question="What is X?", answer="X is Y.")]
    assert training.KNOWLEDGE == ("qa", "corpus", "both")
    assert cpt.cpt_texts("qa", chunks, items) == []
    assert cpt.cpt_texts("corpus", chunks, items) == chunks
    assert cpt.cpt_texts("both", chunks, items) == [
        *chunks,
        "Question: What is X?\nAnswer: X is Y.",
    ]
    with pytest.raises(QaLabError, match=r"model\.knowledge='rag'"):
        cpt.cpt_texts("rag", chunks, items)
