"""The backbone registry: every backbone returns the feature size its spec declares, the
normalisation built into each keras.applications backbone is exactly keras.applications' own
preprocess_input, and a backbone whose ImageNet weights are not in Keras's cache is left out of
the default space or, when asked for, fails with one line naming the file and the folder.

Nothing here downloads: models are built with random weights, the Keras cache is an empty
folder and conftest.py points every download at a dead proxy.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from keras.src.backend import config as keras_config

from search.backbones import (
    BACKBONES,
    build_backbone,
    expected_weights_file,
    get_spec,
    keras_cache_dir,
    weights_available,
)
from search.errors import WeightsError
from search.pretrained import PRETRAINED

SIZE = 32  # the smallest input every backbone here accepts

# keras.applications module whose preprocess_input belongs to each keras-source backbone.
MODULES = {
    "mobilenet_v2": "mobilenet_v2",
    "efficientnet_b0": "efficientnet",
    "resnet50": "resnet50",
    "densenet121": "densenet",
    "vgg16": "vgg16",
    "efficientnet_v2_b0": "efficientnet_v2",
    "efficientnet_v2_b1": "efficientnet_v2",
    "efficientnet_v2_b2": "efficientnet_v2",
    "efficientnet_v2_b3": "efficientnet_v2",
    "efficientnet_v2_s": "efficientnet_v2",
    "convnext_tiny": "convnext",
    "convnext_small": "convnext",
    "convnext_base": "convnext",
}
NEW = {
    "efficientnet_v2_b0": "efficientnetv2-b0_notop.h5",
    "efficientnet_v2_b1": "efficientnetv2-b1_notop.h5",
    "efficientnet_v2_b2": "efficientnetv2-b2_notop.h5",
    "efficientnet_v2_b3": "efficientnetv2-b3_notop.h5",
    "efficientnet_v2_s": "efficientnetv2-s_notop.h5",
    "convnext_tiny": "convnext_tiny_notop.h5",
    "convnext_small": "convnext_small_notop.h5",
    "convnext_base": "convnext_base_notop.h5",
}
KERAS_SOURCE = sorted(name for name, spec in BACKBONES.items() if spec.source == "keras")


def test_registry_lists_every_keras_backbone_with_its_module() -> None:
    assert set(MODULES) == set(KERAS_SOURCE)
    for name, module in MODULES.items():
        spec = get_spec(name)
        # The constructor lives in the module whose preprocess_input the next test compares.
        assert getattr(getattr(keras.applications, module), spec.keras_fn) is getattr(
            keras.applications, spec.keras_fn
        )
    for name, file in NEW.items():
        spec = get_spec(name)
        assert spec.frozen and spec.preprocess == "raw" and spec.notop_file == file


@pytest.fixture(scope="module", params=KERAS_SOURCE)
def built(request: pytest.FixtureRequest) -> tuple[str, keras.Model]:
    """Each keras-source backbone, random weights, built once for both checks below."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    return request.param, build_backbone(request.param, SIZE, "none")


def test_output_is_the_declared_feature_size(built: tuple[str, keras.Model]) -> None:
    name, model = built
    assert tuple(model.output_shape) == (None, get_spec(name).dim)


def test_builtin_preprocessing_is_keras_preprocess_input(built: tuple[str, keras.Model]) -> None:
    """Our model on raw pixels == the same keras.applications base (same weights) on
    keras.applications.<module>.preprocess_input(pixels)."""
    name, model = built
    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert len(inner) == 1
    base = inner[0]
    pixels = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3)).astype("float32")
    preprocess = getattr(keras.applications, MODULES[name]).preprocess_input
    reference = keras.ops.convert_to_numpy(base(preprocess(pixels.copy()), training=False))
    ours = keras.ops.convert_to_numpy(model(pixels, training=False))
    assert ours.shape == (2, get_spec(name).dim)
    scale = float(np.abs(reference).max())  # random weights: MobileNetV2 gives ~1e-13
    assert scale > 0
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * scale)
    # Something to compare: the features depend on the pixels.
    assert np.abs(ours[0] - ours[1]).max() > 1e-2 * scale


def test_convnext_saves_and_loads_without_custom_objects(tmp_path: Path) -> None:
    """ConvNeXt has layers of its own (LayerScale) that Keras does not register: a saved
    champion must still load by itself and compute the same features."""
    keras.utils.set_random_seed(0)
    model = build_backbone("convnext_tiny", SIZE, "none")
    model.save(tmp_path / "convnext.keras")
    loaded = keras.models.load_model(tmp_path / "convnext.keras", compile=False)
    pixels = np.random.default_rng(2).integers(0, 256, (2, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(pixels)), keras.ops.convert_to_numpy(model(pixels))
    )


def test_other_backbones_declare_their_feature_size() -> None:
    for name, ported in PRETRAINED.items():  # built and checked in test_pretrained.py
        assert get_spec(name).dim == ported.feature_dim
    baseline = get_spec("baseline_cnn")
    assert build_backbone(baseline.name, SIZE, "none").output_shape == (None, baseline.dim)


@pytest.fixture()
def empty_keras_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keras's home as an empty folder, as KERAS_HOME set before Keras was imported would make
    it (Keras reads the variable once, at import): our lookups and Keras's own get_file both
    use it."""
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras"))
    assert keras_cache_dir() == tmp_path / "keras" / "models"
    return keras_cache_dir()


def test_new_backbones_without_cached_weights_are_left_out(empty_keras_cache: Path) -> None:
    from search.space import DEFAULT_SPACE, resolve_backbones

    for name, file in NEW.items():
        assert expected_weights_file(get_spec(name), 224) == empty_keras_cache / file
        assert not weights_available(name, "imagenet", 224)
        assert weights_available(name, "none", 224)
    space, left_out = resolve_backbones(dict(DEFAULT_SPACE), "imagenet", 224, explicit=False)
    assert set(NEW) <= set(left_out)
    assert not set(NEW) & set(space["backbone"].choices)
    assert "efficientnet_lite0" in space["backbone"].choices  # offline weights stay in


@pytest.mark.parametrize("name", ["efficientnet_v2_b0", "convnext_tiny"])
def test_asking_for_uncached_weights_names_the_file_and_folder(
    name: str, empty_keras_cache: Path
) -> None:
    with pytest.raises(WeightsError) as info:
        build_backbone(name, 224, "imagenet")
    message = str(info.value)
    assert NEW[name] in message and str(empty_keras_cache) in message
    assert "\n" not in message
    # The file we name is the one Keras itself tried to fetch into that folder.
    cause = str(info.value.__cause__)
    assert cause.startswith("URL fetch failure on https://") and f"/{NEW[name]}: " in cause
    assert not (empty_keras_cache / NEW[name]).exists()
