"""Ensemble selection: the best weighted average of a study's trials, chosen on validation.

Greedy ensemble selection with replacement (Caruana et al., 2004, "Ensemble selection from
libraries of models"): start from nothing; in each round add the trial whose addition gives the
best validation macro-F1 of the averaged probabilities (a trial may be added again, which raises
its weight); after the last round keep the ensemble of the best round. The weights are how often
each trial was picked. Ties go to the lower validation log loss, then to the better-ranked trial,
so a study always gives the same ensemble.

The library is the K best complete trials of the study, each with the probabilities it stored
at completion (search/trial.py), so selection runs no model: at 202 families and 1,800 validation
images, 25 rounds over 20 trials take a few seconds.

Whether an ensemble should replace the best single trial is decided on data the selection did not
see: the validation split is cut in two halves (scikit-learn's KFold); selection on one half is
scored on the other, both ways, against the best single trial of the selecting half scored the
same way. The ensemble wins when its mean held-out macro-F1 is higher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import KFold

from search.errors import RegistryError
from search.metrics import macro_f1

ROUNDS = 25  # selection rounds: the resolution of the weights (1/25)
CHECK_FOLDS = 2


@dataclass(frozen=True)
class Library:
    """The candidate trials, best first, and their stored probabilities."""

    numbers: list[int]  # trial numbers, in rank order
    val: np.ndarray  # (trials, n_val, classes) float32
    val_labels: np.ndarray
    test: np.ndarray | None = None  # (trials, n_test, classes), for reports and benchmarks
    test_labels: np.ndarray | None = None


@dataclass(frozen=True)
class Selection:
    """Picks per library entry and the validation macro-F1 of the average they give."""

    counts: np.ndarray  # (trials,) int: how often each was picked
    val_macro_f1: float

    @property
    def weights(self) -> np.ndarray:
        return self.counts / self.counts.sum()

    def members(self, numbers: list[int]) -> list[dict[str, Any]]:
        """[{trial, weight}] of the picked trials, heaviest first."""
        picked = [
            {"trial": numbers[i], "weight": round(float(w), 6)}
            for i, w in enumerate(self.weights)
            if w > 0
        ]
        return sorted(picked, key=lambda m: (-m["weight"], numbers.index(m["trial"])))

    def average(self, probs: np.ndarray) -> np.ndarray:
        """The ensemble's probabilities from the library's (trials, n, classes) array."""
        return np.tensordot(self.weights, probs, axes=1)


def _log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean log loss of the true classes, the selection's tie-break: run for every candidate
    of every round, where scikit-learn's log_loss would check and one-hot its input each time."""
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))


def select(val: np.ndarray, labels: np.ndarray, rounds: int = ROUNDS) -> Selection:
    """Greedy selection with replacement on (trials, n, classes) validation probabilities."""
    n_trials = val.shape[0]
    if n_trials == 0:
        raise RegistryError("ensemble selection needs at least one trial")
    counts = np.zeros(n_trials, dtype=np.int64)
    total = np.zeros(val.shape[1:], dtype=np.float64)
    best_counts, best_key = counts.copy(), (-1.0, 0.0)
    for step in range(1, rounds + 1):
        choice, choice_key = 0, (-1.0, 0.0)
        for i in range(n_trials):
            probs = (total + val[i]) / step
            key = (macro_f1(labels, probs), -_log_loss(labels, probs))
            if key > choice_key:  # strictly better: ties keep the better-ranked trial
                choice, choice_key = i, key
        counts[choice] += 1
        total += val[choice]
        if choice_key > best_key:
            best_counts, best_key = counts.copy(), choice_key
    return Selection(counts=best_counts, val_macro_f1=best_key[0])


def held_out_check(library: Library, rounds: int = ROUNDS) -> dict[str, float]:
    """Mean macro-F1 on validation halves the choice did not see: of the ensemble selected on
    the other half, and of the other half's best single trial."""
    folds = KFold(n_splits=CHECK_FOLDS, shuffle=True, random_state=0)
    ensemble, single = [], []
    for fit, held in folds.split(library.val_labels):
        fit_y, held_y = library.val_labels[fit], library.val_labels[held]
        chosen = select(library.val[:, fit], fit_y, rounds)
        ensemble.append(macro_f1(held_y, chosen.average(library.val[:, held])))
        scores = [macro_f1(fit_y, library.val[i, fit]) for i in range(len(library.numbers))]
        best = int(np.argmax(scores))  # the first of equals: the better-ranked trial
        single.append(macro_f1(held_y, library.val[best, held]))
    return {"ensemble": float(np.mean(ensemble)), "single": float(np.mean(single))}


def too_few(study_name: str, have: int, asked: int) -> RegistryError:
    return RegistryError(
        f"--ensemble {asked} asks for the {asked} best trials, but study {study_name!r} has "
        f"{have} complete trial{'s' if have != 1 else ''} with stored probabilities: run more "
        f"trials or ask for at most {have}"
    )


AUTO_LIBRARY = 10  # library size of `--ensemble auto`


@dataclass(frozen=True)
class Choice:
    """What a promotion builds: trials with weights (best first), TTA, and how it was chosen."""

    members: list[tuple[Any, float]]  # (FrozenTrial, weight)
    tta: bool
    val_macro_f1: float
    details: dict[str, Any]

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    def signature(self) -> dict[str, Any]:
        """What tells two champions of one study apart (`already champion`)."""
        return {
            "members": [[t.number, round(w, 6)] for t, w in self.members],
            "tta": "flip" if self.tta else "none",
        }


def champion_members(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The members (trial, weight, ...) a promoted champion's champion.json lists; a version
    promoted before ensembles existed is its one trial."""
    return info.get("members") or [{"trial": info.get("trial"), "weight": 1.0}]


def info_signature(info: dict[str, Any]) -> dict[str, Any]:
    """Choice.signature() of a promoted champion, from its champion.json."""
    return {
        "members": [[m["trial"], round(float(m["weight"]), 6)] for m in champion_members(info)],
        "tta": info.get("tta", "none"),
    }


def fetch(store: Any, trial: Any, attr: str, path: Any) -> None:
    """Download the trial's artifact `attr` (checkpoint, probabilities) to `path`, or say in
    one line that the artifact store does not hold it."""
    from optuna.artifacts import download_artifact
    from optuna.artifacts.exceptions import ArtifactNotFound

    try:
        download_artifact(
            artifact_store=store, file_path=str(path), artifact_id=trial.user_attrs[attr]
        )
    except ArtifactNotFound:
        raise RegistryError(
            f"trial {trial.number}'s {attr} artifact is not in the artifact store: point "
            "--artifacts-dir (SEARCH_ARTIFACTS_DIR) or SEARCH_ARTIFACT_URL at the store the "
            "workers used"
        ) from None


def load_libraries(
    trials: list[Any], store: Any, variants: list[str], with_test: bool = False
) -> dict[str, Library]:
    """The stored probabilities of `trials` for each variant ("val" or "val_flip", and its test
    twin): each trial's file is downloaded once for all variants."""
    import tempfile
    from pathlib import Path

    val: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    test: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    labels = test_labels = None
    with tempfile.TemporaryDirectory(prefix="search-ensemble-") as tmp:
        for trial in trials:
            path = Path(tmp) / f"{trial.number}.npz"
            fetch(store, trial, "probabilities", path)
            with np.load(path) as stored:
                for variant in variants:
                    val[variant].append(stored[variant].astype(np.float32))
                    if with_test:
                        twin = variant.replace("val", "test")
                        test[variant].append(stored[twin].astype(np.float32))
                if labels is None:
                    labels, test_labels = stored["val_labels"], stored["test_labels"]
    return {
        variant: Library(
            numbers=[t.number for t in trials],
            val=np.stack(val[variant]),
            val_labels=np.asarray(labels),
            test=np.stack(test[variant]) if with_test else None,
            test_labels=test_labels,
        )
        for variant in variants
    }


def load_library(trials: list[Any], store: Any, variant: str, with_test: bool = False) -> Library:
    """The stored probabilities of `trials` for one variant (load_libraries)."""
    return load_libraries(trials, store, [variant], with_test)[variant]


def choose(
    study_name: str,
    trials: list[Any],
    store: Any,
    ensemble: int | str | None,
    tta: str,
) -> Choice:
    """The champion's make-up from the study's best `trials` (best first, enough for the
    library): one trial or an ensemble, with or without flip TTA.

    `ensemble`: None = the best trial alone; K = selection over the K best trials;
    "auto" = selection over the AUTO_LIBRARY best, kept only if it beats the best trial on
    the validation halves it was not selected on (held_out_check). `tta`: "flip" or "none",
    or "auto" = flip when it gives the higher validation macro-F1 of the final choice.
    """
    best = trials[0]
    if ensemble is None and tta == "none":
        return Choice([(best, 1.0)], False, float(best.value), {})
    scored = [t for t in trials if "probabilities" in t.user_attrs]
    if ensemble is None:
        if "probabilities" not in best.user_attrs:
            raise RegistryError(
                f"trial {best.number} stored no probabilities (it ran before TTA scoring "
                "existed): promote without --tta, or run new trials"
            )
        scored = [best]
    elif ensemble != "auto" and len(scored) < int(ensemble):
        raise too_few(study_name, len(scored), int(ensemble))
    if not scored:
        raise RegistryError(
            f"no trial of study {study_name!r} stored probabilities (they ran before ensembles "
            "existed): promote without --ensemble, or run new trials"
        )
    variants = {"none": ["val"], "flip": ["val_flip"], "auto": ["val", "val_flip"]}[tta]
    libraries = load_libraries(scored, store, variants)
    options = [_choose_variant(scored, libraries[v], ensemble, v) for v in variants]
    return max(options, key=lambda c: c.val_macro_f1)  # the first of equals: no TTA


def _choose_variant(
    trials: list[Any], library: Library, ensemble: int | str | None, variant: str
) -> Choice:
    tta = variant == "val_flip"
    base = {"variant": variant, "library": library.numbers}
    if ensemble is None:
        value = macro_f1(library.val_labels, library.val[0])
        return Choice([(trials[0], 1.0)], tta, value, base)
    chosen = select(library.val, library.val_labels)
    details = {**base, "rounds": ROUNDS, "selected_val_macro_f1": chosen.val_macro_f1}
    if ensemble == "auto":
        check = held_out_check(library)
        details["held_out"] = check
        if check["ensemble"] <= check["single"] or np.count_nonzero(chosen.counts) < 2:
            value = macro_f1(library.val_labels, library.val[0])
            return Choice([(trials[0], 1.0)], tta, value, details)
    by_number = {t.number: t for t in trials}
    members = [(by_number[m["trial"]], m["weight"]) for m in chosen.members(library.numbers)]
    return Choice(members, tta, chosen.val_macro_f1, details)
