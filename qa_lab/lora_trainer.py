"""The LoRA trainer the SFT (`training`) and continued pretraining (`cpt`) share.

One place for what both runs must do alike: the PEFT adapter shape, TRL's `SFTConfig` with the
precision, memory and schedule choices made explicit, the faster CPU loss path, metrics forwarded
under the project's names, and the run itself (train, save, summarise, hand the memory back).
The callers differ only in the rows they tokenize and the schedule they pass.

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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qa_lab.errors import QaLabError
from qa_lab.models import release

if TYPE_CHECKING:  # training imports this module; the options are only annotations here
    from qa_lab.training import LoraOptions

MetricsFn = Callable[[dict[str, float], int], None]

CHECKPOINTS = "_checkpoints"  # inside out_dir while training; removed before returning
TRAINER_LOG = "trainer_log.json"


def lora_config(lora: LoraOptions) -> Any:
    """PEFT `LoraConfig` for a causal LM from the project's LoRA settings."""
    from peft import LoraConfig

    target = lora.target_modules
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _is_4bit(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False))


def _device_args(model: Any) -> dict[str, Any]:
    """Precision, memory and optimizer settings: what the device and the base model allow.

    TRL defaults to bf16 and gradient checkpointing; both are slow or unsupported on CPU, so
    bf16 is used only for a bf16 model on CUDA and checkpointing only for a 4-bit (QLoRA) one.
    """
    import torch

    cuda = torch.cuda.is_available()
    four_bit = _is_4bit(model)
    return {
        "bf16": cuda and model.dtype == torch.bfloat16,
        "fp16": cuda and model.dtype == torch.float16,
        # transformers 5 renamed gradient checkpointing; TRL's own default for it is on.
        "activation_checkpointing": cuda and four_bit,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if cuda and four_bit else None,
        "optim": "paged_adamw_8bit" if four_bit else "adamw_torch",
        "dataloader_pin_memory": cuda,
    }


def _eval_args(*, early: bool, has_val: bool) -> dict[str, Any]:
    """Validation every epoch; checkpoints only when early stopping restores the best epoch."""
    return {
        "eval_strategy": "epoch" if has_val else "no",
        # the untrained adapter's val loss (step 0) is the baseline that shows learning happened
        "eval_on_start": has_val,
        "save_strategy": "epoch" if early else "no",
        "save_only_model": True,  # no optimizer state: checkpoints only serve load_best_model
        "save_total_limit": 1 if early else None,
        "load_best_model_at_end": early,
        "metric_for_best_model": "eval_loss" if early else None,
        "greater_is_better": False if early else None,
    }


def sft_config(lora: LoraOptions, *, model: Any, output_dir: Path, has_val: bool) -> Any:
    """TRL `SFTConfig`: the schedule from `lora`, the rest made explicit (`_device_args`).

    Raises:
        QaLabError: early stopping is asked for without validation examples to stop on.
    """
    from trl import SFTConfig

    early = lora.early_stopping_patience is not None
    if early and not has_val:
        raise QaLabError("model.early_stopping_patience needs validation examples (val split)")
    return SFTConfig(
        output_dir=str(output_dir),
        report_to="none",  # transformers' MLflow callback would open a run of its own
        seed=lora.seed,
        data_seed=lora.seed,
        num_train_epochs=lora.epochs,
        per_device_train_batch_size=lora.batch_size,
        per_device_eval_batch_size=lora.batch_size,
        gradient_accumulation_steps=lora.grad_accum,
        learning_rate=lora.learning_rate,
        lr_scheduler_type=lora.lr_scheduler,
        # transformers 5 dropped `warmup_ratio`: a float in [0, 1) here is a ratio of all steps.
        warmup_steps=lora.warmup_ratio,
        weight_decay=lora.weight_decay,
        # transformers 5 spells `group_by_length=True` as a sampling strategy.
        train_sampling_strategy="group_by_length" if lora.group_by_length else "random",
        max_length=None,  # the callers truncate or window the rows, and count what they cut
        completion_only_loss=True,
        # Padding-free packs a batch into one row: correct on sdpa only without a KV cache, and
        # on CPU slower than padding (a 817x817 block mask cost more than 10% padding saved).
        padding_free=False,
        logging_strategy="steps",
        logging_steps=1,
        disable_tqdm=True,
        **_device_args(model),
        **_eval_args(early=early, has_val=has_val),
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


def prepared_base(model: Any) -> Any:
    """The base model ready for LoRA: a 4-bit (QLoRA) one gets PEFT's k-bit preparation."""
    if not _is_4bit(model):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def make_trainer(
    *,
    model: Any,
    tokenizer: Any,
    args: Any,
    datasets: tuple[Any, Any],
    lora: LoraOptions,
    peft_config: Any,
    log_metrics: MetricsFn | None,
    metric_names: Mapping[str, str],
) -> Any:
    """The trainer SFT and CPT share: CPU loss path, metrics under `metric_names`, early stop.

    `datasets` is (train, validation or None). `peft_config` is None when `model` already is a
    trainable `PeftModel`: TRL 1.16 refuses a PEFT model given with a second config and
    otherwise trains the adapter it carries.
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
        callbacks.append(EarlyStoppingCallback(lora.early_stopping_patience))
    trainer_class = SFTTrainer if cuda else _cpu_trainer_class()
    return trainer_class(
        model=model,
        args=args,
        train_dataset=datasets[0],
        eval_dataset=datasets[1],
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


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


def fit_and_release(trainer: Any, out_dir: Path) -> dict[str, Any]:
    """`run_training`, then the trainer's memory handed back before the next sweep job.

    Pass the trainer straight from its builder (`fit_and_release(build_trainer(...), out)`),
    never through a name the caller keeps: the argument is then its last reference, so dropping
    it here frees the optimizer state and the PEFT wrapper (GPU memory the next job in this
    process needs) and `models.release` collects their cycles.
    """
    summary = run_training(trainer, out_dir)
    del trainer
    release()
    return summary
