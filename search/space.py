"""The search space: the one readable place that says what a trial may try.

A space is a dict name -> dimension. A TOML or JSON file can narrow it:

    [space]
    backbone = ["efficientnet_lite0", "mobilenet_v2_tv"]   # a subset of choices
    units = {low = 64, high = 256}                         # a narrower range
    optimizer = "adam"                                     # one fixed value

The study records the space it was created with, and every worker that joins uses that record,
so all workers sample the same distributions.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from search.backbones import BACKBONES, get_spec, weights_available
from search.errors import ConfigError

MAX_LAYERS = 3


@dataclass(frozen=True)
class Categorical:
    choices: tuple[Any, ...]


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    log: bool = False


Dimension = Categorical | FloatRange | IntRange

DEFAULT_SPACE: dict[str, Dimension] = {
    "backbone": Categorical(tuple(BACKBONES)),
    "n_layers": IntRange(1, MAX_LAYERS),
    "units": IntRange(64, 1024, log=True),  # per layer: units_0, units_1, ...
    "dropout": FloatRange(0.0, 0.6),  # per layer: dropout_0, dropout_1, ...
    "batch_norm": Categorical((True, False)),
    "learning_rate": FloatRange(1e-4, 3e-2, log=True),
    "optimizer": Categorical(("adam", "adamw", "sgd", "rmsprop")),
    "batch_size": Categorical((16, 32, 64, 128)),
    "label_smoothing": FloatRange(0.0, 0.2),
    "weight_decay": FloatRange(1e-6, 1e-2, log=True),
    # Weight of an auxiliary phylum output's loss (search.trial.PhylumAwareLoss); 0 = none.
    "phylum_loss_weight": FloatRange(0.0, 1.0),
}


def sample(trial: optuna.Trial, space: dict[str, Dimension]) -> dict[str, Any]:
    """Draw one configuration. Per-layer names (units_i, dropout_i) keep TPE's view of each
    layer separate; only the layers in use are sampled."""
    params: dict[str, Any] = {"backbone": _suggest(trial, "backbone", space["backbone"])}
    n_layers = _suggest(trial, "n_layers", space["n_layers"])
    params["n_layers"] = n_layers
    for i in range(n_layers):
        params[f"units_{i}"] = _suggest(trial, f"units_{i}", space["units"])
        params[f"dropout_{i}"] = _suggest(trial, f"dropout_{i}", space["dropout"])
    for name in ("batch_norm", "learning_rate", "optimizer", "batch_size"):
        params[name] = _suggest(trial, name, space[name])
    for name in ("label_smoothing", "weight_decay", "phylum_loss_weight"):
        if name in space:  # a study created before a dimension existed does not sample it
            params[name] = _suggest(trial, name, space[name])
    return params


def _suggest(trial: optuna.Trial, name: str, dim: Dimension) -> Any:
    if isinstance(dim, Categorical):
        return trial.suggest_categorical(name, list(dim.choices))
    if isinstance(dim, IntRange):
        return trial.suggest_int(name, dim.low, dim.high, log=dim.log)
    return trial.suggest_float(name, dim.low, dim.high, log=dim.log)


def load_space(path: Path | None) -> tuple[dict[str, Dimension], set[str]]:
    """The default space narrowed by a TOML/JSON file; also returns the names the file set."""
    space = dict(DEFAULT_SPACE)
    if path is None:
        return space, set()
    path = Path(path)
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"search-space file {path} not found: check the --space path") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"search-space file {path} is not valid TOML/JSON: {exc}") from None
    overrides = raw.get("space", raw)
    if not isinstance(overrides, dict):
        raise ConfigError(f"search-space file {path}: expected a table of parameters")
    for name, value in overrides.items():
        space[name] = narrow(name, value)
    return space, set(overrides)


def narrow(name: str, value: Any) -> Dimension:
    """Turn one file entry into a dimension, checked against the default."""
    if name not in DEFAULT_SPACE:
        raise ConfigError(
            f"unknown search-space parameter {name!r}: choose from {', '.join(DEFAULT_SPACE)}"
        )
    default = DEFAULT_SPACE[name]
    if isinstance(default, Categorical):
        choices = tuple(value) if isinstance(value, list) else (value,)
        if not choices:
            raise ConfigError(f"search-space parameter {name!r} needs at least one choice")
        for choice in choices:
            if name == "backbone":
                get_spec(choice)
            elif choice not in default.choices:
                raise ConfigError(
                    f"search-space parameter {name!r}: {choice!r} is not one of "
                    f"{list(default.choices)}"
                )
        return Categorical(choices)
    if isinstance(value, dict):
        low, high = value.get("low", default.low), value.get("high", default.high)
        log = bool(value.get("log", default.log))
    elif isinstance(value, list) and len(value) == 2:
        (low, high), log = value, default.log
    else:
        low = high = value
        log = False
    if isinstance(default, IntRange):
        if not all(isinstance(v, int) for v in (low, high)):
            raise ConfigError(f"search-space parameter {name!r} takes integers, got {value!r}")
        dim: Dimension = IntRange(int(low), int(high), log)
    else:
        dim = FloatRange(float(low), float(high), log)
    if dim.low > dim.high or (dim.log and dim.low <= 0):
        raise ConfigError(f"search-space parameter {name!r}: bad range {value!r}")
    if name == "n_layers" and not (1 <= dim.low and dim.high <= MAX_LAYERS):
        raise ConfigError(f"n_layers must lie within 1..{MAX_LAYERS}")
    return dim


def resolve_backbones(
    space: dict[str, Dimension], weights: str, image_size: int, explicit: bool
) -> tuple[dict[str, Dimension], list[str]]:
    """Make sure every backbone in the space can be built, and say which were left out.

    Backbones a space file names explicitly are built once now: Keras downloads their weights
    when online, and offline the WeightsError names the file to fetch. From the *default* space,
    backbones whose weights are not on this machine are left out (returned as the second value),
    so an air-gapped search runs on what it has instead of failing on its first trial.
    """
    dim = space["backbone"]
    assert isinstance(dim, Categorical)
    missing = [b for b in dim.choices if not weights_available(b, weights, image_size)]
    if explicit:
        from search.backbones import build_backbone

        for name in missing:
            build_backbone(name, image_size, weights)  # downloads, or raises WeightsError
        return space, []
    ok = tuple(b for b in dim.choices if b not in missing)
    if not ok:
        raise ConfigError("no backbone in the search space has its weights available")
    return {**space, "backbone": Categorical(ok)}, missing


def to_json(space: dict[str, Dimension]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, dim in space.items():
        if isinstance(dim, Categorical):
            out[name] = {"choices": list(dim.choices)}
        else:
            out[name] = {
                "low": dim.low,
                "high": dim.high,
                "log": dim.log,
                "int": isinstance(dim, IntRange),
            }
    return out


def from_json(raw: dict[str, Any]) -> dict[str, Dimension]:
    space: dict[str, Dimension] = {}
    for name, value in raw.items():
        if "choices" in value:
            space[name] = Categorical(tuple(value["choices"]))
        elif value.get("int"):
            space[name] = IntRange(int(value["low"]), int(value["high"]), bool(value["log"]))
        else:
            space[name] = FloatRange(float(value["low"]), float(value["high"]), bool(value["log"]))
    return space
