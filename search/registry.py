"""The champion registry under models/: promote the best trial, load the champion.

Layout:
    models/history/<time>-<study>-<trial>/   every champion ever promoted, kept whole
    models/champion -> history/<id>           a relative symlink to the current one

A promotion writes a complete new version folder first and then swaps the `champion` link with
one atomic rename, so a crash at any point leaves the previous champion whole and current. A
file lock makes concurrent promotions fail fast instead of interleaving.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import optuna
from filelock import FileLock, Timeout
from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.trial import TrialState

from search.backbones import build_backbone
from search.dataset import PreparedData, load_prepared
from search.errors import PromotionInProgress, RegistryError
from search.features import feature_key
from search.metrics import compute_metrics
from search.settings import Settings
from search.study import load, open_storage, redact

MODEL_FILE = "model.keras"
INFO_FILE = "champion.json"
PREDICT_BATCH = 64


@dataclass
class Champion:
    path: Path
    model: Any
    info: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def phyla(self) -> list[str]:
        return list(self.info["phyla"])

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for uint8 images (n, size, size, 3)."""
        chunks = [
            np.asarray(
                self.model.predict_on_batch(images[i : i + PREDICT_BATCH].astype(np.float32))
            )
            for i in range(0, len(images), PREDICT_BATCH)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes)), np.float32)


def champion_link(models_dir: Path) -> Path:
    return Path(models_dir) / "champion"


def load_champion(models_dir: Path, path: Path | None = None) -> Champion:
    """Load the current champion (or the version at `path`)."""
    folder = Path(path) if path is not None else champion_link(models_dir)
    if not folder.exists():
        raise RegistryError(f"no champion at {folder}: run promote-best first")
    try:
        info = json.loads((folder / INFO_FILE).read_text())
        model = keras.models.load_model(folder / MODEL_FILE, compile=False)
    except Exception as exc:
        raise RegistryError(
            f"champion at {folder} fails to load ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); promote again with --force "
            "or roll back to an earlier version"
        ) from None
    return Champion(folder.resolve(), model, info)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and "checkpoint" in t.user_attrs
    ]
    if not complete:
        raise RegistryError(
            f"study {study.study_name!r} has no complete trial to promote: "
            "run `search worker` first"
        )
    return max(complete, key=lambda t: (t.value, -t.number))


def assemble(
    trial: optuna.trial.FrozenTrial,
    checkpoint: Path,
    data: PreparedData,
    settings: Settings,
    study_attrs: dict[str, Any],
) -> keras.Model:
    """One end-to-end model taking raw RGB images: preprocessing + frozen backbone + head."""
    trained = keras.models.load_model(checkpoint, compile=False)
    if trial.user_attrs.get("checkpoint_kind") == "full":
        return trained
    name = trial.params["backbone"]
    weights = study_attrs["weights"]
    seed = int(study_attrs["feature_seed"])
    cached = (
        Path(settings.features_dir)
        / feature_key(data, name, weights, int(study_attrs["feature_views"]), seed)
        / "backbone.weights.h5"
    )
    keras.utils.set_random_seed(seed)
    if cached.exists():
        backbone = build_backbone(name, data.image_size, "none")
        backbone.load_weights(cached)
    else:  # no feature cache here: rebuild the same weights from their source
        backbone = build_backbone(name, data.image_size, weights)
    inputs = keras.Input(shape=(data.image_size, data.image_size, 3), name="image")
    outputs = trained(backbone(inputs))
    return keras.Model(inputs, outputs, name=f"{name}_champion")


def promote_best(settings: Settings, *, force: bool = False) -> dict[str, Any]:
    """Promote the study's best complete trial to models/champion, atomically."""
    models_dir = Path(settings.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(models_dir / ".registry.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise PromotionInProgress(
            f"another promotion holds {models_dir / '.registry.lock'}: wait for it to finish, "
            "then run promote-best again"
        ) from None
    try:
        return _promote_locked(settings, models_dir, force)
    finally:
        lock.release()


def _promote_locked(settings: Settings, models_dir: Path, force: bool) -> dict[str, Any]:
    study = load(open_storage(settings, heartbeat=False), settings)
    attrs = study.user_attrs
    trial = best_trial(study)
    data = load_prepared(settings.data_dir)
    if attrs.get("data_hash") != data.data_hash:
        raise RegistryError(
            f"{settings.data_dir} is not the data study {settings.study!r} was run on: "
            "prepare the same source again, or point --data-dir at it"
        )
    current = _current_info(models_dir)
    if (
        current
        and current.get("study") == study.study_name
        and current.get("trial") == trial.number
    ):
        return {"promoted": False, "reason": "already champion", **current}
    history = models_dir / "history"
    history.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    version = f"{stamp}-{study.study_name}-{trial.number}"
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=history))
    try:
        store = FileSystemArtifactStore(str(settings.artifacts_dir))
        checkpoint = staging / "trial_checkpoint.keras"
        download_artifact(
            artifact_store=store,
            file_path=str(checkpoint),
            artifact_id=trial.user_attrs["checkpoint"],
        )
        keras.backend.clear_session()
        model = assemble(trial, checkpoint, data, settings, attrs)
        checkpoint.unlink()
        images, labels = data.arrays("test")
        probs = _predict(model, images)
        test_metrics = compute_metrics(labels, probs)
        comparison = _compare_with_current(models_dir, images, labels, test_metrics, force)
        model.save(staging / MODEL_FILE)
        info = {
            "version": version,
            "study": study.study_name,
            "trial": trial.number,
            "storage": redact(settings.storage),
            "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "backbone": trial.params["backbone"],
            "weights": attrs.get("weights"),
            "image_size": data.image_size,
            "classes": data.classes,
            "phyla": data.phyla,
            "data_hash": data.data_hash,
            "split_by": data.info.get("split_by", "image"),
            "params": trial.params,
            "seed": trial.user_attrs.get("seed"),
            "validation": {
                k.removeprefix("val_"): v
                for k, v in trial.user_attrs.items()
                if k.startswith("val_")
            },
            "test": test_metrics,
            "previous": comparison,
            "n_trials": len(study.trials),
        }
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        _fsync_tree(staging)
        final = history / version
        if final.exists():
            final = history / f"{version}-{uuid.uuid4().hex[:6]}"
            info["version"] = final.name
            (staging / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        staging.rename(final)
        point_champion_at(models_dir, final)
        return {"promoted": True, **info}
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _predict(model: keras.Model, images: np.ndarray) -> np.ndarray:
    chunks = [
        np.asarray(model.predict_on_batch(images[i : i + PREDICT_BATCH].astype(np.float32)))
        for i in range(0, len(images), PREDICT_BATCH)
    ]
    return np.concatenate(chunks)


def _current_info(models_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((champion_link(models_dir) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


def _compare_with_current(
    models_dir: Path, images: np.ndarray, labels: np.ndarray, new: dict[str, float], force: bool
) -> dict[str, Any] | None:
    """Score the current champion on the same test split; refuse to replace a better one."""
    if not champion_link(models_dir).exists():
        return None
    try:
        current = load_champion(models_dir)
        if current.image_size != images.shape[1]:
            raise RegistryError("the current champion was trained at another image size")
        old = compute_metrics(labels, current.predict(images))
    except RegistryError as exc:
        if not force:
            raise RegistryError(f"{exc}; use --force to replace it anyway") from None
        return {"version": None, "error": str(exc)}
    if old["macro_f1"] > new["macro_f1"] and not force:
        raise RegistryError(
            f"the current champion {current.info.get('version')} is better on the test split "
            f"(macro-F1 {old['macro_f1']:.4f} > {new['macro_f1']:.4f}); use --force to replace it"
        )
    return {
        "version": current.info.get("version"),
        "test": old,
        "delta": {k: new[k] - old[k] for k in new},
    }


def point_champion_at(models_dir: Path, version_dir: Path) -> None:
    """Swap models/champion to `version_dir` with one atomic rename of a fresh symlink."""
    link = champion_link(models_dir)
    if link.exists() and not link.is_symlink():
        raise RegistryError(f"{link} is a plain folder, not a registry link: move it away first")
    tmp = Path(models_dir) / f".champion-{uuid.uuid4().hex}"
    os.symlink(os.path.relpath(version_dir, models_dir), tmp)
    os.replace(tmp, link)
    _fsync_dir(Path(models_dir))


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
