"""Backbone registry: name -> builder, preprocessing and weight source.

Every backbone takes raw RGB pixels in [0, 255] (float or uint8) and returns a pooled feature
vector. Normalisation lives inside the model as standard Keras layers, so a saved end-to-end
champion loads without custom objects and callers never preprocess by hand. EfficientNet,
EfficientNetV2 and ConvNeXt carry their own (keras.applications' preprocess_input is a
pass-through for them), so they get no extra layer ("raw").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from search.errors import ConfigError, WeightsError

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/"


@dataclass(frozen=True)
class BackboneSpec:
    """What the search needs to know about one backbone."""

    name: str
    frozen: bool  # frozen bases are run once per image (feature cache); others train end to end
    source: str  # "keras" (keras.applications), "ported" (offline .pth wheels), "scratch"
    preprocess: str  # "tf" (x/127.5-1), "caffe" (BGR - mean), "torch" (mean/std), "raw", "unit"
    dim: int  # length of the pooled feature vector the backbone returns
    keras_fn: str = ""  # keras.applications constructor name
    notop_file: str = ""  # file name of keras.applications ImageNet weights without top


def _keras(name: str, preprocess: str, dim: int, keras_fn: str, notop_file: str) -> BackboneSpec:
    """A frozen keras.applications backbone."""
    return BackboneSpec(name, True, "keras", preprocess, dim, keras_fn, notop_file)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("baseline_cnn", frozen=False, source="scratch", preprocess="unit", dim=256),
        _keras(
            "mobilenet_v2",
            "tf",
            1280,
            "MobileNetV2",
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}_no_top.h5",
        ),
        _keras("efficientnet_b0", "raw", 1280, "EfficientNetB0", "efficientnetb0_notop.h5"),
        _keras(
            "resnet50",
            "caffe",
            2048,
            "ResNet50",
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        _keras(
            "densenet121",
            "torch",
            1024,
            "DenseNet121",
            "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        _keras("vgg16", "caffe", 512, "VGG16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        # Keras names these weight files after the model: efficientnetv2-b0, convnext_tiny, ...
        _keras("efficientnet_v2_b0", "raw", 1280, "EfficientNetV2B0", "efficientnetv2-b0_notop.h5"),
        _keras("efficientnet_v2_b1", "raw", 1280, "EfficientNetV2B1", "efficientnetv2-b1_notop.h5"),
        _keras("efficientnet_v2_b2", "raw", 1408, "EfficientNetV2B2", "efficientnetv2-b2_notop.h5"),
        _keras("efficientnet_v2_b3", "raw", 1536, "EfficientNetV2B3", "efficientnetv2-b3_notop.h5"),
        _keras("efficientnet_v2_s", "raw", 1280, "EfficientNetV2S", "efficientnetv2-s_notop.h5"),
        _keras("convnext_tiny", "raw", 768, "ConvNeXtTiny", "convnext_tiny_notop.h5"),
        _keras("convnext_small", "raw", 768, "ConvNeXtSmall", "convnext_small_notop.h5"),
        _keras("convnext_base", "raw", 1024, "ConvNeXtBase", "convnext_base_notop.h5"),
        BackboneSpec("efficientnet_lite0", True, "ported", "ported", 1280),
        BackboneSpec("efficientnet_lite1", True, "ported", "ported", 1280),
        BackboneSpec("efficientnet_lite2", True, "ported", "ported", 1280),
        BackboneSpec("mobilenet_v2_tv", True, "ported", "ported", 1280),
    ]
}

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255.0
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255.0
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68])


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {name!r}: choose one of {', '.join(sorted(BACKBONES))}"
        )
    return BACKBONES[name]


def keras_cache_dir() -> Path:
    """Where keras.utils.get_file caches downloaded weights: Keras's own home ($KERAS_HOME,
    else ~/.keras, as Keras resolved it at import), plus models/."""
    try:
        from keras.src.backend.config import keras_home  # no public accessor in Keras 3

        return Path(keras_home()) / "models"
    except ImportError:
        return Path.home() / ".keras" / "models"


def _mobilenet_rows(size: int) -> int:
    return size if size in (96, 128, 160, 192, 224) else 224


def expected_weights_file(spec: BackboneSpec, size: int) -> Path | None:
    """The cached file keras.applications would read for ImageNet weights, or None if the
    backbone's weights come from elsewhere."""
    if spec.source != "keras":
        return None
    return keras_cache_dir() / spec.notop_file.format(size=_mobilenet_rows(size))


def weights_available(name: str, weights: str, size: int) -> bool:
    """Whether building `name` with `weights` can work without the network."""
    spec = get_spec(name)
    if weights == "none" or spec.source == "scratch":
        return True
    if spec.source == "ported":
        from search import pretrained

        return pretrained.weights_file(name) is not None
    path = expected_weights_file(spec, size)
    return path is not None and path.exists()


def preprocessing_layers(mode: str) -> list[keras.layers.Layer]:
    """Normalisation as standard, serializable layers (no Lambda, no custom objects)."""
    if mode in ("raw", "ported"):
        return []
    if mode == "unit":
        return [keras.layers.Rescaling(1.0 / 255.0, name="to_unit")]
    if mode == "tf":
        return [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_tf_range")]
    if mode == "torch":
        return [
            keras.layers.Normalization(
                mean=IMAGENET_MEAN.tolist(),
                variance=(IMAGENET_STD**2).tolist(),
                name="imagenet_norm",
            )
        ]
    if mode == "caffe":
        # RGB -> BGR and mean subtraction as a fixed 1x1 convolution.
        swap = np.zeros((1, 1, 3, 3), dtype="float32")
        swap[0, 0, 0, 2] = swap[0, 0, 1, 1] = swap[0, 0, 2, 0] = 1.0
        conv = keras.layers.Conv2D(
            3,
            1,
            kernel_initializer=keras.initializers.Constant(swap),
            bias_initializer=keras.initializers.Constant(-CAFFE_MEAN_BGR),
            trainable=False,
            name="caffe_bgr_mean",
        )
        return [conv]
    raise ConfigError(f"unknown preprocessing mode {mode!r}")


def build_backbone(
    name: str, image_size: int, weights: str, trainable: bool = False
) -> keras.Model:
    """Raw RGB (image_size, image_size, 3) -> pooled features.

    Frozen (the default) for pretrained weights, where the base runs once per image through the
    feature cache; trainable for training from scratch (weights "none"): a frozen *random* base
    would hand the head near-constant features, so from scratch means the whole network learns.
    """
    spec = get_spec(name)
    if weights not in ("imagenet", "none"):
        raise ConfigError(f"unknown weights {weights!r}: use 'imagenet' or 'none'")
    if not spec.frozen:
        return build_baseline_cnn(image_size)
    shape = (image_size, image_size, 3)
    if spec.source == "ported":
        from search import pretrained

        base = pretrained.build_pretrained(
            name, shape, weights=None if weights == "none" else "imagenet", include_top=False
        )
    else:
        base = _build_keras_application(spec, shape, weights)
    base.trainable = trainable
    inputs = keras.Input(shape=shape, name="image")
    x = inputs
    for layer in preprocessing_layers(spec.preprocess):
        x = layer(x)
    outputs = base(x) if trainable else base(x, training=False)
    model = keras.Model(inputs, outputs, name=f"{name}_features")
    model.trainable = trainable
    return model


def trains_end_to_end(name: str, weights: str) -> bool:
    """The baseline CNN always does; any backbone does when trained from scratch."""
    return not get_spec(name).frozen or weights == "none"


def _build_keras_application(spec: BackboneSpec, shape: tuple[int, int, int], weights: str) -> Any:
    constructor: Callable[..., keras.Model] = getattr(keras.applications, spec.keras_fn)
    if weights == "none":
        return constructor(include_top=False, weights=None, input_shape=shape, pooling="avg")
    expected = expected_weights_file(spec, shape[0])
    try:
        return constructor(include_top=False, weights="imagenet", input_shape=shape, pooling="avg")
    except Exception as exc:  # keras raises plain Exception on a failed download
        raise WeightsError(
            f"ImageNet weights for {spec.name} are not cached and could not be downloaded "
            f"({type(exc).__name__}); put {expected.name if expected else 'the weights file'} "
            f"into {expected.parent if expected else keras_cache_dir()} (from "
            f"{KERAS_WEIGHTS_URL}), or use --weights none or an offline backbone "
            f"(efficientnet_lite0, mobilenet_v2_tv)"
        ) from exc


def build_baseline_cnn(image_size: int) -> keras.Model:
    """A small CNN trained from scratch: the floor every transfer-learning trial must beat."""
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = preprocessing_layers("unit")[0](inputs)
    for i, filters in enumerate((32, 64, 128, 256)):
        x = keras.layers.Conv2D(
            filters, 3, strides=2, padding="same", use_bias=False, name=f"conv{i}"
        )(x)
        # Fast-moving statistics: small data sets give few steps per epoch.
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    outputs = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, outputs, name="baseline_cnn_features")
