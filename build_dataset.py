"""Build the QA dataset: seeds, synthetic expansion, dedup, leakage-aware split.

Thin Hydra entry point over `qa_lab.stages`; `--help` lists the config groups.
"""

import hydra
from omegaconf import DictConfig

import qa_lab.config  # noqa: F401  (registers the project-root resolver used by conf/paths)
from qa_lab.errors import cli_errors
from qa_lab.validate import check


@hydra.main(version_base="1.3", config_path="conf", config_name="build_dataset")
@cli_errors
def main(cfg: DictConfig) -> None:
    """Compose the config, check every value it reads, run the stage (heavy imports inside)."""
    check(cfg, "build_dataset")  # a bad value is one line naming its key, before any work
    from qa_lab import stages

    stages.build_dataset_main(cfg)


if __name__ == "__main__":
    main()
