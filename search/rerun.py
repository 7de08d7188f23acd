"""Re-run a trial exactly: same params, same seed, same prepared data, as a new trial.

The copy is enqueued in the study (so it is visible in the dashboard beside the original) and
run by a worker in this process. A fine-tuned trial (stage "finetune") is re-run by
fine-tuning its source trial again with the recorded layers, epochs and learning rate.
"""

from __future__ import annotations

from typing import Any

from optuna.trial import FrozenTrial

from search.errors import ConfigError
from search.settings import Settings
from search.study import load, open_storage
from search.worker import run_worker


def rerun(settings: Settings, number: int) -> tuple[dict[str, Any], int]:
    study = load(open_storage(settings, heartbeat=False), settings)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise ConfigError(f"study {settings.study!r} has no trial {number}")
    original = trials[number]
    if "finetuned_from" in original.user_attrs:
        return _rerun_finetune(settings, original)
    if "seed" not in original.user_attrs or not original.params:
        raise ConfigError(f"trial {number} has no recorded params and seed to re-run")
    study.enqueue_trial(
        original.params,
        user_attrs={"seed": original.user_attrs["seed"], "rerun_of": number},
        skip_if_exists=False,
    )
    run_worker(settings, n_trials=None, max_trials_here=1)
    reruns = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("rerun_of") == number]
    latest = max(reruns, key=lambda t: t.number)
    values = {"original": original.value, "rerun": latest.value}
    return values, latest.number


def _rerun_finetune(settings: Settings, original: FrozenTrial) -> tuple[dict[str, Any], int]:
    from search.finetune import finetune  # imports Keras: only after a worker claimed its GPU

    attrs = original.user_attrs
    result = finetune(
        settings,
        trial=int(attrs["finetuned_from"]),
        unfreeze=int(attrs["unfreeze"]),
        epochs=int(attrs["finetune_epochs"]),
        learning_rate=float(attrs["finetune_learning_rate"]),
        extra_attrs={"rerun_of": original.number},
    )
    return {"original": original.value, "rerun": result["after"]}, int(result["trial"])
