"""LoRA/QLoRA fine-tuning with TRL's `SFTTrainer`: the loss falls on the answer and its stop token.

Examples are conversational prompt/completion pairs from `prompts.sft_example`, rendered by the
model's own chat template. They are tokenized here rather than inside TRL so that the supervised
span is exactly what generation must produce: the answer tokens followed by the template's
end-of-turn token (SmolLM2: `<|im_end|>`), and nothing after it (the template's trailing newline
is dropped). Learning that token is what makes the fine-tuned model stop. TRL then builds the
labels from the completion mask (`completion_only_loss`), so prompt tokens carry -100.

The `model` node becomes `LoraOptions` once (`lora_options`, every value checked, one-line
errors naming the key); the SFT can continue the adapter of the continued pretraining (`cpt`,
`init_adapter`), so the result is still one adapter, served as before. The trainer itself,
shared with the continued pretraining, is `lora_trainer`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from qa_lab import checks
from qa_lab.errors import QaLabError, require_choice
from qa_lab.lora_trainer import (
    CHECKPOINTS,
    MetricsFn,
    fit_and_release,
    lora_config,
    make_trainer,
    prepared_base,
    sft_config,
)
from qa_lab.prompts import fit_template

# Trainer log keys -> project metric names (DESIGN §6: `train/…`, `val/…` sections in MLflow).
METRIC_NAMES = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "eval_loss": "val/loss",
}
# What the fine-tuning arm learns from (`model.knowledge`): the train QA pairs by SFT (qa), or
# first the corpus chunks by CPT (corpus), or the chunks and the QA pairs as text (both).
KNOWLEDGE = ("qa", "corpus", "both")
# What a training prompt holds besides the question (`model.context`): nothing, or the top
# `context_k` training neighbours (RAFT-style).
CONTEXTS = ("none", "retrieved")
# transformers 5's `SchedulerType` values (tests/test_training.py checks the list against it),
# named here so a typo fails on the config key before a model is loaded.
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)
# What a null or left-out key means; every other key of conf/model/lora.yaml must be set
# (the YAML is the one place defaults live).
NULL_MEANS: dict[str, Any] = {
    "target_modules": "all-linear",  # PEFT shorthand: every linear layer but the LM head
    "early_stopping_patience": None,  # off
    "max_train_rows": None,  # all rows
    "knowledge": "qa",  # SFT on the QA pairs only, no continued pretraining
    "adapter": None,  # train (or reuse) this config's own adapter
    "seeds": None,  # no replicates: `seed` alone
}


@dataclass(frozen=True)
class LoraOptions:
    """The `model` node of `model=lora`, checked once (conf/model/lora.yaml documents each key).

    `model.cpt`, read only when continued pretraining runs, is `cpt.CptOptions`.
    """

    r: int  # LoRA rank
    alpha: int  # scaling numerator: scale = alpha / r
    dropout: float  # in [0, 1)
    target_modules: str | tuple[str, ...]  # "all-linear" or module names
    learning_rate: float
    epochs: float
    batch_size: int  # examples per device step (times grad_accum per optimizer step)
    grad_accum: int
    max_length: int  # tokens per prompt+answer; longer examples are truncated
    warmup_ratio: float  # of all optimizer steps, in [0, 1)
    weight_decay: float
    lr_scheduler: str  # one of LR_SCHEDULERS
    seed: int
    group_by_length: bool  # length-grouped batches (less padding)
    early_stopping_patience: int | None  # epochs without val-loss improvement; None: off
    max_train_rows: int | None  # cap on training rows; None: all
    context: str  # one of CONTEXTS
    context_k: int  # neighbours in the prompt when context=retrieved
    knowledge: str  # one of KNOWLEDGE
    adapter: str | None  # a folder or runs:/<id>/adapter used instead of training
    seeds: tuple[int, ...] | None  # training-seed replicates; None: `seed` alone


def setting(node: Mapping[str, Any] | Any, name: str, where: str = "model") -> Any:
    """`node[name]`, with `NULL_MEANS` for a null or missing `model` key; else it must be set."""
    value = node.get(name) if hasattr(node, "get") else None
    if value is not None:
        return value
    if where == "model" and name in NULL_MEANS:
        return NULL_MEANS[name]
    raise QaLabError(f"{where}.{name} is not set; see conf/model/lora.yaml")


def _below_one(value: Any, key: str) -> float:
    """A fraction in [0, 1): dropout, and warmup (transformers reads 1 or more as steps)."""
    out = checks.number(value, key, low=0)
    if out >= 1:
        raise QaLabError(f"{key}={value!r} must be < 1")
    return out


def _modules(value: Any, key: str) -> str | tuple[str, ...]:
    """A PEFT shorthand string ("all-linear") or a non-empty list of module names."""
    if isinstance(value, str):
        return value
    names = tuple(value) if isinstance(value, Sequence) else ()
    if not names or not all(isinstance(name, str) and name for name in names):
        raise QaLabError(f"{key}={value!r} is not a module name or a list of them")
    return names


def _seeds(value: Any, key: str) -> tuple[int, ...] | None:
    """Distinct whole-number training seeds, at least one; None (null): no replicates."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise QaLabError(f"{key}={value!r} is not a list of seeds, e.g. [42,43,44]")
    seeds = tuple(checks.whole(seed, f"{key}[{i}]", low=0) for i, seed in enumerate(value))
    if len(set(seeds)) != len(seeds):
        raise QaLabError(f"{key}={list(seeds)} repeats a seed: each replicate needs its own")
    return seeds


def _choice(choices: tuple[str, ...]) -> Callable[[Any, str], str]:
    """A converter refusing a value outside `choices` (`errors.require_choice`)."""
    return lambda value, key: require_choice(key, value, choices)


# How each `model` key is read: a converter of checks.py (value, dotted key) -> typed value.
_READ: dict[str, Callable[[Any, str], Any]] = {
    "r": partial(checks.whole, low=1),
    "alpha": partial(checks.whole, low=1),
    "dropout": _below_one,
    "target_modules": _modules,
    "learning_rate": partial(checks.number, low=0, above=True),
    "epochs": partial(checks.number, low=0, above=True),
    "batch_size": partial(checks.whole, low=1),
    "grad_accum": partial(checks.whole, low=1),
    "max_length": partial(checks.whole, low=1),
    "warmup_ratio": _below_one,
    "weight_decay": partial(checks.number, low=0),
    "lr_scheduler": _choice(LR_SCHEDULERS),
    "seed": partial(checks.whole, low=0),
    "group_by_length": checks.flag,
    "early_stopping_patience": partial(checks.maybe_whole, low=1),
    "max_train_rows": partial(checks.maybe_whole, low=1),
    "context": _choice(CONTEXTS),
    "context_k": partial(checks.whole, low=1),
    "knowledge": _choice(KNOWLEDGE),
    "adapter": partial(checks.text, optional=True),
    "seeds": _seeds,
}


def lora_options(node: Mapping[str, Any] | Any) -> LoraOptions:
    """The `model` node (a DictConfig or a dict of conf/model/lora.yaml's keys), checked.

    Raises:
        QaLabError: a key is missing, or a value is not of its kind or out of range; one line
            naming the dotted key (`model.learning_rate='abc' is not a number`).
    """
    return LoraOptions(
        **{name: read(setting(node, name), f"model.{name}") for name, read in _READ.items()}
    )


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


def build_trainer(
    *,
    model: Any,
    tokenizer: Any,
    train_examples: Sequence[Mapping[str, Any]],
    val_examples: Sequence[Mapping[str, Any]],
    lora: LoraOptions,
    out_dir: Path,
    log_metrics: MetricsFn | None = None,
    init_adapter: Path | None = None,
) -> Any:
    """An `SFTTrainer` with the LoRA adapter attached, ready for `lora_trainer.run_training`.

    Separate from `train_lora` so callers (and tests) can inspect the tokenized data, the
    collated batches and the adapter before training. `model` is modified in place: PEFT
    injects the LoRA layers into it. With `init_adapter` (the CPT's), that adapter is loaded
    trainable and continued instead of a fresh one (whose B matrices start at zero).
    """
    if not train_examples:
        raise QaLabError("no training examples: the train split is empty")
    train_ds, cut = build_sft_dataset(tokenizer, train_examples, max_length=lora.max_length)
    val_ds = None
    if val_examples:
        val_ds = build_sft_dataset(tokenizer, val_examples, max_length=lora.max_length)[0]
    checkpoints = Path(out_dir) / CHECKPOINTS
    args = sft_config(lora, model=model, output_dir=checkpoints, has_val=val_ds is not None)
    model = prepared_base(model)
    if init_adapter is not None:
        model = _trainable_adapter(model, init_adapter)
    trainer = make_trainer(
        model=model,
        tokenizer=tokenizer,
        args=args,
        datasets=(train_ds, val_ds),
        lora=lora,
        peft_config=None if init_adapter is not None else lora_config(lora),
        log_metrics=log_metrics,
        metric_names=METRIC_NAMES,
    )
    trainer.qa_lab_truncation = cut  # read back by run_training for the summary
    return trainer


def train_lora(
    *,
    model: Any,
    tokenizer: Any,
    train_examples: list[dict],
    val_examples: list[dict],
    lora: LoraOptions,
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
        lora: the `model` node as `lora_options` read it.
        out_dir: receives adapter_model.safetensors, adapter_config.json, the tokenizer files
            and trainer_log.json (the trainer's log history).
        log_metrics: called as `log_metrics({name: value}, step)` on every log
            (`train/loss`, `train/learning_rate`, `train/grad_norm`, `train/epoch`, `val/loss`).
        init_adapter: a saved adapter (`cpt.train_cpt`'s) to continue instead of a fresh one;
            its LoRA settings are the ones it was saved with. `model` must be a fresh base then.

    Returns:
        A JSON-ready summary: trainable_params, total_params, train_examples,
        truncated_examples (answer cut by max_length: no end-of-turn learned), dropped_examples,
        epochs_run, steps, train_tokens (non-padding tokens trained on), tokens_per_s and
        examples_per_s (over training time, evaluation excluded), wall_s, eval_s,
        first_train_loss, final_train_loss (first/last logged step), mean_train_loss,
        val_loss_per_epoch, best_val_loss (None without validation), stopped_early.
    """
    # no name kept for the trainer: fit_and_release holds its last reference and frees it
    return fit_and_release(
        build_trainer(
            model=model,
            tokenizer=tokenizer,
            train_examples=train_examples,
            val_examples=val_examples,
            lora=lora,
            out_dir=out_dir,
            log_metrics=log_metrics,
            init_adapter=init_adapter,
        ),
        out_dir,
    )
