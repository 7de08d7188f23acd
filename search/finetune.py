"""Fine-tuning: unfreeze the top of a frozen-backbone trial's base and train the whole model end
to end at a low learning rate, to see whether it pays beyond the head alone.

The best (or a chosen) complete trial of a frozen backbone is assembled into its end-to-end
model (search.champion_model.assemble), the top K weighted layers of its backbone are unfrozen
(BatchNormalization layers stay frozen, so they keep running on their ImageNet statistics), and
it trains on the prepared images with the trial's loss, class weights and optimizer family.
Validation macro-F1 is scored before training and after every epoch; the best epoch becomes a
new trial of the study (user attrs stage="finetune", finetuned_from=N, checkpoint_kind="full")
with its checkpoint in the artifact store, so promote-best promotes it if it is the best.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import optuna
import pandas as pd
from optuna.artifacts import download_artifact, upload_artifact
from optuna.artifacts._protocol import ArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import save_plotly_graph_object

from search.champion_model import assemble
from search.dataset import PreparedData, load_prepared
from search.errors import ConfigError, RegistryError
from search.metrics import compute_metrics, macro_f1
from search.progress import Progress
from search.registry import best_trial
from search.settings import Settings
from search.study import load, open_artifact_store, open_storage
from search.trial import (
    CHECKPOINT_NAME,
    HISTORY_NAME,
    Batches,
    learning_curves,
    make_loss,
    make_optimizer,
)

STAGE = "finetune"
EVAL_BATCH = 64


def finetune(
    settings: Settings,
    *,
    trial: int | None = None,
    unfreeze: int = 20,
    epochs: int = 5,
    learning_rate: float = 1e-4,
    log: Callable[[str], None] | None = None,
    extra_attrs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune trial `trial` (default: the best frozen-backbone trial) and record the result as
    a new trial (with `extra_attrs` among its user attrs, e.g. rerun_of). Returns the numbers and
    a one-paragraph "summary". The seed is the source trial's, so a repeat gives the same model."""
    say = log if log is not None else _stderr
    if unfreeze < 1:
        raise ConfigError(f"--unfreeze must be at least 1 layer, got {unfreeze}")
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise ConfigError(f"--learning-rate must be a positive number, got {learning_rate}")
    started = time.monotonic()
    storage = open_storage(settings, heartbeat=False)
    study = load(storage, settings)
    attrs = study.user_attrs
    data = load_prepared(settings.data_dir)
    if attrs.get("data_hash") != data.data_hash:
        raise ConfigError(
            f"{settings.data_dir} is not the data study {settings.study!r} was run on: "
            "prepare the same source again, or point --data-dir at it"
        )
    source = pick_trial(study, trial)
    params = dict(source.params)
    seed = int(source.user_attrs.get("seed", settings.seed))
    store = open_artifact_store(settings)

    with tempfile.TemporaryDirectory(prefix="search-finetune-") as tmp:
        checkpoint = Path(tmp) / "source.keras"
        try:
            download_artifact(
                artifact_store=store,
                file_path=str(checkpoint),
                artifact_id=source.user_attrs["checkpoint"],
            )
        except ArtifactNotFound:
            raise RegistryError(
                f"the checkpoint of trial {source.number} is not in the artifact store "
                f"({settings.artifact_url or settings.artifacts_dir}): point --artifacts-dir "
                "(or SEARCH_ARTIFACT_URL) at the study's artifact store"
            ) from None
        keras.backend.clear_session()
        keras.utils.set_random_seed(seed)
        model = assemble(source, checkpoint, data, settings, attrs)
        backbone = model.get_layer(f"{params['backbone']}_features")
        unfrozen = unfreeze_top(backbone, unfreeze)
        if not unfrozen:
            raise ConfigError(f"{params['backbone']} has no layer with weights to unfreeze")
        n_weights = int(sum(np.prod(w.shape) for w in model.trainable_weights))
        say(
            f"finetune: trial {source.number} ({params['backbone']}), unfroze "
            f"{len(unfrozen)} layers ({unfrozen[0]} .. {unfrozen[-1]}), {n_weights:,} trainable "
            f"weights with the head, lr {learning_rate:g}, {epochs} epochs"
        )
        result = _train(model, data, params, seed, epochs, learning_rate, say)
        history = pd.DataFrame(result["rows"])
        model.set_weights(result["best_weights"])
        model.save(Path(tmp) / CHECKPOINT_NAME)
        history.to_csv(Path(tmp) / HISTORY_NAME, index=False)
        user_attrs = {
            "stage": STAGE,
            "finetuned_from": source.number,
            "unfreeze": unfreeze,
            "unfrozen_layers": unfrozen,
            "trainable_weights": n_weights,
            "finetune_learning_rate": learning_rate,
            "finetune_epochs": epochs,
            "finetune_seed": seed,
            "checkpoint_kind": "full",
            "best_epoch": result["best_epoch"],
            "epochs_run": epochs,
            "val_macro_f1_before": result["before"],
            "train_seconds": round(time.monotonic() - started, 2),
            **{f"val_{k}": v for k, v in result["best_metrics"].items()},
            **(extra_attrs or {}),
        }
        number = record_trial(
            study, storage, store, source, result["best_value"], user_attrs, Path(tmp)
        )
    save_plotly_graph_object(
        study, learning_curves(history, number), graph_object_id=f"curves-{number}"
    )
    best = best_trial(study)  # what promote-best would promote now
    before, after = result["before"], result["best_value"]
    verdict = (
        "it is now the study's best trial: promote-best will promote it"
        if best.number == number
        else f"trial {best.number} stays the best ({best.value:.3f})"
    )
    seconds = time.monotonic() - started
    summary = (
        f"fine-tuned trial {source.number} ({params['backbone']}, top {len(unfrozen)} layers "
        f"unfrozen, {epochs} epochs at lr {learning_rate:g}, {seconds:.0f}s): val macro-F1 "
        f"{before:.3f} -> {after:.3f} ({after - before:+.3f}, best at epoch "
        f"{result['best_epoch']}); "
        f"recorded as trial {number}; {verdict}"
    )
    return {
        "trial": number,
        "finetuned_from": source.number,
        "before": before,
        "after": after,
        "source_value": source.value,
        "best_epoch": result["best_epoch"],
        "history": result["rows"],
        "unfrozen_layers": unfrozen,
        "trainable_weights": n_weights,
        "seconds": round(seconds, 2),
        "summary": summary,
    }


def pick_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    """The given trial, or the best complete trial whose checkpoint is a head on a frozen base."""
    if number is None:
        heads = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and t.user_attrs.get("checkpoint_kind") == "head"
        ]
        if not heads:
            raise ConfigError(
                f"study {study.study_name!r} has no complete trial of a frozen backbone to "
                "fine-tune: run `search worker --weights imagenet` first"
            )
        return max(heads, key=lambda t: (t.value, -t.number))
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise ConfigError(f"study {study.study_name!r} has no trial {number}")
    chosen = trials[number]
    if chosen.state != TrialState.COMPLETE or "checkpoint" not in chosen.user_attrs:
        raise ConfigError(
            f"trial {number} is {chosen.state.name.lower()} without a checkpoint: "
            "pick a complete trial (see `search status`)"
        )
    if chosen.user_attrs.get("checkpoint_kind") != "head":
        raise ConfigError(
            f"trial {number} ({chosen.params.get('backbone')}) already trained end to end, so "
            "nothing is frozen to unfreeze: pick a trial of a frozen ImageNet backbone"
        )
    return chosen


def unfreeze_top(backbone: keras.Model, k: int) -> list[str]:
    """Make the top `k` weighted layers of `backbone` trainable, BatchNormalization excepted (a
    frozen BN layer runs in inference mode, so small batches cannot wreck its statistics).
    Returns the names of the unfrozen layers, lowest first."""
    backbone.trainable = True  # containers must be trainable for their layers' weights to be
    weighted = [layer for layer in _leaves(backbone) if layer.weights]
    candidates = [  # layers with something to learn (not e.g. a Normalization's statistics)
        layer
        for layer in weighted
        if layer.trainable_weights and not isinstance(layer, keras.layers.BatchNormalization)
    ]
    for layer in weighted:
        layer.trainable = False
    chosen = candidates[-k:]
    for layer in chosen:
        layer.trainable = True
    return [layer.name for layer in chosen]


def _leaves(layer: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    """Innermost layers in the order the model runs them (nested models flattened)."""
    inner = getattr(layer, "layers", None)
    if not inner:
        yield layer
        return
    for child in inner:
        yield from _leaves(child)


def _train(
    model: keras.Model,
    data: PreparedData,
    params: dict[str, Any],
    seed: int,
    epochs: int,
    learning_rate: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Train end to end, scoring validation macro-F1 before and after every epoch."""
    images, labels = data.arrays("train")
    val_x, val_y = data.arrays("val")
    val_x = val_x.astype(np.float32)
    inputs = keras.Input(shape=images.shape[1:], name="image")
    flipped = keras.layers.RandomFlip("horizontal", seed=seed, name="aug_flip")(inputs)
    trainer = keras.Model(inputs, model(flipped), name="finetune_trainer")  # saves `model` only
    trainer.compile(
        optimizer=make_optimizer({**params, "learning_rate": learning_rate}),
        loss=make_loss(params),
    )
    batches = Batches(images[None], labels, data, params["batch_size"], seed)

    def score() -> tuple[float, np.ndarray]:
        probs = np.asarray(model.predict(val_x, batch_size=EVAL_BATCH, verbose=0))
        return macro_f1(val_y, probs), probs

    before, _ = score()
    say(f"finetune: val macro-F1 before {before:.3f}")
    rows: list[dict[str, float]] = [{"epoch": 0, "loss": math.nan, "val_macro_f1": before}]
    best: dict[str, Any] = {"best_value": -1.0, "best_epoch": 0}
    bar = Progress(epochs * len(batches), "finetune batches", every_s=10.0)
    step = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: bar.update())
    for epoch in range(1, epochs + 1):
        epoch_start = time.monotonic()
        fit = trainer.fit(
            batches, initial_epoch=epoch - 1, epochs=epoch, callbacks=[step], verbose=0
        )
        loss = float(fit.history["loss"][-1])
        value, probs = score()
        if not math.isfinite(loss):
            raise ConfigError(
                f"fine-tuning diverged (loss {loss}) at epoch {epoch}: use a lower "
                "--learning-rate or fewer --unfreeze layers"
            )
        rows.append({"epoch": epoch, "loss": loss, "val_macro_f1": value})
        if value > best["best_value"]:
            best = {
                "best_value": value,
                "best_epoch": epoch,
                "best_weights": model.get_weights(),
                "best_metrics": compute_metrics(val_y, probs),
            }
        seconds = time.monotonic() - epoch_start
        say(
            f"finetune epoch {epoch}/{epochs} loss {loss:.3f} val_macro_f1 {value:.3f} "
            f"(before {before:.3f}, best {best['best_value']:.3f}) {seconds:.1f}s/epoch "
            f"ETA {seconds * (epochs - epoch):.0f}s"
        )
    return {"before": before, "rows": rows, **best}


def record_trial(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    store: ArtifactStore,
    source: FrozenTrial,
    value: float,
    user_attrs: dict[str, Any],
    folder: Path,
) -> int:
    """Add the fine-tuned model as a new complete trial with the source's params, its checkpoint
    and history attached as trial artifacts. Returns the new trial's number.

    The trial is created running and finished here within a moment, after training: a crash
    during training leaves nothing behind, one while recording leaves a failed trial.
    """
    template = optuna.trial.create_trial(
        state=TrialState.RUNNING,
        params=source.params,
        distributions=source.distributions,
        user_attrs=user_attrs,
    )
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.create_new_trial(study_id, template_trial=template)
    try:
        frozen = storage.get_trial(trial_id)
        for attr, name in (("checkpoint", CHECKPOINT_NAME), ("history", HISTORY_NAME)):
            artifact = upload_artifact(
                artifact_store=store,
                file_path=str(folder / name),
                study_or_trial=frozen,
                storage=storage,
            )
            storage.set_trial_user_attr(trial_id, attr, artifact)
        storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [value])
    except BaseException:
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        raise
    return frozen.number


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
