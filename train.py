"""Fine-tune the LLM with LoRA (TRL SFTTrainer + PEFT); the adapter is cached by config.

Thin Hydra entry point over `qa_lab.stages`; `python train.py --help` lists the config groups.
"""

import hydra
from omegaconf import DictConfig

import qa_lab.config  # noqa: F401  (registers the project-root resolver used by conf/paths)
from qa_lab.errors import cli_errors
from qa_lab.validate import check


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@cli_errors
def main(cfg: DictConfig) -> None:
    """Compose the config, check every value it reads, run the stage (heavy imports inside)."""
    check(cfg, "train")  # a bad value is one line naming its key, before any work
    from qa_lab import stages

    stages.train_main(cfg)


if __name__ == "__main__":
    main()
