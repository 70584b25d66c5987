"""Continued pretraining (CPT): a LoRA adapter trained on plain texts before the SFT.

With `model.knowledge=corpus|both` the fine-tuning arm learns the knowledge corpus as prose
first: plain causal-LM loss on the chunk texts, through the SFT's own trainer
(`lora_trainer`; the completion mask covers every token), logged under `cpt/…`. The SFT then
continues that adapter (`training.train_lora(init_adapter=...)`), so the result is still one
adapter, served as before. `model.cpt` holds the CPT's own schedule (`CptOptions`); everything
else (seed, scheduler, warmup, weight decay, grad_accum, the LoRA shape) is the model node's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qa_lab import checks, lora_trainer
from qa_lab.errors import QaLabError, require_choice
from qa_lab.lora_trainer import MetricsFn
from qa_lab.records import QAItem
from qa_lab.training import KNOWLEDGE, LoraOptions, setting

# The continued pretraining's own section, so MLflow draws its loss curve apart from the SFT's.
CPT_METRIC_NAMES = {
    "loss": "cpt/loss",
    "learning_rate": "cpt/learning_rate",
    "grad_norm": "cpt/grad_norm",
    "epoch": "cpt/epoch",
}
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


def cpt_options(node: Mapping[str, Any] | Any) -> CptOptions:
    """The `model.cpt` node of the `model` node `node`, every key required and checked.

    Raises:
        QaLabError: `model.cpt` or one of its keys is not set, or a value is not a positive
            number (one line naming the dotted key).
    """
    cpt = setting(node, "cpt")

    def read(name: str, convert: Any, **bounds: Any) -> Any:
        return convert(setting(cpt, name, "model.cpt"), f"model.cpt.{name}", **bounds)

    return CptOptions(
        epochs=read("epochs", checks.number, low=0, above=True),
        learning_rate=read("learning_rate", checks.number, low=0, above=True),
        batch_size=read("batch_size", checks.whole, low=1),
        # a window's first token is only context: a 1-token window would carry no loss
        max_length=read("max_length", checks.whole, low=2),
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


def cpt_schedule(lora: LoraOptions, cpt: CptOptions) -> LoraOptions:
    """The options the CPT trains with: the model node's, `model.cpt`'s schedule in their place.

    No validation split: held-out chunks would be knowledge withheld from the arm (whether the
    arm learned shows in the SFT's val loss and the evaluation), so no early stopping either.
    """
    return dataclasses.replace(
        lora,
        epochs=cpt.epochs,
        learning_rate=cpt.learning_rate,
        batch_size=cpt.batch_size,
        max_length=cpt.max_length,
        early_stopping_patience=None,
    )


def build_cpt_trainer(
    *,
    model: Any,
    tokenizer: Any,
    dataset: Any,
    lora: LoraOptions,
    cpt: CptOptions,
    out_dir: Path,
    log_metrics: MetricsFn | None = None,
) -> Any:
    """The SFT's trainer set up for continued pretraining on `dataset` (`build_cpt_dataset`).

    It trains with `cpt_schedule(lora, cpt)`, a fresh adapter of the SFT's LoRA shape, and no
    validation set.
    """
    schedule = cpt_schedule(lora, cpt)
    args = lora_trainer.sft_config(
        schedule, model=model, output_dir=Path(out_dir) / lora_trainer.CHECKPOINTS, has_val=False
    )
    return lora_trainer.make_trainer(
        model=lora_trainer.prepared_base(model),
        tokenizer=tokenizer,
        args=args,
        datasets=(dataset, None),
        lora=schedule,
        peft_config=lora_trainer.lora_config(lora),
        log_metrics=log_metrics,
        metric_names=CPT_METRIC_NAMES,
    )


def train_cpt(
    *,
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    lora: LoraOptions,
    cpt: CptOptions,
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
        lora: the `model` node (`training.lora_options`): seed, schedule, LoRA shape, ...
        cpt: `model.cpt` (`cpt_options`): epochs, learning rate, batch size, window length.
        out_dir: receives the adapter, the tokenizer files and trainer_log.json.
        log_metrics: called as `log_metrics({name: value}, step)` on every step with
            `cpt/loss`, `cpt/learning_rate`, `cpt/grad_norm`, `cpt/epoch`.

    Returns:
        A JSON-ready summary: run_training's `CPT_SUMMARY` keys (train_tokens counts window
        tokens, eos included) and the `CptCounts` (texts, windows, split_texts, empty_texts).
    """
    dataset, counts = build_cpt_dataset(tokenizer, texts, max_length=cpt.max_length)
    # no name kept for the trainer: fit_and_release holds its last reference and frees it
    summary = lora_trainer.fit_and_release(
        build_cpt_trainer(
            model=model,
            tokenizer=tokenizer,
            dataset=dataset,
            lora=lora,
            cpt=cpt,
            out_dir=out_dir,
            log_metrics=log_metrics,
        ),
        out_dir,
    )
    return {**{key: summary[key] for key in CPT_SUMMARY}, **asdict(counts)}
