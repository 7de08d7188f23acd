"""`search finetune`: unfreeze the top of a frozen-backbone trial and record it as a trial."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.trial import TrialState

from search.champion_model import assemble
from search.cli import main
from search.dataset import load_prepared
from search.errors import ConfigError
from search.finetune import _leaves, finetune
from search.metrics import macro_f1
from search.rerun import rerun
from search.settings import Settings
from search.study import load, open_storage
from tests.conftest import search_env, searched_workspace, use_search_env


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    return searched_workspace(tmp_path_factory.mktemp("finetune"), prepared_dir)


def download(settings: Settings, artifact_id: str, path: Path) -> Path:
    store = FileSystemArtifactStore(str(settings.artifacts_dir))
    download_artifact(artifact_store=store, file_path=str(path), artifact_id=artifact_id)
    return path


def test_finetune_trains_only_the_top_layers_and_records_a_promotable_trial(
    searched: Path, tmp_path: Path
) -> None:
    settings = Settings.load(environ=search_env(searched))
    result = finetune(settings, unfreeze=3, epochs=2, learning_rate=1e-3)

    study = load(open_storage(settings, heartbeat=False), settings)
    trials = {t.number: t for t in study.trials}
    source, tuned = trials[result["finetuned_from"]], trials[result["trial"]]
    assert source.params["backbone"] == "efficientnet_lite0"  # the best frozen-backbone trial
    assert tuned.state == TrialState.COMPLETE and tuned.params == source.params
    attrs = tuned.user_attrs
    assert attrs["stage"] == "finetune" and attrs["finetuned_from"] == source.number
    assert attrs["checkpoint_kind"] == "full" and "history" in attrs
    scores = [row["val_macro_f1"] for row in result["history"]]
    assert len(scores) == 3  # before + 2 epochs
    assert tuned.value == result["after"] == max(scores[1:])
    assert attrs["val_macro_f1_before"] == result["before"] == scores[0]
    assert f"{result['before']:.3f} -> {result['after']:.3f}" in result["summary"]
    assert len(result["unfrozen_layers"]) == 3

    # The checkpoint is an ordinary end-to-end model on raw images, scoring what was recorded;
    # promote-best's assemble takes it as it is.
    data = load_prepared(settings.data_dir)
    path = download(settings, attrs["checkpoint"], tmp_path / "tuned.keras")
    model = assemble(tuned, path, data, settings, study.user_attrs)
    val_x, val_y = data.arrays("val")
    probs = np.asarray(model.predict(val_x.astype(np.float32), batch_size=64, verbose=0))
    assert macro_f1(val_y, probs) == pytest.approx(tuned.value, abs=1e-9)

    # Exactly the unfrozen layers changed; BatchNormalization (weights and moving statistics)
    # and everything below the top stayed as the frozen backbone had them.
    original = assemble(
        source,
        download(settings, source.user_attrs["checkpoint"], tmp_path / "head.keras"),
        data,
        settings,
        study.user_attrs,
    )
    name = f"{source.params['backbone']}_features"
    before = {layer.name: layer for layer in _leaves(original.get_layer(name))}
    changed = []
    for layer in _leaves(model.get_layer(name)):
        old = before[layer.name].get_weights()
        if any(not np.array_equal(a, b) for a, b in zip(old, layer.get_weights(), strict=True)):
            changed.append(layer.name)
            assert not isinstance(layer, keras.layers.BatchNormalization)
    assert changed == result["unfrozen_layers"]

    # `search rerun` of the fine-tuned trial fine-tunes its source again, to the same score.
    values, number = rerun(settings, tuned.number)
    again = load(open_storage(settings, heartbeat=False), settings).trials[number]
    assert again.user_attrs["rerun_of"] == tuned.number
    assert again.user_attrs["finetuned_from"] == source.number
    assert values["rerun"] == pytest.approx(values["original"], abs=1e-6)


def test_finetune_refuses_what_it_cannot_fine_tune(
    searched: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = use_search_env(searched, monkeypatch)
    settings = Settings.load(environ=env)
    study = load(open_storage(settings, heartbeat=False), settings)
    cnn = next(t for t in study.trials if t.params.get("backbone") == "baseline_cnn")
    code = main(["finetune", "--trial", str(cnn.number), "--epochs", "1"])  # the CLI, in-process
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: trial ") and "end to end" in err
    with pytest.raises(ConfigError, match="no trial 999"):
        finetune(settings, trial=999)
    with pytest.raises(ConfigError, match="unfreeze"):
        finetune(settings, unfreeze=0)
