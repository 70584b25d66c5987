"""Training: LoRA SFT tokens/s of qa-lab's setup against a plain TRL `SFTTrainer` run.

    .venv/bin/python bench/train.py [--rows 128] [--epochs 1] [--batch-size 8]
    .venv/bin/python bench/train.py --rows 16 --val-rows 8     # smoke run

Both sides train the embedded SmolLM2-135M-Instruct on the same tokenized rows of the original
study's train split (prompt + answer + end-of-turn, loss on the answer only), with the same
LoRA config (conf/model/lora.yaml), learning rate, schedule, batch size and seed. The plain run
takes TRL's defaults for everything else but bf16 (refused on CPU) (random batches padded to their longest row, TRL's
own loss and activation checkpointing); qa-lab's is `training.build_trainer` as `train.py`
builds it. Throughput counts real (non-padding) tokens over training time. The loss curves are
printed side by side, and both adapters are scored on the same validation rows: equal within
noise means the speed-up changed nothing the model learns.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, reference_rows, usable_cpus, versions  # noqa: E402


def examples(split: str, limit: int, prompt_cfg: Any) -> list[dict[str, Any]]:
    """Prompt/completion examples built exactly as `train.py` builds them."""
    from qa_lab.prompts import sft_example
    from qa_lab.records import QAItem

    return [
        sft_example(
            QAItem(id=f"{split}{i}", question=row["question"], answer=row["answer"]),
            [],
            system=prompt_cfg.system,
            context_header=prompt_cfg.context_header,
        )
        for i, row in enumerate(reference_rows(split, limit))
    ]


def plain_trainer(model: Any, tok: Any, train_ds: Any, lora_cfg: Any, out_dir: Path) -> Any:
    """Stock `SFTTrainer` with only the settings both sides must share."""
    from trl import SFTConfig, SFTTrainer

    from qa_lab.lora_trainer import lora_config

    args = SFTConfig(
        output_dir=str(out_dir),
        report_to="none",
        bf16=False,  # TRL's default; refused without a GPU
        seed=int(lora_cfg.seed),
        num_train_epochs=float(lora_cfg.epochs),
        per_device_train_batch_size=int(lora_cfg.batch_size),
        per_device_eval_batch_size=int(lora_cfg.batch_size),
        learning_rate=float(lora_cfg.learning_rate),
        lr_scheduler_type=str(lora_cfg.lr_scheduler),
        warmup_steps=float(lora_cfg.warmup_ratio),
        max_length=int(lora_cfg.max_length),
        # TRL's default (None) ignores the completion mask of pre-tokenized rows and puts the
        # loss on the prompt too (531 supervised tokens instead of 197 on 8 rows).
        completion_only_loss=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        processing_class=tok,
        peft_config=lora_config(lora_cfg),
    )


def run(name: str, trainer: Any, val_ds: Any, tokens: int) -> dict[str, Any]:
    """Train, then score the adapter on the validation rows; print throughput."""
    result = trainer.train()
    seconds = float(result.metrics["train_runtime"])
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    val = float(trainer.evaluate(val_ds)["eval_loss"])
    print(
        f"{name}: {trainer.state.global_step} steps in {seconds:.1f}s, {tokens / seconds:.1f} "
        f"tokens/s, mean train loss {sum(losses) / len(losses):.4f}, val loss {val:.4f}",
        flush=True,
    )
    return {"tokens_per_s": tokens / seconds, "losses": losses, "val": val}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=128, help="training rows")
    parser.add_argument("--val-rows", type=int, default=32, help="rows scored after training")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=usable_cpus())
    args = parser.parse_args()

    import torch
    from omegaconf import OmegaConf

    from qa_lab import models, training
    from qa_lab.config import PROJECT_ROOT

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # build_trainer keeps it (else: all CPUs)
    print(machine())
    print(versions("torch", "transformers", "trl", "peft"))
    conf = PROJECT_ROOT / "conf"
    llm = OmegaConf.load(conf / "llm" / "smollm2_135m_instruct.yaml")
    llm.device = "cpu"
    lora = OmegaConf.load(conf / "model" / "lora.yaml")
    lora.epochs, lora.batch_size = args.epochs, args.batch_size
    lora = training.lora_options(lora)
    prompt_cfg = OmegaConf.load(conf / "prompt" / "default.yaml")
    models_dir = PROJECT_ROOT / ".cache" / "models"
    tok = models.load_tokenizer(llm, models_dir)
    train_ex = examples("train", args.rows, prompt_cfg)
    val_ex = examples("test", args.val_rows, prompt_cfg)
    train_ds, _ = training.build_sft_dataset(tok, train_ex, max_length=int(lora.max_length))
    val_ds, _ = training.build_sft_dataset(tok, val_ex, max_length=int(lora.max_length))
    lengths = [len(ids) for ids in train_ds["input_ids"]]
    tokens = int(sum(lengths) * args.epochs)
    print(
        f"{len(lengths)} rows, {min(lengths)}-{max(lengths)} tokens (mean "
        f"{sum(lengths) / len(lengths):.0f}), batch {args.batch_size}, {args.epochs:g} epoch(s), "
        f"LoRA r={lora.r} on {lora.target_modules}, {args.threads} threads"
    )

    with tempfile.TemporaryDirectory() as tmp:
        model = models.load_llm(llm, models_dir, for_training=True)
        trainer = plain_trainer(model, tok, train_ds, lora, Path(tmp) / "plain")
        print(
            f"plain TRL: sampling={trainer.args.train_sampling_strategy}, "
            f"activation_checkpointing={trainer.args.activation_checkpointing}"
        )
        plain = run("plain TRL SFTTrainer", trainer, val_ds, tokens)
        model = models.load_llm(llm, models_dir, for_training=True)
        trainer = training.build_trainer(
            model=model,
            tokenizer=tok,
            train_examples=train_ex,
            val_examples=[],
            lora=lora,
            out_dir=Path(tmp) / "qa-lab",
        )
        ours = run("qa-lab build_trainer", trainer, val_ds, tokens)

    print("step  plain-loss  qa-lab-loss")
    for step, (a, b) in enumerate(zip(plain["losses"], ours["losses"]), start=1):
        print(f"{step:4d}  {a:10.4f}  {b:11.4f}")
    print(
        f"qa-lab vs plain TRL: {ours['tokens_per_s'] / plain['tokens_per_s']:.2f}x tokens/s "
        f"(goal >= 2x); val loss {ours['val']:.4f} vs {plain['val']:.4f} "
        f"(diff {ours['val'] - plain['val']:+.4f})"
    )


if __name__ == "__main__":
    main()
