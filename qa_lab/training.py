"""LoRA/QLoRA fine-tuning with TRL's `SFTTrainer`: the loss falls on the answer and its stop token.

Examples are conversational prompt/completion pairs from `prompts.sft_example`, rendered by the
model's own chat template. They are tokenized here rather than inside TRL so that the supervised
span is exactly what generation must produce: the answer tokens followed by the template's
end-of-turn token (SmolLM2: `<|im_end|>`), and nothing after it (the template's trailing newline
is dropped). Learning that token is what makes the fine-tuned model stop. TRL then builds the
labels from the completion mask (`completion_only_loss`), so prompt tokens carry -100.

Continued pretraining (CPT, `model.knowledge=corpus|both`) teaches the adapter the knowledge
corpus before the SFT: plain causal-LM loss on the chunk texts, through the same trainer (its
completion mask covers every token), logged under `cpt/…`. The SFT then continues that adapter
(`init_adapter`), so the result is still one adapter, served as before.

Metrics leave through a plain callable (`log_metrics(metrics, step)`); this module never imports
mlflow, and transformers' own reporting integrations are switched off (`report_to="none"`) so
that none of them opens a run of its own.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from qa_lab.errors import QaLabError, require_choice
from qa_lab.models import release
from qa_lab.prompts import fit_template
from qa_lab.records import QAItem

MetricsFn = Callable[[dict[str, float], int], None]

# Trainer log keys -> project metric names (DESIGN §6: `train/…`, `val/…` sections in MLflow).
METRIC_NAMES = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "eval_loss": "val/loss",
}
# The continued pretraining's own section, so MLflow draws its loss curve apart from the SFT's.
CPT_METRIC_NAMES = {
    "loss": "cpt/loss",
    "learning_rate": "cpt/learning_rate",
    "grad_norm": "cpt/grad_norm",
    "epoch": "cpt/epoch",
}
# What the fine-tuning arm learns from (`model.knowledge`): the train QA pairs by SFT (qa), or
# first the corpus chunks by CPT (corpus), or the chunks and the QA pairs as text (both).
KNOWLEDGE = ("qa", "corpus", "both")
# run_training's keys that mean the same for continued pretraining (no validation, no cuts).
CPT_SUMMARY = (
    "trainable_params",
    "total_params",
    "epochs_run",
    "steps",
    "train_tokens",
    "tokens_per_s",
    "wall_s",
    "first_train_loss",
    "final_train_loss",
    "mean_train_loss",
)
# LoRA settings a config may leave out; every other key of conf/model/lora.yaml is required
# there (the YAML is the one place defaults live).
LORA_OPTIONAL: dict[str, Any] = {
    "target_modules": "all-linear",  # PEFT shorthand: every linear layer but the LM head
    "early_stopping_patience": None,  # off
}
CHECKPOINTS = "_checkpoints"  # inside out_dir while training; removed before returning
TRAINER_LOG = "trainer_log.json"


def _opt(cfg: Mapping[str, Any] | Any, key: str) -> Any:
    """A LoRA setting from a dict or DictConfig; a missing required one is a one-line error."""
    value = cfg.get(key) if hasattr(cfg, "get") else None
    if value is not None:
        return value
    if key in LORA_OPTIONAL:
        return LORA_OPTIONAL[key]
    raise QaLabError(f"model.{key} is not set; see conf/model/lora.yaml")


def _chat_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, prompt: bool) -> list[int]:
    """Token ids of messages rendered by the chat template (a generation prompt if `prompt`)."""
    encoded = tokenizer.apply_chat_template(
        fit_template(tokenizer, list(messages)),
        tokenize=True,
        add_generation_prompt=prompt,
        return_dict=True,
    )
    return list(encoded["input_ids"])


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn in this tokenizer's chat template.

    It is the token the fine-tune must learn and the one generation stops on. Usually it is
    `eos_token` (SmolLM2 and Qwen: `<|im_end|>`); templates whose turn ends on another special
    token (Llama 3: `<|eot_id|>`) are found by rendering a probe conversation.

    Raises:
        QaLabError: the template closes the assistant turn with no special token, so a model
            trained on it could never learn where to stop.
    """
    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    prompt_ids = _chat_ids(tokenizer, probe, prompt=True)
    full_ids = _chat_ids(tokenizer, [*probe, {"role": "assistant", "content": "a"}], prompt=False)
    completion = full_ids[len(prompt_ids) :]
    if tokenizer.eos_token_id in completion:
        return int(tokenizer.eos_token_id)
    special = set(tokenizer.all_special_ids)
    for token in completion:
        if token in special:
            return int(token)
    raise QaLabError(
        f"the chat template of {getattr(tokenizer, 'name_or_path', 'this tokenizer')} ends an "
        "assistant turn with no special token; the fine-tune could not learn to stop"
    )


def tokenize_sft_example(
    tokenizer: Any, example: Mapping[str, Any], *, end_of_turn: int
) -> dict[str, list[int]]:
    """Prompt + completion ids and a completion mask that ends on the end-of-turn token.

    The prompt is rendered exactly as at inference (`add_generation_prompt=True`), so the model
    is trained on the context it will see; tokens after the assistant's end-of-turn (a template
    newline) are cut, because generation stops before them.

    Raises:
        QaLabError: the rendered prompt is not a prefix of the rendered conversation, or the
            completion lacks the end-of-turn token.
    """
    prompt_ids = _chat_ids(tokenizer, example["prompt"], prompt=True)
    full_ids = _chat_ids(tokenizer, [*example["prompt"], *example["completion"]], prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise QaLabError(
            "chat template renders the prompt differently with and without the answer; "
            "training would see a context that generation never shows the model"
        )
    completion = full_ids[len(prompt_ids) :]
    if end_of_turn not in completion:
        raise QaLabError(f"chat template does not close the answer with token id {end_of_turn}")
    completion = completion[: completion.index(end_of_turn) + 1]
    return {
        "input_ids": prompt_ids + completion,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(completion),
    }


def build_sft_dataset(
    tokenizer: Any, examples: Sequence[Mapping[str, Any]], *, max_length: int
) -> tuple[Any, dict[str, int]]:
    """Tokenized `datasets.Dataset` (input_ids, completion_mask) and truncation counts.

    Sequences longer than `max_length` keep their start; those whose answer is cut lose their
    end-of-turn token (counted as `truncated`, since they teach the model not to stop), and those
    whose prompt alone fills `max_length` carry no loss and are dropped (counted as `dropped`).
    """
    from datasets import Dataset

    end_of_turn = end_of_turn_id(tokenizer)
    rows: list[dict[str, list[int]]] = []
    truncated = dropped = 0
    for example in examples:
        row = tokenize_sft_example(tokenizer, example, end_of_turn=end_of_turn)
        if len(row["input_ids"]) > max_length:
            truncated += 1
            row = {key: ids[:max_length] for key, ids in row.items()}
            if not any(row["completion_mask"]):
                dropped += 1
                continue
        rows.append(row)
    if not rows:
        raise QaLabError(f"no training example fits model.max_length={max_length}")
    return Dataset.from_list(rows), {"truncated": truncated, "dropped": dropped}


@dataclass(frozen=True)
class CptOptions:
    """The continued pretraining's own schedule (`model.cpt`); the rest comes from `model`."""

    epochs: float
    learning_rate: float
    batch_size: int
    max_length: int  # tokens per window


@dataclass(frozen=True)
class CptCounts:
    """What became of the CPT texts: kept, cut into windows, dropped as empty."""

    texts: int  # non-empty texts trained on
    windows: int  # training rows: one per text, more for those longer than max_length
    split_texts: int  # texts longer than max_length, cut into several windows
    empty_texts: int  # empty or whitespace-only texts, dropped


def cpt_options(lora_cfg: Mapping[str, Any] | Any) -> CptOptions:
    """The `model.cpt` node, every key required (the YAML is where their defaults live)."""
    node = _opt(lora_cfg, "cpt")
    values = {field.name: node.get(field.name) for field in fields(CptOptions)}
    for key, value in values.items():
        if value is None:
            raise QaLabError(f"model.cpt.{key} is not set; see conf/model/lora.yaml")
    if int(values["max_length"]) < 2:
        # a window's first token is only context: a 1-token window would carry no loss
        raise QaLabError(f"model.cpt.max_length={values['max_length']} must be at least 2")
    return CptOptions(
        epochs=float(values["epochs"]),
        learning_rate=float(values["learning_rate"]),
        batch_size=int(values["batch_size"]),
        max_length=int(values["max_length"]),
    )


def cpt_texts(
    knowledge: str, chunk_texts: Sequence[str], train_items: Sequence[QAItem]
) -> list[str]:
    """The texts continued pretraining reads for a `model.knowledge` choice (qa: none).

    `both` adds the train QA pairs as plain text, so the facts the SFT later asks for are also
    learned the way the corpus is (as a passage), not only as chat turns.
    """
    require_choice("model.knowledge", knowledge, KNOWLEDGE)
    if knowledge == "qa":
        return []
    texts = list(chunk_texts)
    if knowledge == "both":
        texts += [f"Question: {item.question}\nAnswer: {item.answer}" for item in train_items]
    return texts


def _windows(ids: list[int], max_length: int) -> list[list[int]]:
    """Rows of at most `max_length` tokens in which every token but the first is a target once.

    A row's first token is only context (nothing before it in the row predicts it), so each
    window after the first starts on the previous window's last token: no token is lost as a
    target, and no window is a lone token that would carry no loss.
    """
    if len(ids) <= max_length:
        return [ids]
    step = max_length - 1
    return [ids[start : start + max_length] for start in range(0, len(ids) - 1, step)]


def build_cpt_dataset(
    tokenizer: Any, texts: Sequence[str], *, max_length: int
) -> tuple[Any, CptCounts]:
    """Tokenized `datasets.Dataset` (input_ids, completion_mask all 1) of plain texts, and counts.

    No chat template: the corpus is prose, and the loss covers its tokens only. Each text ends
    on the tokenizer's eos token, so the model learns where a passage ends (SmolLM2's eos is
    `<|im_end|>`, the token that also ends an SFT answer). Texts longer than `max_length` are
    cut into overlapping windows (`_windows`), not truncated: the knowledge in their tail is
    what the arm is meant to learn.

    Raises:
        QaLabError: no text has any content.
    """
    from datasets import Dataset

    rows: list[dict[str, list[int]]] = []
    kept = split = empty = 0
    for text in texts:
        if not text.strip():
            empty += 1
            continue
        ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        windows = _windows(ids, max_length)
        kept += 1
        split += len(windows) > 1
        rows += [{"input_ids": w, "completion_mask": [1] * len(w)} for w in windows]
    if not rows:
        raise QaLabError(f"no text to pretrain on: all {empty} CPT texts are empty")
    counts = CptCounts(texts=kept, windows=len(rows), split_texts=split, empty_texts=empty)
    return Dataset.from_list(rows), counts


def lora_config(lora_cfg: Mapping[str, Any] | Any) -> Any:
    """PEFT `LoraConfig` for a causal LM from the project's LoRA settings."""
    from peft import LoraConfig

    target = _opt(lora_cfg, "target_modules")
    return LoraConfig(
        r=int(_opt(lora_cfg, "r")),
        lora_alpha=int(_opt(lora_cfg, "alpha")),
        lora_dropout=float(_opt(lora_cfg, "dropout")),
        target_modules=target if isinstance(target, str) else list(target),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _is_4bit(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False))


def sft_config(
    lora_cfg: Mapping[str, Any] | Any, *, model: Any, output_dir: Path, has_val: bool
) -> Any:
    """TRL `SFTConfig` with the precision, memory and schedule choices made explicit.

    TRL defaults to bf16 and gradient checkpointing; both are slow or unsupported on CPU, so
    bf16 is used only for a bf16 model on CUDA and checkpointing only for a 4-bit (QLoRA) one.
    Validation loss is computed every epoch; checkpoints are written only when early stopping
    needs them to restore the best epoch.
    """
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    four_bit = _is_4bit(model)
    patience = _opt(lora_cfg, "early_stopping_patience")
    if patience is not None and not has_val:
        raise QaLabError("model.early_stopping_patience needs validation examples (val split)")
    early = patience is not None
    sampling = "group_by_length" if _opt(lora_cfg, "group_by_length") else "random"
    return SFTConfig(
        output_dir=str(output_dir),
        report_to="none",  # transformers' MLflow callback would open a run of its own
        seed=int(_opt(lora_cfg, "seed")),
        data_seed=int(_opt(lora_cfg, "seed")),
        num_train_epochs=float(_opt(lora_cfg, "epochs")),
        per_device_train_batch_size=int(_opt(lora_cfg, "batch_size")),
        per_device_eval_batch_size=int(_opt(lora_cfg, "batch_size")),
        gradient_accumulation_steps=int(_opt(lora_cfg, "grad_accum")),
        learning_rate=float(_opt(lora_cfg, "learning_rate")),
        lr_scheduler_type=str(_opt(lora_cfg, "lr_scheduler")),
        # transformers 5 dropped `warmup_ratio`: a float in [0, 1) here is a ratio of all steps.
        warmup_steps=float(_opt(lora_cfg, "warmup_ratio")),
        weight_decay=float(_opt(lora_cfg, "weight_decay")),
        # transformers 5 spells `group_by_length=True` as a sampling strategy.
        train_sampling_strategy=sampling,
        max_length=None,  # truncated by build_sft_dataset, which also counts what it cut
        completion_only_loss=True,
        # Padding-free packs a batch into one row: correct on sdpa only without a KV cache, and
        # on CPU slower than padding (a 817x817 block mask cost more than 10% padding saved).
        padding_free=False,
        bf16=cuda and model.dtype == torch.bfloat16,
        fp16=cuda and model.dtype == torch.float16,
        # transformers 5 renamed gradient checkpointing; TRL's own default for it is on.
        activation_checkpointing=cuda and four_bit,
        activation_checkpointing_kwargs={"use_reentrant": False} if cuda and four_bit else None,
        optim="paged_adamw_8bit" if four_bit else "adamw_torch",
        eval_strategy="epoch" if has_val else "no",
        # the untrained adapter's val loss (step 0) is the baseline that shows learning happened
        eval_on_start=has_val,
        save_strategy="epoch" if early else "no",
        save_only_model=True,  # no optimizer state: checkpoints only serve load_best_model_at_end
        save_total_limit=1 if early else None,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        logging_strategy="steps",
        logging_steps=1,
        dataloader_pin_memory=cuda,
        disable_tqdm=True,
    )


def _metrics_callback(log_metrics: MetricsFn, names: Mapping[str, str]) -> Any:
    """A `TrainerCallback` that renames the trainer's logs (`names`) for `log_metrics`."""
    from transformers import TrainerCallback

    class ForwardMetrics(TrainerCallback):
        """Forwards each log (a training step or an evaluation) with the project's names."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            metrics = {
                names[key]: float(value)
                for key, value in (logs or {}).items()
                if key in names and isinstance(value, int | float) and math.isfinite(value)
            }
            if metrics:
                log_metrics(metrics, int(state.global_step))

    return ForwardMetrics()


def _cpu_trainer_class() -> type:
    """`SFTTrainer` computing the loss the plain `Trainer` way: the model's own cross-entropy.

    TRL 1.16 replaces the LM head with a fused log-prob function. On GPUs a Triton kernel
    scores only the supervised positions; on CPU it scores every position in chunks, also
    computes entropy and top-1 for its metrics, and recomputes the logits in backward: a
    training step took ~1.5x as long as with the model's own loss (9.0 s vs 5.8 s, 8 x 113
    tokens, SmolLM2-135M, 2 cores). The labels, and so the loss, are the same.
    """
    import torch
    from transformers import Trainer
    from trl import SFTTrainer

    class CpuSFTTrainer(SFTTrainer):
        """`SFTTrainer` with `Trainer.compute_loss`, and logits only where the answer is scored.

        The loss falls on the answer only, so the LM head (576 x 49k on SmolLM2, a fifth of the
        model's FLOPs) and the cross-entropy need not run on the prompt: positions before the
        batch's first supervised target are skipped (`logits_to_keep`, labels cut to match, so
        the model's shift lines them up exactly as on the full row).
        """

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            labels = inputs["labels"]
            scored = (labels[:, 1:] != -100).any(dim=0).nonzero()
            start = int(scored[0, 0]) if len(scored) else 0
            return Trainer.compute_loss(
                self,
                model,
                {
                    **inputs,
                    "labels": labels[:, start:],
                    # positions as an index tensor: a copy, contiguous, so the LM head is one
                    # matmul (a sliced view made it a batched matmul, slower than no skipping)
                    "logits_to_keep": torch.arange(start, labels.shape[1], device=labels.device),
                    "use_cache": False,
                },
                return_outputs=return_outputs,
                num_items_in_batch=num_items_in_batch,
            )

    return CpuSFTTrainer


def _use_all_cpus() -> None:
    """Give torch one thread per CPU this process may run on, unless the user pinned it.

    torch counts the machine's cores, which in a container can exceed the CPUs it is allowed;
    oversubscribed threads make CPU training markedly slower. `OMP_NUM_THREADS` wins (parallel
    jobs on one machine set it to share the cores).
    """
    import torch

    if os.environ.get("OMP_NUM_THREADS") or not hasattr(os, "sched_getaffinity"):
        return
    available = len(os.sched_getaffinity(0))
    if torch.get_num_threads() != available:
        torch.set_num_threads(available)


def _prepared_base(model: Any) -> Any:
    """The base model ready for LoRA: a 4-bit (QLoRA) one gets PEFT's k-bit preparation."""
    if not _is_4bit(model):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def _trainable_adapter(model: Any, adapter_dir: Path) -> Any:
    """`model` wrapped with a saved adapter whose LoRA weights keep training (SFT after CPT).

    Raises:
        QaLabError: no adapter in `adapter_dir`, or `model` already carries LoRA layers (the
            model `train_cpt` trained: the adapter would be stacked onto the CPT's own).
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise QaLabError(f"init_adapter={adapter_dir}: no adapter_config.json there")
    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise QaLabError(
            f"init_adapter={adapter_dir}: the model already has LoRA layers; load a fresh base"
        )
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def _make_trainer(
    *,
    model: Any,
    tokenizer: Any,
    args: Any,
    train_ds: Any,
    val_ds: Any,
    lora_cfg: Mapping[str, Any] | Any,
    peft_config: Any,
    log_metrics: MetricsFn | None,
    metric_names: Mapping[str, str],
) -> Any:
    """The trainer SFT and CPT share: CPU loss path, metrics under `metric_names`, early stop.

    `peft_config` is None when `model` already is a trainable `PeftModel`: TRL 1.16 refuses a
    PEFT model given with a second config and otherwise trains the adapter it carries.
    """
    import torch
    from transformers import EarlyStoppingCallback, set_seed
    from trl import SFTTrainer

    cuda = torch.cuda.is_available()
    if not cuda:
        _use_all_cpus()
    # LoRA's A matrices are drawn when TRL wraps the model, before Trainer seeds itself.
    set_seed(args.seed)
    callbacks: list[Any] = []
    if log_metrics is not None:
        callbacks.append(_metrics_callback(log_metrics, metric_names))
    if args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(int(_opt(lora_cfg, "early_stopping_patience"))))
    trainer_class = SFTTrainer if cuda else _cpu_trainer_class()
    return trainer_class(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def build_trainer(
    *,
    model: Any,
    tokenizer: Any,
    train_examples: Sequence[Mapping[str, Any]],
    val_examples: Sequence[Mapping[str, Any]],
    lora_cfg: Mapping[str, Any] | Any,
    out_dir: Path,
    log_metrics: MetricsFn | None = None,
    init_adapter: Path | None = None,
) -> Any:
    """An `SFTTrainer` with the LoRA adapter attached, ready for `run_training`.

    Separate from `train_lora` so callers (and tests) can inspect the tokenized data, the
    collated batches and the adapter before training. `model` is modified in place: PEFT
    injects the LoRA layers into it. With `init_adapter` (the CPT's), that adapter is loaded
    trainable and continued instead of a fresh one (whose B matrices start at zero).
    """
    if not train_examples:
        raise QaLabError("no training examples: the train split is empty")
    max_length = int(_opt(lora_cfg, "max_length"))
    train_ds, cut = build_sft_dataset(tokenizer, train_examples, max_length=max_length)
    val_ds = None
    if val_examples:
        val_ds = build_sft_dataset(tokenizer, val_examples, max_length=max_length)[0]
    checkpoints = Path(out_dir) / CHECKPOINTS
    args = sft_config(lora_cfg, model=model, output_dir=checkpoints, has_val=val_ds is not None)
    model = _prepared_base(model)
    if init_adapter is not None:
        model = _trainable_adapter(model, init_adapter)
    trainer = _make_trainer(
        model=model,
        tokenizer=tokenizer,
        args=args,
        train_ds=train_ds,
        val_ds=val_ds,
        lora_cfg=lora_cfg,
        peft_config=None if init_adapter is not None else lora_config(lora_cfg),
        log_metrics=log_metrics,
        metric_names=METRIC_NAMES,
    )
    trainer.qa_lab_truncation = cut  # read back by run_training for the summary
    return trainer


def build_cpt_trainer(
    *,
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    lora_cfg: Mapping[str, Any] | Any,
    out_dir: Path,
    log_metrics: MetricsFn | None = None,
) -> Any:
    """The SFT trainer set up for continued pretraining on `texts`, ready for `run_training`.

    The model node's settings with `model.cpt`'s schedule in their place. No validation split:
    held-out chunks would be knowledge withheld from the arm (whether the arm learned shows in
    the SFT's val loss and the evaluation), so no early stopping either.
    """
    opts = cpt_options(lora_cfg)
    train_ds, counts = build_cpt_dataset(tokenizer, texts, max_length=opts.max_length)
    settings = {
        **dict(lora_cfg),
        **asdict(opts),
        "early_stopping_patience": None,
    }
    checkpoints = Path(out_dir) / CHECKPOINTS
    args = sft_config(settings, model=model, output_dir=checkpoints, has_val=False)
    trainer = _make_trainer(
        model=_prepared_base(model),
        tokenizer=tokenizer,
        args=args,
        train_ds=train_ds,
        val_ds=None,
        lora_cfg=settings,
        peft_config=lora_config(lora_cfg),
        log_metrics=log_metrics,
        metric_names=CPT_METRIC_NAMES,
    )
    trainer.qa_lab_cpt_counts = counts  # read back by train_cpt for the summary
    return trainer


def _param_counts(model: Any) -> tuple[int, int]:
    """Trainable and total parameters, counted by PEFT where it wraps the model.

    A bitsandbytes 4-bit weight is stored two values per byte, so `numel()` sees half of it;
    PEFT's count unpacks it (a 7B base would otherwise report ~3.8B).
    """
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def run_training(trainer: Any, out_dir: Path) -> dict[str, Any]:
    """Train, save the adapter, tokenizer and log history into `out_dir`, and summarise.

    Throughput counts real (non-padding) tokens: every training sequence once per epoch run,
    divided by the time spent training, i.e. the `train()` wall time minus evaluation time.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = trainer.model
    trainable, total = _param_counts(model)
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    history = list(trainer.state.log_history)
    eval_logs = [log for log in history if "eval_loss" in log]
    eval_s = sum(float(log.get("eval_runtime", 0.0)) for log in eval_logs)
    train_s = max(wall - eval_s, 1e-9)
    epochs_run = float(trainer.state.epoch or 0.0)
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    train_tokens = int(round(sum(lengths) * epochs_run))
    train_losses = [float(log["loss"]) for log in history if "loss" in log]
    val_losses = [float(log["eval_loss"]) for log in eval_logs]

    # Trainer turns the model's KV cache off for training; generation afterwards wants it.
    model.config.use_cache = True
    model.eval()
    model.save_pretrained(out_dir)
    trainer.processing_class.save_pretrained(out_dir)
    (out_dir / TRAINER_LOG).write_text(json.dumps(history, indent=1), encoding="utf-8")
    shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    cut = getattr(trainer, "qa_lab_truncation", {"truncated": 0, "dropped": 0})
    return {
        "trainable_params": trainable,
        "total_params": total,
        "train_examples": len(lengths),
        "truncated_examples": cut["truncated"],
        "dropped_examples": cut["dropped"],
        "epochs_run": epochs_run,
        "steps": int(trainer.state.global_step),
        "train_tokens": train_tokens,
        "tokens_per_s": train_tokens / train_s,
        "examples_per_s": len(lengths) * epochs_run / train_s,
        "wall_s": wall,
        "eval_s": eval_s,
        "first_train_loss": train_losses[0] if train_losses else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "mean_train_loss": float(result.training_loss),
        "val_loss_per_epoch": val_losses,  # [0] is before training (eval_on_start)
        "initial_val_loss": val_losses[0] if val_losses else None,
        "final_val_loss": val_losses[-1] if val_losses else None,
        "best_val_loss": min(val_losses) if val_losses else None,
        "stopped_early": epochs_run + 1e-6 < float(trainer.args.num_train_epochs),
    }


def train_lora(
    *,
    model: Any,
    tokenizer: Any,
    train_examples: list[dict],
    val_examples: list[dict],
    lora_cfg: Mapping[str, Any] | Any,
    out_dir: Path,
    log_metrics: MetricsFn | None = None,
    init_adapter: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on prompt/completion examples and save it into `out_dir`.

    Args:
        model: the base causal LM (from `models.load_llm(..., for_training=True)`); LoRA layers
            are injected into it in place.
        tokenizer: its tokenizer; saved next to the adapter.
        train_examples: `prompts.sft_example` dicts (conversational prompt + completion).
        val_examples: the same for validation loss per epoch (may be empty: no evaluation).
        lora_cfg: the `model` config group (`conf/model/lora.yaml` keys).
        out_dir: receives adapter_model.safetensors, adapter_config.json, the tokenizer files
            and trainer_log.json (the trainer's log history).
        log_metrics: called as `log_metrics({name: value}, step)` on every log
            (`train/loss`, `train/learning_rate`, `train/grad_norm`, `train/epoch`, `val/loss`).
        init_adapter: a saved adapter (`train_cpt`'s) to continue instead of a fresh one; its
            LoRA settings are the ones it was saved with. `model` must be a fresh base then.

    Returns:
        A JSON-ready summary: trainable_params, total_params, train_examples,
        truncated_examples (answer cut by max_length: no end-of-turn learned), dropped_examples,
        epochs_run, steps, train_tokens (non-padding tokens trained on), tokens_per_s and
        examples_per_s (over training time, evaluation excluded), wall_s, eval_s,
        first_train_loss, final_train_loss (first/last logged step), mean_train_loss,
        val_loss_per_epoch, best_val_loss (None without validation), stopped_early.
    """
    trainer = build_trainer(
        model=model,
        tokenizer=tokenizer,
        train_examples=train_examples,
        val_examples=val_examples,
        lora_cfg=lora_cfg,
        out_dir=out_dir,
        log_metrics=log_metrics,
        init_adapter=init_adapter,
    )
    summary = run_training(trainer, out_dir)
    del trainer  # its optimizer state and the PEFT wrapper: GPU memory the next sweep job needs
    release()
    return summary


def train_cpt(
    *,
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    lora_cfg: Mapping[str, Any] | Any,
    out_dir: Path,
    log_metrics: MetricsFn | None = None,
) -> dict[str, Any]:
    """Continued pretraining: a LoRA adapter trained on plain texts, saved into `out_dir`.

    The adapter has the SFT's LoRA settings (r, alpha, dropout, target modules), so the SFT can
    continue it (`train_lora(init_adapter=out_dir)`) into the one adapter that is served.

    Args:
        model: the base causal LM, as for `train_lora`; LoRA layers are injected into it in
            place, so the SFT that continues the adapter needs a fresh base.
        tokenizer: its tokenizer; saved next to the adapter.
        texts: the CPT texts (`cpt_texts`); empty ones are dropped and counted.
        lora_cfg: the `model` config group; `model.cpt` gives epochs, learning rate, batch
            size and window length, everything else (seed, schedule, ...) is the model node's.
        out_dir: receives the adapter, the tokenizer files and trainer_log.json.
        log_metrics: called as `log_metrics({name: value}, step)` on every step with
            `cpt/loss`, `cpt/learning_rate`, `cpt/grad_norm`, `cpt/epoch`.

    Returns:
        A JSON-ready summary: run_training's `CPT_SUMMARY` keys (train_tokens counts window
        tokens, eos included) and the `CptCounts` (texts, windows, split_texts, empty_texts).
    """
    trainer = build_cpt_trainer(
        model=model,
        tokenizer=tokenizer,
        texts=texts,
        lora_cfg=lora_cfg,
        out_dir=out_dir,
        log_metrics=log_metrics,
    )
    summary = run_training(trainer, out_dir)
    counts = trainer.qa_lab_cpt_counts
    del trainer  # as in train_lora: memory the SFT that follows needs
    release()
    return {**{key: summary[key] for key in CPT_SUMMARY}, **asdict(counts)}
