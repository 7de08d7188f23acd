"""The objective: build a head from a trial's params, train it with pruning, store the best epoch.

Frozen backbones train only the head on cached features (search.features); the baseline CNN
trains end to end on the decoded images. Either way the objective is validation macro-F1,
reported every epoch so the pruner can stop unpromising trials.

A head trial is mostly overhead unless it is built for speed: the whole feature table goes to
the backend once (FeatureTable), the model takes example indices, so one `fit` runs every epoch
with whole epochs per execution where the backend allows (TensorFlow, JAX), and validation is
one direct call on the validation array. Pruned trials upload nothing; the storage sees one
write for the trial's attributes at its start and one at its end.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.artifacts import upload_artifact
from optuna.artifacts._protocol import ArtifactStore  # the protocol has no public alias
from optuna_dashboard import save_plotly_graph_object

from search import features as feature_cache
from search.backbones import build_backbone, get_spec, trains_end_to_end
from search.dataset import PreparedData
from search.metrics import compute_metrics, macro_f1
from search.settings import Settings
from search.space import Dimension, sample
from search.study import (
    REPORTS_EVERY_S,
    attrs_together,
    is_new_best,
    params_together,
    reports_together,
    set_user_attrs,
)

CHECKPOINT_NAME = "model.keras"
HISTORY_NAME = "history.csv"
PROBABILITIES_NAME = "probabilities.npz"  # val/test probabilities, plain and flip-averaged
BEST_CURVES_ID = "curves-best"  # one figure on the study page, replaced by each new best trial
EVAL_BYTES = 64 * 2**20  # input bytes per validation call


class TrialFailed(Exception):
    """A trial that cannot produce a result (NaN loss, out of memory): recorded, worker goes on."""


class TrialInterrupted(Exception):
    """The worker was asked to stop (SIGTERM) in the middle of a trial."""


@dataclass
class TrialEnv:
    """What all trials of one worker share."""

    settings: Settings
    data: PreparedData
    space: dict[str, Dimension]
    artifact_store: ArtifactStore
    feature_seed: int = 0
    stop_requested: Callable[[], bool] = lambda: False
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))


def trial_seed(trial: optuna.Trial, base_seed: int) -> int:
    """An enqueued seed (a re-run) wins; otherwise one derived from the trial number."""
    seed = trial.user_attrs.get("seed")
    if seed is None:
        seed = (base_seed * 1_000_003 + trial.number * 7919) % (2**31 - 1)
    return int(seed)


def objective(trial: optuna.Trial, env: TrialEnv, attrs: dict[str, Any] | None = None) -> float:
    """Validation macro-F1 of the best epoch. `attrs` (the worker's) are stored with the seed."""
    seed = trial_seed(trial, env.settings.seed)
    set_user_attrs(trial, {**(attrs or {}), "seed": seed})
    with params_together(trial):  # one transaction for all of them
        params = sample(trial, env.space)
    try:
        return _train(trial, env, params, seed)
    except TrialFailed as exc:
        trial.set_user_attr("fail_reason", str(exc)[:500])
        raise
    except (TrialInterrupted, optuna.TrialPruned):
        raise
    except Exception as exc:  # out of memory and other backend errors: fail this trial only
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        trial.set_user_attr("fail_reason", reason[:500])
        raise TrialFailed(reason) from exc


def _train(trial: optuna.Trial, env: TrialEnv, params: dict[str, Any], seed: int) -> float:
    started = time.monotonic()
    data, settings = env.data, env.settings
    n_classes = len(data.classes)
    keras.backend.clear_session()
    spec = get_spec(params["backbone"])
    attrs: dict[str, Any] = {}
    weights = data.class_weights
    if not trains_end_to_end(spec.name, settings.weights):
        feats = feature_cache.load_or_compute(
            data,
            spec.name,
            settings.weights,
            settings.features_dir,
            views=settings.feature_views,
            seed=env.feature_seed,
        )
        attrs["feature_key"] = feats.key
        keras.utils.set_random_seed(seed)
        plain = np.asarray(feats.train[0], dtype=np.float32)
        model = build_head(
            feats.dim, n_classes, params, feature_stats=(plain.mean(0), plain.var(0))
        )
        trained = with_phylum_output(model, data.phyla, params)
        train_views, train_y = np.asarray(feats.train), feats.train_labels
        val_x, val_y = np.asarray(feats.val, dtype=np.float32), feats.val_labels
        held_out = {  # what the stored probabilities are computed on, mirrored views included
            "val_flip": feats.val_flip,
            "test": feats.test,
            "test_flip": feats.test_flip,
            "test_labels": feats.test_labels,
        }
        kind = "head"
    else:
        keras.utils.set_random_seed(seed)
        images, labels = data.arrays("train")
        body = build_backbone(spec.name, data.image_size, settings.weights, trainable=True)
        head = build_head(int(body.output_shape[-1]), n_classes, params)
        inputs = keras.Input(shape=(data.image_size, data.image_size, 3), name="image")
        x = keras.layers.RandomFlip("horizontal", name="aug_flip")(inputs)  # training only
        x = keras.layers.RandomTranslation(0.1, 0.1, name="aug_shift")(x)
        x = body(x)
        model = keras.Model(inputs, head(x), name=f"{spec.name}_end_to_end")
        trained = keras.Model(
            inputs, with_phylum_output(head, data.phyla, params)(x), name="with_phylum"
        )
        train = Batches(images[None], labels, data, params["batch_size"], seed)
        val_x, val_y = data.arrays("val")
        test_x, test_y = data.arrays("test")
        held_out = {
            "val_flip": val_x[:, :, ::-1],
            "test": test_x,
            "test_flip": test_x[:, :, ::-1],
            "test_labels": test_y,
        }
        kind = "full"
    evaluator = Evaluator(trial, model, val_x, val_y, env, settings.max_epochs)
    callbacks = [
        evaluator,
        keras.callbacks.EarlyStopping(monitor="val_macro_f1", mode="max", patience=5),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_macro_f1", mode="max", factor=0.2, patience=3, min_lr=1e-6, verbose=0
        ),
    ]
    # A head trial's epochs take milliseconds on a GPU: its reports go to the database together,
    # every few seconds; an end-to-end trial's epochs are long enough to write each at once.
    with reports_together(trial, REPORTS_EVERY_S if kind == "head" else 0.0):
        if kind == "head":
            fit_on_table(
                trained,
                train_views,
                train_y,
                weights,
                params,
                settings.max_epochs,
                callbacks,
                seed,
                table_key=feats.key,
                phyla=data.phyla,
            )
        else:
            trained.compile(optimizer=make_optimizer(params), loss=make_loss(params, data.phyla))
            trained.fit(train, epochs=settings.max_epochs, callbacks=callbacks, verbose=0)
    history = pd.DataFrame(evaluator.rows)
    attrs["epochs_run"] = len(history)
    if evaluator.nan_epoch is not None or evaluator.interrupted or evaluator.pruned:
        set_user_attrs(trial, attrs)  # nothing uploaded: its curve is in its intermediate values
    if evaluator.nan_epoch is not None:
        raise TrialFailed(f"loss became NaN at epoch {evaluator.nan_epoch}")
    if evaluator.interrupted:
        raise TrialInterrupted(f"stopped by signal at epoch {len(history)}")
    if evaluator.pruned:
        raise optuna.TrialPruned(f"pruned at epoch {len(history)}")
    model.set_weights(evaluator.best_weights)
    probabilities = held_out_probabilities(model, evaluator.best_probs, val_y, held_out)
    # The uploads' records and the attributes: one transaction at the block's end.
    with attrs_together(trial), tempfile.TemporaryDirectory(prefix="search-trial-") as tmp:
        csv, checkpoint = Path(tmp) / HISTORY_NAME, Path(tmp) / CHECKPOINT_NAME
        probs_file = Path(tmp) / PROBABILITIES_NAME
        history.to_csv(csv, index=False)
        model.save(checkpoint)
        np.savez(probs_file, **probabilities)
        for attr, path in (
            ("history", csv),
            ("checkpoint", checkpoint),
            ("probabilities", probs_file),
        ):
            attrs[attr] = upload_artifact(
                artifact_store=env.artifact_store, file_path=str(path), study_or_trial=trial
            )
        best_metrics = compute_metrics(val_y, evaluator.best_probs)
        attrs.update({f"val_{name}": value for name, value in best_metrics.items()})
        attrs["val_macro_f1_flip"] = macro_f1(val_y, probabilities["val_flip"].astype(np.float32))
        attrs.update(
            checkpoint_kind=kind,
            best_epoch=evaluator.best_epoch,
            train_seconds=round(time.monotonic() - started, 2),
        )
        set_user_attrs(trial, attrs)
    if is_new_best(trial, evaluator.best_value):
        save_plotly_graph_object(
            trial.study,
            learning_curves(history, trial.number, best=True),
            graph_object_id=BEST_CURVES_ID,
        )
    return evaluator.best_value


def held_out_probabilities(
    model: keras.Model, val_probs: np.ndarray, val_labels: np.ndarray, held_out: dict[str, Any]
) -> dict[str, np.ndarray]:
    """The kept model's probabilities on val and test, plain and averaged with the mirrored
    view (what a flip-TTA champion predicts), as float16: ensemble selection and TTA choices
    are made from these without running any model again. At 202 families that is about 1.5 MB
    a trial, a third of a one-layer head's checkpoint."""
    val_flip = predict(model, np.asarray(held_out["val_flip"]))
    test = predict(model, np.asarray(held_out["test"]))
    test_flip = predict(model, np.asarray(held_out["test_flip"]))
    return {
        "val": val_probs.astype(np.float16),
        "val_flip": ((val_probs + val_flip) / 2).astype(np.float16),
        "test": test.astype(np.float16),
        "test_flip": ((test + test_flip) / 2).astype(np.float16),
        "val_labels": np.asarray(val_labels, dtype=np.int32),
        "test_labels": np.asarray(held_out["test_labels"], dtype=np.int32),
    }


def fit_on_table(
    model: keras.Model,
    views: np.ndarray,
    labels: np.ndarray,
    class_weights: dict[int, float],
    params: dict[str, Any],
    epochs: int,
    callbacks: list[keras.callbacks.Callback],
    seed: int,
    table_key: str | None = None,
    phyla: list[str] | None = None,
) -> None:
    """Train `model` on every example of `views` (V, n, ...) in one `fit`: the table goes to the
    backend once, each step gathers its examples there, and a whole epoch runs per execution
    where the backend allows (the PyTorch backend runs one step per call). With `table_key`
    (the feature cache's key) the table is made once per process and kept for later trials."""
    table = feature_table(views, seed, table_key)
    index = keras.Input(shape=(), dtype="int32", name="example")
    trainer = keras.Model(index, model(table(index)), name="table_trainer")
    n = int(views.shape[1])
    # Targets are families; a phylum output (with_phylum_output) adds columns to the model's.
    n_classes = len(phyla) if phyla is not None else int(model.output_shape[-1])
    trainer.compile(
        optimizer=make_optimizer(params),
        loss=make_loss(params, phyla),
        # XLA compiles every trial's step anew, which costs more than a head trial saves.
        jit_compile=False,
        steps_per_execution=1
        if keras.backend.backend() == "torch"
        else math.ceil(n / params["batch_size"]),
    )
    trainer.fit(
        np.arange(n, dtype=np.int32),
        np.eye(n_classes, dtype=np.float32)[labels],
        sample_weight=np.array([class_weights[int(y)] for y in labels], dtype=np.float32),
        batch_size=params["batch_size"],
        epochs=epochs,
        shuffle=True,
        callbacks=callbacks,
        verbose=0,
    )


_TABLES: dict[str, FeatureTable] = {}


def feature_table(views: np.ndarray, seed: int, key: str | None) -> FeatureTable:
    """The trial's feature table, its random choice of views started from `seed`. One table per
    feature cache and process, kept for every later trial: TensorFlow never frees a table made
    for a trial, so a worker grew by the table's size with every trial (70 MB at 202 families:
    3 views x 8,664 images x 1,280 float16; benchmarks/full_scale.py) and passed 6 GB within
    a hundred trials. A kept table holds the same values and is reseeded, so the trial learns
    exactly what it would with a new one (`search rerun` checks this)."""
    if key is None:
        return FeatureTable(views, seed=seed, name="train_table")
    table = _TABLES.get(key)
    if table is None or (table.n_views, table.n_examples) != views.shape[:2]:
        table = _TABLES[key] = FeatureTable(views, seed=seed, name="train_table")
    table.reseed(seed)
    return table


class FeatureTable(keras.layers.Layer):
    """Every cached view of the training features, held by the backend for the whole trial.

    The model takes example indices; in training each index picks one of the example's views at
    random (the augmented views act as augmentation), otherwise the plain view. So no batch is
    assembled in Python and the table crosses to the device once per trial. Stored as it is
    cached (float16) and cast per batch."""

    def __init__(self, views: np.ndarray, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_views, self.n_examples = int(views.shape[0]), int(views.shape[1])
        flat = views.reshape(self.n_views * self.n_examples, *views.shape[2:])
        self.table = self.add_weight(
            shape=flat.shape, dtype=str(flat.dtype), trainable=False, name="table"
        )
        self.table.assign(flat)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def reseed(self, seed: int) -> None:
        """The state a new SeedGenerator(seed) starts from."""
        state = self.seed_generator.state
        state.assign(keras.ops.convert_to_tensor([seed, 0], dtype=state.dtype))

    def call(self, index: Any, training: bool = False) -> Any:
        index = keras.ops.cast(index, "int32")
        if training and self.n_views > 1:
            view = keras.random.randint(
                keras.ops.shape(index), 0, self.n_views, seed=self.seed_generator, dtype="int32"
            )
            index = view * self.n_examples + index
        return keras.ops.cast(keras.ops.take(self.table, index, axis=0), "float32")


def predict(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Probabilities from direct calls on large slices: no predict function to trace per trial,
    no Python batching."""
    rows = max(1, EVAL_BYTES // max(1, int(np.prod(x.shape[1:])) * 4))
    return np.concatenate(
        [
            keras.ops.convert_to_numpy(model(x[i : i + rows].astype(np.float32), training=False))
            for i in range(0, len(x), rows)
        ]
    )


def build_head(
    input_dim: int,
    n_classes: int,
    params: dict[str, Any],
    feature_stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> keras.Model:
    """1-3 dense layers (units, dropout each), optional batch norm, softmax over families.

    With `feature_stats` (mean, variance of the training features) the head first standardises
    its input: backbones emit features on very different scales, and one learning-rate range
    must suit them all.
    """
    inputs = keras.Input(shape=(input_dim,), name="features")
    x = inputs
    if feature_stats is not None:
        mean, var = feature_stats
        x = keras.layers.Normalization(mean=mean, variance=var + 1e-6, name="standardize")(x)
    for i in range(params["n_layers"]):
        x = keras.layers.Dense(
            params[f"units_{i}"], use_bias=not params["batch_norm"], name=f"dense{i}"
        )(x)
        if params["batch_norm"]:
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        x = keras.layers.Dropout(params[f"dropout_{i}"], name=f"dropout{i}")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="family")(x)
    return keras.Model(inputs, outputs, name="head")


def with_phylum_output(head: keras.Model, phyla: list[str], params: dict[str, Any]) -> keras.Model:
    """What a trial trains: `head` itself, or, with a phylum_loss_weight above 0, `head` plus an
    auxiliary phylum softmax on its last hidden layer, output beside the family probabilities
    (one array: families, then phyla). Taxonomy is free supervision: families of one phylum
    share features the head should learn. The auxiliary output is dropped after training: the
    kept head, its checkpoint and the champion predict families only."""
    if params.get("phylum_loss_weight", 0.0) <= 0 or len(set(phyla)) < 2:
        return head  # one phylum: nothing to learn from it
    hidden = head.get_layer(f"dropout{params['n_layers'] - 1}").output
    phylum = keras.layers.Dense(
        len(sorted(set(phyla))), activation="softmax", dtype="float32", name="phylum"
    )(hidden)
    both = keras.layers.Concatenate(name="family_and_phylum")([head.output, phylum])
    return keras.Model(head.inputs, both, name="head_with_phylum")


def make_loss(params: dict[str, Any], phyla: list[str] | None = None) -> keras.losses.Loss:
    """Family cross-entropy; with the classes' phyla and a phylum_loss_weight above 0, the
    loss of with_phylum_output's model."""
    smoothing = params["label_smoothing"]
    weight = float(params.get("phylum_loss_weight", 0.0))
    if weight <= 0 or phyla is None or len(set(phyla)) < 2:
        return keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)
    return PhylumAwareLoss(phyla, weight, smoothing)


class PhylumAwareLoss(keras.losses.Loss):
    """Family cross-entropy plus `weight` x the phylum output's cross-entropy against the true
    family's phylum. Takes family one-hot targets and the (families + phyla) output of
    with_phylum_output; the phylum targets are the family targets times a fixed 0/1 matrix."""

    def __init__(
        self, phyla: list[str], weight: float, label_smoothing: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(name="family_and_phylum_crossentropy", **kwargs)
        names = sorted(set(phyla))
        membership = np.zeros((len(phyla), len(names)), dtype=np.float32)
        membership[np.arange(len(phyla)), [names.index(p) for p in phyla]] = 1.0
        self.membership, self.weight, self.label_smoothing = membership, weight, label_smoothing
        self.n_families = len(phyla)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        families = y_pred[:, : self.n_families]
        phyla = y_pred[:, self.n_families :]
        phylum_true = keras.ops.matmul(y_true, keras.ops.convert_to_tensor(self.membership))
        return keras.losses.categorical_crossentropy(
            y_true, families, label_smoothing=self.label_smoothing
        ) + self.weight * keras.losses.categorical_crossentropy(phylum_true, phyla)


def make_optimizer(params: dict[str, Any]) -> keras.optimizers.Optimizer:
    lr, wd = params["learning_rate"], params["weight_decay"]
    name = params["optimizer"]
    if name == "adam":
        return keras.optimizers.Adam(lr, weight_decay=wd)
    if name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=wd)
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(lr, weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}")


class Batches(keras.utils.PyDataset):
    """Shuffled batches with class weights as sample weights. `views` has shape (V, n, ...):
    each epoch draws one view per example, so augmented feature views act as augmentation."""

    def __init__(
        self, views: np.ndarray, labels: np.ndarray, data: PreparedData, batch_size: int, seed: int
    ) -> None:
        super().__init__()
        self.views, self.labels, self.batch_size, self.seed = views, labels, batch_size, seed
        self.n_classes = len(data.classes)
        weights = data.class_weights
        self.sample_weights = np.array([weights[int(y)] for y in labels], dtype=np.float32)
        self.epoch = 0
        self._shuffle()

    def _shuffle(self) -> None:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.labels)
        self.order = rng.permutation(n)
        self.view_of = rng.integers(0, len(self.views), size=n)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])
        x = self.views[self.view_of[idx], idx].astype(np.float32)
        y = np.eye(self.n_classes, dtype=np.float32)[self.labels[idx]]
        return x, y, self.sample_weights[idx]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._shuffle()


class Evaluator(keras.callbacks.Callback):
    """Scores the validation split each epoch with `scored` (the model that is kept: the head,
    or the end-to-end model), reports it to Optuna, keeps the best weights and probabilities,
    and stops training when the pruner says so, the loss is NaN, or the worker must stop."""

    def __init__(
        self,
        trial: optuna.Trial,
        scored: keras.Model,
        val_x: np.ndarray,
        val_y: np.ndarray,
        env: TrialEnv,
        epochs: int,
    ) -> None:
        super().__init__()
        self.trial, self.scored, self.env, self.epochs = trial, scored, env, epochs
        self.val_x, self.val_y = val_x, val_y
        self.best_value = -1.0
        self.best_epoch = -1
        self.best_weights: list[np.ndarray] = []
        self.best_probs = np.zeros((0, 0))
        self.rows: list[dict[str, float]] = []
        self.pruned = self.interrupted = False
        self.nan_epoch: int | None = None
        self._epoch_start = time.monotonic()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = time.monotonic()
        if self.env.stop_requested():
            self.interrupted = True
            self.model.stop_training = True

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.env.stop_requested():
            self.interrupted = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        loss = float(logs.get("loss", float("nan")))
        probs = predict(self.scored, self.val_x)
        if not math.isfinite(loss) or not np.all(np.isfinite(probs)):
            self.nan_epoch = epoch + 1
            self.model.stop_training = True
            logs["val_macro_f1"] = 0.0
            return
        value = macro_f1(self.val_y, probs)
        logs["val_macro_f1"] = value
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.rows.append(
            {"epoch": epoch + 1, "loss": loss, "val_macro_f1": value, "learning_rate": lr}
        )
        if value > self.best_value:
            self.best_value, self.best_epoch = value, epoch + 1
            self.best_weights = self.scored.get_weights()
            self.best_probs = probs
        seconds = time.monotonic() - self._epoch_start
        self.env.log(
            f"trial {self.trial.number} epoch {epoch + 1}/{self.epochs} loss {loss:.3f} "
            f"val_macro_f1 {value:.3f} (best {self.best_value:.3f}) {seconds:.2f}s/epoch "
            f"ETA {seconds * (self.epochs - epoch - 1):.0f}s"
        )
        self.trial.report(value, epoch + 1)
        if self.trial.should_prune():
            self.pruned = True
            self.model.stop_training = True
        if self.env.stop_requested():
            self.interrupted = True
            self.model.stop_training = True


def learning_curves(history: pd.DataFrame, trial_number: int, best: bool = False) -> go.Figure:
    """Train loss and validation macro-F1 per epoch. The study page of the dashboard shows the
    best trial's (one figure, replaced when a better trial completes, so the study does not grow
    with every trial); every trial's curve is its history.csv artifact and its intermediate
    values."""
    fig = go.Figure()
    if not history.empty:
        fig.add_scatter(x=history["epoch"], y=history["loss"], name="train loss")
        fig.add_scatter(
            x=history["epoch"], y=history["val_macro_f1"], name="val macro-F1", yaxis="y2"
        )
    fig.update_layout(
        title=f"{'Best trial so far, ' if best else ''}trial {trial_number}: learning curves",
        xaxis_title="epoch",
        yaxis={"title": "train loss"},
        yaxis2={"title": "val macro-F1", "overlaying": "y", "side": "right", "range": [0, 1]},
    )
    return fig
