"""Adapters and base models as MLflow 3 logged models, linked to the runs that evaluate them.

MLflow 3 centres its UI on models: a logged model's page shows its params, the metrics linked
to it run by run and its traces, and the registry points aliases at it. So each trained adapter
(the PEFT folder only, never the base weights) is one logged model tagged with its train or cpt
key; every evaluate run links its metrics and traces to the model it answered with (a vanilla
config: one entry per base-model spec, params only, no weights). An entry is looked up by its
key before one is created, under a file lock, so a cached adapter or a parallel twin never logs
a second one. `register_best` puts a sweep's best adapter in the registry under an alias.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qa_lab import keys, tracking
from qa_lab.cache import is_finished, lock, read_manifest, stable_hash
from qa_lab.errors import QaLabError

KEY_TAG = f"{tracking.TAG_PREFIX}key"  # the train, cpt or base-model key the entry stands for
KIND_TAG = f"{tracking.TAG_PREFIX}model_kind"  # adapter | cpt_adapter | base
RUN_TAG = "logged_model"  # qa_lab.logged_model on an evaluate run: the model its metrics link to
RUN_KIND_TAG = "logged_model_kind"  # qa_lab.logged_model_kind: that model's kind
MODEL_TYPES = {"adapter": "peft-lora-adapter", "cpt_adapter": "peft-cpt-adapter", "base": "llm"}
KEY_PARAM = {"adapter": "train_key", "cpt_adapter": "cpt_key", "base": "base_model_key"}
BEST_ALIAS = "best"
NAME_BAD_CHARS = r"[/:.%'\"]"  # MLflow refuses these in a logged model's name


@dataclass(frozen=True)
class ModelEntry:
    """One logged model: its kind, the key it is found by, the params its page shows.

    `folder` is the adapter folder logged as the model's artifacts (None: a base-model entry,
    created as an external model with no weights).
    """

    kind: str
    key: str
    params: Mapping[str, str]
    folder: Path | None = None

    @property
    def name(self) -> str:
        """What the models list shows: `lora-<key>`, `cpt-<key>` or `base-<model name>`."""
        if self.kind == "base":
            return "base-" + re.sub(NAME_BAD_CHARS, "-", self.params["base_model"])
        return f"{'lora' if self.kind == 'adapter' else 'cpt'}-{self.key[:8]}"


def adapter_entry(
    folder: Path, key: str, llm: Mapping[str, Any], kind: str = "adapter", **upstream: str | None
) -> ModelEntry:
    """The entry of an adapter folder: its key, the base model it adapts, its upstream keys.

    `upstream`: data_key, cpt_key, corpus_key, knowledge (None values are left out).
    """
    params = {
        "base_model": str(llm["name"]),
        "base_model_key": keys.model_id(llm),
        KEY_PARAM[kind]: key,
        **{k: str(v) for k, v in upstream.items() if v is not None},
    }
    return ModelEntry(kind, key, params, folder)


def base_entry(llm: Mapping[str, Any]) -> ModelEntry:
    """The entry of a base-model spec (vanilla configs): name, revision, precision."""
    key = keys.model_id(llm)
    params = {
        "base_model": str(llm["name"]),
        "base_model_key": key,
        **{k: str(llm[k]) for k in ("revision", "dtype", "load_in_4bit") if llm.get(k) is not None},
    }
    return ModelEntry("base", key, params)


def param(model_id: str | None, name: str) -> str | None:
    """A param of the logged model `model_id` (None without the model or the param)."""
    import mlflow

    return mlflow.get_logged_model(model_id).params.get(name) if model_id else None


def find(entry: ModelEntry, experiment_id: str) -> str | None:
    """The newest READY logged model of this kind and key in the experiment, or None."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    found = mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{KEY_TAG}` = '{entry.key}' AND tags.`{KIND_TAG}` = '{entry.kind}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        output_format="list",
    )
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return ready[0].model_id if ready else None


def find_or_log(entry: ModelEntry, cache_dir: str | Path) -> tuple[str, bool]:
    """The entry's logged model in the active run's experiment: found, or created here.

    Returns (model id, whether this call created it). The lock (under `paths.cache`) makes the
    look-up and the creation one step for parallel jobs that want the same entry.
    """
    import mlflow

    experiment_id = mlflow.active_run().info.experiment_id
    where = Path(cache_dir) / "logged_models" / stable_hash([experiment_id, entry.kind, entry.key])
    with lock(where, "create"):
        found = find(entry, experiment_id)
        return (found, False) if found else (_create(entry), True)


def _create(entry: ModelEntry) -> str:
    """Log the entry: the adapter folder as its artifacts (READY once uploaded), or external."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    tags = {KEY_TAG: entry.key, KIND_TAG: entry.kind}
    params, model_type = dict(entry.params), MODEL_TYPES[entry.kind]
    if entry.folder is None:
        model = mlflow.create_external_model(
            name=entry.name, tags=tags, params=params, model_type=model_type
        )
        return model.model_id
    model = mlflow.initialize_logged_model(
        name=entry.name, tags=tags, params=params, model_type=model_type
    )
    client = mlflow.MlflowClient()
    try:
        client.log_model_artifacts(model.model_id, str(entry.folder))
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def log_trained(entry: ModelEntry, cache_dir: str | Path) -> str:
    """A training run's adapter as its output model (a reused adapter's existing entry).

    Returns the model id, so the run's final numbers can be linked to it.
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput

    model_id, created = find_or_log(entry, cache_dir)
    if created:
        mlflow.log_outputs([LoggedModelOutput(model_id, step=0)])
    return model_id


def resolve(uri: str) -> str | None:
    """The logged model behind `models:/<id>`, `models:/<name>@<alias>` or `models:/<name>/<v>`.

    None for a registered version that has no logged model (registered from a run's files).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    ref = uri.removeprefix("models:/").strip("/")
    client = mlflow.MlflowClient()
    try:
        if "@" not in ref and "/" not in ref:
            return client.get_logged_model(ref).model_id
        if "@" in ref:
            version = client.get_model_version_by_alias(*ref.split("@", 1))
        else:
            version = client.get_model_version(*ref.split("/", 1))
    except MlflowException as err:
        raise QaLabError(f"model.adapter={uri}: {str(err).splitlines()[0][:160]}") from None
    # the SQLite registry leaves `model_id` empty; the source is then `models:/<model id>`
    source = str(version.source or "")
    from_source = source.removeprefix("models:/") if source.startswith("models:/") else None
    return version.model_id or (from_source if from_source and "/" not in from_source else None)


@contextlib.contextmanager
def evaluating(
    llm: Mapping[str, Any],
    adapter: Path | None,
    model_key: str,
    given: str | None,
    cache_dir: str | Path,
) -> Iterator[str | None]:
    """Link every metric and trace logged inside (an evaluate run) to the model it evaluates.

    The model: a `models:/` adapter's own entry; a cached or given adapter's entry by its key
    (a folder with a manifest: the train key it was trained under; else `model_key` without
    its `lora:` prefix), logged here if missing; vanilla: the base-model entry.
    """
    import mlflow

    if adapter is None:
        model_id, kind = find_or_log(base_entry(llm), cache_dir)[0], "base"
    elif given and str(given).startswith("models:/"):
        model_id, kind = resolve(str(given)), "adapter"
    else:
        manifest = read_manifest(adapter) if is_finished(adapter) else {}
        key = manifest.get("key") or model_key.removeprefix("lora:")
        entry = adapter_entry(adapter, key, llm, data_key=manifest.get("data_key"))
        model_id, kind = find_or_log(entry, cache_dir)[0], "adapter"
    if model_id is None:
        yield None
        return
    tracking.set_tags({RUN_TAG: model_id, RUN_KIND_TAG: kind})
    with mlflow.set_active_model(model_id=model_id):
        yield model_id


def check_registration(tracking_cfg: Any) -> None:
    """Refuse bad `tracking.rank_by` / `tracking.register` values before any job runs.

    The name must be one MLflow's registry accepts (no '/' or ':').
    """
    metric = tracking_cfg.get("rank_by")
    if not isinstance(metric, str | None) or (metric and not re.fullmatch(r"[\w/.-]+", metric)):
        raise QaLabError(f"tracking.rank_by={metric!r}: expected a metric name, e.g. rougeL_f1")
    name = tracking_cfg.get("register")
    if name is None:
        return
    if not isinstance(name, str) or not name.strip() or re.search(r"[/:]", name):
        raise QaLabError(
            f"tracking.register={name!r}: expected a registered model name without '/' or ':' "
            "(or null to register nothing)"
        )


def register_best(parent_run_id: str, name: str, metric: str) -> Any:
    """Register a sweep's best LoRA adapter by `metric` under `name`, with the alias `best`.

    Candidates are the sweep's finished evaluate runs linked to an adapter entry; the best is
    the highest mean (lowest for a rate where lower is better). Returns the ModelVersion, or
    None (said on stderr) when the sweep evaluated no adapter.
    """
    import mlflow

    from qa_lab.metrics import HIGHER_IS_BETTER

    runs = [
        r
        for r in tracking.child_runs(parent_run_id)
        if r["status"] == "FINISHED"
        and r["tags"].get(f"{tracking.TAG_PREFIX}{RUN_KIND_TAG}") == "adapter"
    ]
    if not runs:
        print(
            f"tracking.register={name}: no LoRA run in sweep {parent_run_id}; nothing registered",
            flush=True,
        )
        return None
    scored = [r for r in runs if metric in r["metrics"]]
    if not scored:
        raise QaLabError(
            f"tracking.rank_by={metric}: not a metric of the LoRA runs of sweep {parent_run_id}"
        )
    sign = 1 if HIGHER_IS_BETTER.get(metric, True) else -1
    best = max(scored, key=lambda r: sign * r["metrics"][metric])
    model_id = best["tags"][f"{tracking.TAG_PREFIX}{RUN_TAG}"]
    version = mlflow.register_model(f"models:/{model_id}", name)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, BEST_ALIAS, version.version)
    value = best["metrics"][metric]
    client.update_model_version(
        name,
        version.version,
        description=(
            f"Best of {len(scored)} LoRA runs of sweep run {parent_run_id} by {metric} "
            f"({value:.4f}): evaluate run {best['name']}"
        ),
    )
    print(
        f"registered models:/{name}@{BEST_ALIAS} (version {version.version}, {metric}={value:.4f})"
    )
    return version
