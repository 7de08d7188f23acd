"""A trial re-runs exactly from its recorded params and seed; ImageNet weights that cannot be
found offline give one clear line naming the file and where to put it."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.backbones import build_backbone, expected_weights_file, get_spec
from search.cli import main
from search.errors import WeightsError
from search.rerun import rerun
from search.settings import Settings
from search.study import create_or_load, open_storage
from search.worker import run_worker
from tests.conftest import HEAD, search_env, use_search_env


def test_rerun_reproduces_the_trial_value(workspace: Path) -> None:
    settings = Settings.load(environ=search_env(workspace, SEARCH_PRUNER="none"))
    study = create_or_load(open_storage(settings, heartbeat=False), settings)
    study.enqueue_trial({**HEAD, "n_layers": 2, "units_1": 32, "dropout_1": 0.2})
    run_worker(settings, n_trials=1)
    values, number = rerun(settings, 0)
    assert number == 1
    assert values["rerun"] == pytest.approx(values["original"], abs=1e-6)
    trials = study.get_trials(deepcopy=False)
    assert trials[1].params == trials[0].params
    assert trials[1].user_attrs["seed"] == trials[0].user_attrs["seed"]


def test_imagenet_weights_offline_error_names_file_and_folder() -> None:
    expected = expected_weights_file(get_spec("resnet50"), 64)
    assert expected is not None
    if expected.exists():
        pytest.skip(f"{expected} is cached on this machine")
    with pytest.raises(WeightsError) as info:
        build_backbone("resnet50", 64, "imagenet")
    message = str(info.value)
    assert expected.name in message and str(expected.parent) in message
    assert "\n" not in message


def test_space_asking_for_unavailable_weights_fails_before_any_trial(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    use_search_env(workspace, monkeypatch)
    (workspace / "s.toml").write_text('[space]\nbackbone = ["vgg16"]\n')
    code = main(
        ["worker", "--n-trials", "1", "--weights", "imagenet", "--space", str(workspace / "s.toml")]
    )
    err = capsys.readouterr().err
    assert code != 0 and "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in err
    assert "Traceback" not in err


def test_default_space_leaves_out_backbones_without_local_weights() -> None:
    from search.space import DEFAULT_SPACE, resolve_backbones

    space, left_out = resolve_backbones(dict(DEFAULT_SPACE), "imagenet", 64, explicit=False)
    kept = set(space["backbone"].choices)
    assert {"baseline_cnn", "efficientnet_lite0", "mobilenet_v2_tv"} <= kept
    for name in left_out:
        assert name not in kept
        assert not expected_weights_file(get_spec(name), 64).exists()
    assert set(left_out) | kept == set(DEFAULT_SPACE["backbone"].choices)
    # Trained from scratch, every backbone is available.
    space, left_out = resolve_backbones(dict(DEFAULT_SPACE), "none", 64, explicit=False)
    assert left_out == [] and space["backbone"] == DEFAULT_SPACE["backbone"]
