"""Evaluation on the held-out test split: numbers that agree with scikit-learn, bit-for-bit
determinism, the error analysis, and `search predict` on real folders with broken files."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import classification_report, confusion_matrix

from search import predict as predict_module
from search.cli import main
from search.dataset import load_prepared
from search.evaluate import HeldOutSplit, compare, evaluate, size_bucket
from search.registry import evaluate_champion, load_champion, promote_best
from search.reports import EVALUATION_FILE, PER_FAMILY_FILE
from search.settings import Settings
from search.study import create_or_load, open_storage
from search.worker import run_worker
from tests.conftest import HEAD, search_env, use_search_env


@pytest.fixture(scope="module")
def promoted(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    """A workspace with one trained head promoted to champion."""
    ws = tmp_path_factory.mktemp("evaluate")
    shutil.copytree(prepared_dir, ws / "data" / "prepared")
    (ws / "space.toml").write_text('[space]\nbackbone = ["efficientnet_lite0"]\n')
    settings = Settings.load(environ=search_env(ws, SEARCH_PRUNER="none"))
    study = create_or_load(open_storage(settings, heartbeat=False), settings)
    study.enqueue_trial(HEAD)
    run_worker(settings, n_trials=1)
    assert promote_best(settings)["promoted"]
    return ws


@pytest.fixture()
def settings(promoted: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    use_search_env(promoted, monkeypatch)
    monkeypatch.chdir(promoted)
    return Settings.load()


def test_evaluation_is_bit_for_bit_repeatable(settings: Settings, promoted: Path, capsys) -> None:
    """Evaluating the same model on the same split twice gives byte-identical JSON, equal to the
    file written at promotion (which evaluated the saved model in another code path)."""
    assert main(["evaluate", "--json"]) == 0  # `search evaluate --json`
    first = json.loads(capsys.readouterr().out)
    a = (Path(first["folder"]) / EVALUATION_FILE).read_bytes()
    version_folder = (promoted / "models" / "champion").resolve()
    second = evaluate_champion(settings, version_folder)  # `search evaluate --model PATH`
    b = (Path(second["folder"]) / EVALUATION_FILE).read_bytes()
    assert second["folder"] == first["folder"] and a == b
    at_promotion = promoted / "models" / "champion" / EVALUATION_FILE
    assert at_promotion.read_bytes() == a
    assert first["champion"] and first["folder"].endswith(f"evaluations/{first['version']}")
    assert "macro-F1" in first["summary"] and "by size bucket" in first["summary"]
    assert json.loads(a) == first["evaluation"]
    evaluations = promoted / "models" / "evaluations"
    assert not [p for p in evaluations.glob(".*") if p.is_dir()]  # no staging left
    assert sorted(p.name for p in Path(first["folder"]).iterdir()) == [
        EVALUATION_FILE, PER_FAMILY_FILE, "reports"
    ]  # fmt: skip


def test_evaluation_agrees_with_scikit_learn(settings: Settings, promoted: Path) -> None:
    folder = promoted / "models" / "champion"
    evaluation = json.loads((folder / EVALUATION_FILE).read_text())
    data = load_prepared(settings.data_dir)
    split = HeldOutSplit.of(data)
    probs = load_champion(settings.models_dir).predict(split.images)
    y_pred = probs.argmax(1)
    n = len(data.classes)
    assert evaluation["n_images"] == len(split.labels) == len(data.indices("test"))
    assert evaluation["metrics"]["accuracy"] == pytest.approx((y_pred == split.labels).mean())
    phylum = np.array(data.phyla)
    assert evaluation["metrics"]["phylum_accuracy"] == pytest.approx(
        (phylum[y_pred] == phylum[split.labels]).mean()
    )
    assert evaluation["metrics"]["phylum_accuracy"] >= evaluation["metrics"]["accuracy"]

    report = classification_report(
        split.labels, y_pred, labels=range(n), output_dict=True, zero_division=0
    )
    train = np.bincount(data.labels("train"), minlength=n)
    for c, row in enumerate(evaluation["per_family"]):
        assert row["family"] == data.classes[c] and row["phylum"] == data.phyla[c]
        assert row["precision"] == pytest.approx(report[str(c)]["precision"])
        assert row["recall"] == pytest.approx(report[str(c)]["recall"])
        assert row["f1"] == pytest.approx(report[str(c)]["f1-score"])
        assert row["support"] == report[str(c)]["support"]
        assert row["train_images"] == train[c]
        assert row["size_bucket"] == size_bucket(int(train[c]))
    with open(folder / PER_FAMILY_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["family"] for r in rows] == data.classes
    assert [int(r["support"]) for r in rows] == [r["support"] for r in evaluation["per_family"]]

    counts = confusion_matrix(split.labels, y_pred, labels=range(n))
    assert evaluation["confusion_matrix"]["counts"] == counts.tolist()
    off = [(counts[t, p], t, p) for t in range(n) for p in range(n) if t != p and counts[t, p]]
    assert [p["count"] for p in evaluation["confused_pairs"]] == sorted(
        (c for c, _, _ in off), reverse=True
    )[:10]
    assert sum(r["n"] for r in evaluation["per_size_bucket"]) == evaluation["n_images"]
    assert sum(r["n"] for r in evaluation["per_phylum"]) == evaluation["n_images"]
    for row in evaluation["per_phylum"]:
        mask = np.array([data.phyla[c] == row["phylum"] for c in split.labels])
        assert row["accuracy"] == pytest.approx((y_pred[mask] == split.labels[mask]).mean())


def test_error_analysis_on_known_predictions(prepared_dir: Path) -> None:
    """Hand-made probabilities on the real test split: buckets, phyla, pairs and deltas exact."""
    split = HeldOutSplit.of(load_prepared(prepared_dir))
    n = len(split.classes)
    split.train_counts = np.array([10, 29, 30, 99, 100, 150, 5, 40][:n])
    split.phyla = ["chordata", "arthropoda"] * (n // 2)
    probs = np.full((len(split.labels), n), 0.01)
    probs[np.arange(len(split.labels)), split.labels] = 0.9
    wrong = np.flatnonzero(split.labels == 0)[:2]  # two images of class 0 called class 1
    probs[wrong, 0], probs[wrong, 1] = 0.01, 0.9
    evaluation = evaluate(probs, split)
    assert [size_bucket(v) for v in (29, 30, 99, 100)] == ["rare", "medium", "medium", "common"]
    assert [r["size_bucket"] for r in evaluation["per_family"]][:6] == [
        "rare", "rare", "medium", "medium", "common", "common"
    ]  # fmt: skip
    assert evaluation["confused_pairs"] == [
        {
            "true": split.classes[0],
            "predicted": split.classes[1],
            "count": 2,
            "share_of_true": 2 / int((split.labels == 0).sum()),
        }
    ]
    rare = next(r for r in evaluation["per_size_bucket"] if r["bucket"] == "rare")
    in_rare = np.isin(split.labels, [0, 1, 6])
    assert rare["n"] == in_rare.sum() and rare["families"] == 3
    assert rare["accuracy"] == pytest.approx(1 - 2 / in_rare.sum())
    assert evaluation["per_phylum"][0]["phylum"] == "chordata"  # worst first: class 0 is there
    better = probs.copy()
    better[wrong, 0], better[wrong, 1] = 0.9, 0.01
    diff = compare(evaluate(better, split), evaluation, "v-old")
    assert diff["version"] == "v-old" and diff["delta"]["accuracy"] == pytest.approx(
        2 / len(split.labels)
    )
    assert diff["per_family_f1_delta"][-1]["delta"] > 0  # class 0 or 1 improved most
    with pytest.raises(Exception, match="scores per image"):
        evaluate(probs[:, :-1], split)


def test_predict_folder_with_corrupt_files(
    settings: Settings, promoted: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Files and nested folders in; unreadable files skipped and reported; CSV and JSON out;
    the threaded, chunked decoder gives the same answers as decoding one by one."""
    data = load_prepared(settings.data_dir)
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    indices = data.indices("test")[:7]
    for i, index in enumerate(indices):
        where = photos / "nested" if i % 2 else photos
        Image.fromarray(np.asarray(data.images()[index])).save(where / f"p{i}.jpg", quality=95)
    good = sorted(p for p in photos.rglob("*.jpg"))
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    jpeg = good[0].read_bytes()
    (photos / "nested" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (photos / "notes.txt").write_text("not an image, not even tried")
    lone = tmp_path / "lone.png"
    Image.fromarray(np.asarray(data.images()[indices[0]])).save(lone)

    out = tmp_path / "predictions.csv"
    code = main(["predict", str(photos), str(lone), "--top-k", "3", "--output", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "corrupt.jpg" in err and "truncated.jpg" in err and "notes.txt" not in err
    assert "skipped 2 unreadable" in err and "Traceback" not in err
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["path"] for r in rows] == [str(p) for p in good] + [str(lone)]
    champion = load_champion(settings.models_dir)
    for row in rows:
        assert row["family_1"] in data.classes and row["family_3"] in data.classes
        assert row["phylum"] == data.phyla[data.classes.index(row["family_1"])]
        assert float(row["probability_1"]) >= float(row["probability_2"])

    # Many small chunks through the thread pool == one image at a time, in the same order.
    monkeypatch.setattr(predict_module, "DECODE_CHUNK", 3)
    paths = predict_module.expand([photos])
    threaded, skipped = predict_module.predict_paths(champion, paths, top_k=2, threads=4)
    serial, _ = predict_module.predict_paths(champion, paths, top_k=2, threads=1)
    assert [r.__dict__ for r in threaded] == [r.__dict__ for r in serial]
    assert sorted(Path(p).name for p, _ in skipped) == ["corrupt.jpg", "truncated.jpg"]

    assert main(["predict", str(photos / "corrupt.jpg"), "--format", "json"]) != 0
    assert "no readable image" in capsys.readouterr().err
