"""Ensemble champions and test-time augmentation, with a study real workers filled: greedy
selection, `promote-best --ensemble K --tta flip`, predict, evaluate, rollback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from search.cli import main
from search.dataset import load_prepared
from search.ensemble import choose, held_out_check, load_library, select
from search.registry import CARD_FILE, load_champion, top_trials
from search.settings import Settings
from search.study import load, open_artifact_store, open_storage
from search.worker import run_worker
from tests.conftest import HEAD, search_env, use_search_env

LABELS = np.array([0, 0, 1, 1, 2, 2])


def guesses(right: list[bool], wrong_to: int) -> np.ndarray:
    """Sure of the true class where `right`; elsewhere unsure, a little more for `wrong_to`."""
    probs = np.zeros((len(LABELS), 3), dtype=np.float32)
    for i, ok in enumerate(right):
        if ok:
            probs[i] = 0.05
            probs[i, LABELS[i]] = 0.9
        else:
            probs[i] = 0.1
            probs[i, LABELS[i]], probs[i, wrong_to] = 0.4, 0.5
    return probs


def test_selection_combines_complementary_trials_and_is_deterministic() -> None:
    a = guesses([True, True, True, True, False, False], wrong_to=0)  # misses family 2
    b = guesses([False, False, True, True, True, True], wrong_to=2)  # misses family 0
    c = guesses([True, False, True, False, True, False], wrong_to=1)
    val = np.stack([a, b, c])
    chosen = select(val, LABELS, rounds=10)
    assert chosen.counts[0] > 0 and chosen.counts[1] > 0
    assert chosen.val_macro_f1 == 1.0  # no single one gets more than 4 of 6 right
    assert np.isclose(chosen.weights.sum(), 1.0)
    again = select(val.copy(), LABELS, rounds=10)
    assert np.array_equal(again.counts, chosen.counts)
    # Equal trials: the better-ranked (first) one is picked, every time.
    tie = select(np.stack([a, a]), LABELS, rounds=3)
    assert tie.counts.tolist() == [1, 0]


@pytest.fixture(scope="module")
def ensemble_study(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    """Five complete trials by a real worker: four heads on the frozen backbone, each a little
    different, and the from-scratch CNN."""
    from search.study import create_or_load

    root = tmp_path_factory.mktemp("ensemble")
    shutil.copytree(prepared_dir, root / "data" / "prepared")
    (root / "space.toml").write_text('[space]\nbackbone = ["efficientnet_lite0", "baseline_cnn"]\n')
    settings = Settings.load(environ=search_env(root, SEARCH_PRUNER="none"))
    study = create_or_load(open_storage(settings, heartbeat=False), settings)
    for units, lr in ((64, 0.01), (128, 0.003), (80, 0.02), (96, 0.005)):
        study.enqueue_trial({**HEAD, "units_0": units, "learning_rate": lr})
    study.enqueue_trial({**HEAD, "backbone": "baseline_cnn"})
    run_worker(settings, n_trials=5)
    return root


@pytest.fixture()
def ws(ensemble_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    target = tmp_path / "ws"
    shutil.copytree(ensemble_study, target, symlinks=True)
    use_search_env(target, monkeypatch)
    monkeypatch.chdir(target)
    return target


def test_every_complete_trial_stores_its_probabilities(ws: Path) -> None:
    settings = Settings.load()
    study = load(open_storage(settings, heartbeat=False), settings)
    trials = top_trials(study, 5)
    assert len(trials) == 5
    data = load_prepared(settings.data_dir)
    lib = load_library(trials, open_artifact_store(settings), "val_flip", with_test=True)
    n_classes = len(data.classes)
    assert lib.val.shape == (5, len(data.indices("val")), n_classes)
    assert lib.test is not None and lib.test.shape == (5, len(data.indices("test")), n_classes)
    np.testing.assert_array_equal(lib.val_labels, data.labels("val"))
    np.testing.assert_allclose(lib.val.sum(-1), 1.0, atol=2e-2)  # float16 probabilities
    plain = load_library(trials, open_artifact_store(settings), "val")
    assert not np.allclose(plain.val, lib.val)  # the mirrored view changes the average
    check = held_out_check(lib)
    assert 0.0 <= check["single"] <= 1.0 and 0.0 <= check["ensemble"] <= 1.0


def test_ensemble_champion_promoted_predicted_evaluated_rolled_back(ws: Path, capsys) -> None:
    settings = Settings.load()
    assert main(["promote"]) == 0  # the best single trial first
    single = load_champion(ws / "models").info
    assert single["kind"] == "single" and single["tta"] == "none"
    capsys.readouterr()

    assert main(["promote", "--ensemble", "4", "--tta", "flip", "--force"]) == 0
    out = capsys.readouterr().out
    champion = load_champion(ws / "models")
    info = champion.info
    assert info["kind"] == "ensemble" and info["tta"] == "flip", out
    assert "an ensemble of" in out and "with flip TTA" in out
    members = info["members"]
    assert len(members) >= 2 and np.isclose(sum(m["weight"] for m in members), 1.0)
    assert info["selection"]["library"] == [t.number for t in top_trials(load(
        open_storage(settings, heartbeat=False), settings), 4)]  # fmt: skip
    card = (champion.path / CARD_FILE).read_text()
    assert "## Ensemble members" in card
    for m in members:
        assert f"| {m['trial']} |" in card

    # The end-to-end model is the weighted average of its members' flip-averaged test
    # probabilities, which each trial stored when it completed.
    study = load(open_storage(settings, heartbeat=False), settings)
    by_number = {t.number: t for t in study.trials}
    lib = load_library(
        [by_number[m["trial"]] for m in members],
        open_artifact_store(settings),
        "val_flip",
        with_test=True,
    )
    data = load_prepared(settings.data_dir)
    images, _ = data.arrays("test")
    weights = np.array([m["weight"] for m in members])
    assert lib.test is not None
    expected = np.tensordot(weights, lib.test, axes=1)
    np.testing.assert_allclose(champion.predict(np.asarray(images)), expected, atol=3e-2)

    # Same choice again: already the champion.
    assert main(["promote", "--ensemble", "4", "--tta", "flip"]) == 0
    assert "already the champion" in capsys.readouterr().out

    assert main(["evaluate", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["version"] == info["version"]
    assert evaluated["evaluation"]["metrics"]["macro_f1"] == pytest.approx(info["test"]["macro_f1"])

    photo = ws / "photo.png"
    from PIL import Image

    Image.fromarray(np.asarray(images[0])).save(photo)
    assert main(["predict", "--format", "json", str(photo)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["families"][0] in data.classes

    assert main(["rollback"]) == 0
    assert load_champion(ws / "models").info["version"] == single["version"]
    assert main(["rollback", info["version"]]) == 0
    assert load_champion(ws / "models").info["kind"] == "ensemble"
    assert main(["registry"]) == 0
    assert info["version"] in capsys.readouterr().out


def test_ensemble_larger_than_the_study_is_a_one_line_error(ws: Path, capsys) -> None:
    assert main(["promote", "--ensemble", "9"]) != 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "--ensemble 9" in err and "5 complete trials" in err
    assert not (ws / "models" / "champion").exists()
    with pytest.raises(SystemExit) as usage:  # argparse: not a number of trials
        main(["promote", "--ensemble", "0"])
    assert usage.value.code == 2


def test_missing_artifacts_are_a_one_line_error(ws: Path, capsys) -> None:
    settings = Settings.load()
    study = load(open_storage(settings, heartbeat=False), settings)
    second = top_trials(study, 2)[1]
    for path in (ws / "models" / "artifacts").rglob(second.user_attrs["probabilities"]):
        path.unlink()
    assert main(["promote", "--ensemble", "3"]) != 0
    err = capsys.readouterr().err
    assert f"error: trial {second.number}'s probabilities artifact is not in the" in err
    assert "Traceback" not in err and not (ws / "models" / "champion").exists()
    for path in (ws / "models" / "artifacts").rglob(study.best_trial.user_attrs["checkpoint"]):
        path.unlink()
    assert main(["promote"]) != 0
    assert "'s checkpoint artifact is not in the artifact store" in capsys.readouterr().err


def test_choice_is_deterministic_for_a_study(ws: Path) -> None:
    settings = Settings.load()
    study = load(open_storage(settings, heartbeat=False), settings)
    store = open_artifact_store(settings)
    first = choose(study.study_name, top_trials(study, 5), store, "auto", "auto")
    second = choose(study.study_name, top_trials(study, 5), store, "auto", "auto")
    assert first.signature() == second.signature()
    assert first.details == second.details
    assert "held_out" in first.details
