"""One end-to-end Keras model from the trials a champion is made of: raw RGB pixels in,
family probabilities out, whatever it holds inside.

A single trial is its backbone and its head (or, for an end-to-end trial, its own model). An
ensemble runs each distinct backbone once and averages its heads with their selection weights;
test-time augmentation (TTA) averages each member over the image and its mirror. Everything is
built from standard, serializable Keras layers (the mirror is a fixed permutation as a
non-trainable Dense layer, which is exact), so a champion loads with `keras.models.load_model`
and no custom objects, and `search predict`, `evaluate` and `rollback` treat every champion
alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from search.backbones import build_backbone, get_spec, weights_available
from search.features import feature_key
from search.settings import Settings

if TYPE_CHECKING:
    import optuna

    from search.dataset import PreparedData


@dataclass(frozen=True)
class Member:
    """One trial of a champion: its checkpoint on disk and its weight in the average."""

    trial: optuna.trial.FrozenTrial
    checkpoint: Path
    weight: float = 1.0


def assemble(
    trial: optuna.trial.FrozenTrial,
    checkpoint: Path,
    data: PreparedData,
    settings: Settings,
    study_attrs: dict[str, Any],
) -> keras.Model:
    """One trial as an end-to-end model: preprocessing + frozen backbone + head."""
    return build_champion([Member(trial, checkpoint)], data, settings, study_attrs)


def build_champion(
    members: list[Member],
    data: PreparedData,
    settings: Settings,
    study_attrs: dict[str, Any],
    tta: bool = False,
) -> keras.Model:
    """The weighted average of `members` (weights sum to 1), each over the image and, with
    `tta`, its mirror. One member without TTA is exactly its backbone and head."""
    size = data.image_size
    inputs = keras.Input(shape=(size, size, 3), name="image")
    views = [inputs, mirror(inputs, size)] if tta else [inputs]
    backbones: dict[str, keras.Model] = {}
    features: dict[str, list[Any]] = {}
    outputs = []
    for member in members:
        trained = keras.models.load_model(member.checkpoint, compile=False)
        number = member.trial.number
        if member.trial.user_attrs.get("checkpoint_kind") == "full":
            if len(members) == 1 and not tta:
                return trained
            trained.name = f"trial_{number}_model"
            per_view = [trained(view) for view in views]
        else:
            name = member.trial.params["backbone"]
            if name not in backbones:
                backbones[name] = frozen_backbone(name, data, settings, study_attrs)
                features[name] = [backbones[name](view) for view in views]
            trained.name = f"trial_{number}_head"
            per_view = [trained(x) for x in features[name]]
        probs = (
            per_view[0]
            if len(per_view) == 1
            else keras.layers.Average(name=f"trial_{number}_tta")(per_view)
        )
        outputs.append((member.weight, number, probs))
    if len(outputs) == 1:
        output = outputs[0][2]
    else:
        output = keras.layers.Add(name="ensemble_average")(
            [
                keras.layers.Rescaling(weight, name=f"trial_{number}_weight")(probs)
                for weight, number, probs in outputs
            ]
        )
    if len(members) == 1:
        name = f"{members[0].trial.params['backbone']}_champion"
    else:
        name = f"ensemble_of_{len(members)}"
    return keras.Model(inputs, output, name=name)


def frozen_backbone(
    name: str, data: PreparedData, settings: Settings, study_attrs: dict[str, Any]
) -> keras.Model:
    """The backbone exactly as the trials' feature cache ran it: its saved weights when the
    cache is here, else the same weights rebuilt from their source. A keras.applications
    backbone whose weights are on this machine is rebuilt from them, since its structure can
    depend on the weights (EfficientNet B0 adds a rescaling layer only for ImageNet weights,
    so loading saved weights into a weights=None build would drop it)."""
    weights = study_attrs["weights"]
    seed = int(study_attrs["feature_seed"])
    cached = (
        Path(settings.features_dir)
        / feature_key(data, name, weights, int(study_attrs["feature_views"]), seed)
        / "backbone.weights.h5"
    )
    keras.utils.set_random_seed(seed)
    from_source = get_spec(name).source == "keras" and weights_available(
        name, weights, data.image_size
    )
    if cached.exists() and not from_source:
        backbone = build_backbone(name, data.image_size, "none")
        backbone.load_weights(cached)
        return backbone
    return build_backbone(name, data.image_size, weights)


def mirror(images: Any, size: int) -> Any:
    """Images flipped left-right, with standard layers: the width axis moved last, multiplied
    by the exchange matrix (a 0/1 permutation, so exact), and moved back."""
    exchange = np.eye(size, dtype="float32")[::-1]
    x = keras.layers.Permute((1, 3, 2), name="tta_width_last")(images)
    x = keras.layers.Dense(
        size,
        use_bias=False,
        trainable=False,
        kernel_initializer=keras.initializers.Constant(exchange),
        name="tta_mirror",
    )(x)
    return keras.layers.Permute((1, 3, 2), name="tta_width_back")(x)
