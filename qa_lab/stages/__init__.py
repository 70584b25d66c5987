"""Orchestration of the stages; each reads its config, reuses or builds, and logs a run.

Stages are cached by key (`qa_lab.keys`): the corpus by its files and chunking, a dataset by
its config and source bytes, an adapter by the base model, dataset and training config,
predictions per item by model, prompt and generation settings. One module per stage, each a
recipe of named steps; the scripts call the `*_main` functions. Nothing else imports this
package.
"""

from qa_lab.stages.corpus import build_corpus, corpus_for, corpus_key
from qa_lab.stages.dataset import build_dataset, build_dataset_main, dataset_folder, dataset_key
from qa_lab.stages.evaluate import evaluate, evaluate_main, score_predictions_file
from qa_lab.stages.train import adapter_for, cpt_key, train_key, train_main

__all__ = [
    "adapter_for",
    "build_corpus",
    "build_dataset",
    "build_dataset_main",
    "corpus_for",
    "corpus_key",
    "cpt_key",
    "dataset_folder",
    "dataset_key",
    "evaluate",
    "evaluate_main",
    "score_predictions_file",
    "train_key",
    "train_main",
]
