"""One settings object for every path, URL and size: arguments > environment > defaults.

No other module reads the environment; the CLI builds a Settings and passes it down.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "SEARCH_"


@dataclass(frozen=True)
class Settings:
    """Where things live and how a worker behaves. Field names map to SEARCH_<NAME> variables."""

    storage: str = "sqlite:///study_db/search.sqlite3"
    study: str = "rare-species"
    data_dir: Path = Path("data/prepared")
    features_dir: Path = Path("data/features")
    models_dir: Path = Path("models")
    artifacts_dir: Path = Path("models/artifacts")
    artifact_url: str = ""  # s3://bucket: S3-compatible artifact store instead of artifacts_dir
    weights: str = "imagenet"
    space_file: Path | None = None
    max_epochs: int = 20
    feature_views: int = 2
    seed: int = 0
    pruner: str = "median"
    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retry: int = 2
    gpu_lock_dir: Path = Path("/tmp/search-gpu-locks")
    gpus: str = ""
    gpu_wait: bool = True
    # Past this resident size between trials, `search worker` starts itself afresh (same
    # command, same PID): TensorFlow keeps a few MB of every trial's model for good.
    worker_max_rss_mb: int = 5000
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Build settings from explicit overrides (CLI arguments, None = not given), then the
        environment (SEARCH_STORAGE, SEARCH_STUDY, ...), then the defaults above."""
        environ = os.environ if environ is None else environ
        overrides = dict(overrides or {})
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            raw: Any = overrides.get(f.name)
            if raw is None:
                raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.type, raw)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


# The PostgreSQL URL forms guides use, and the one SQLAlchemy loads the installed driver with.
POSTGRES_SCHEMES = ("postgres", "postgresql", "postgresql+psycopg2")
POSTGRES_DRIVER = "postgresql+psycopg"  # psycopg 3, what the project installs


def storage_url(url: str) -> str:
    """The URL SQLAlchemy should open: `postgres://` (Heroku and others) is not a scheme
    SQLAlchemy knows, and `postgresql+psycopg2://`, the form most guides write, names a driver
    the project does not install. Both, and plain `postgresql://`, go to psycopg 3 unless
    psycopg2 is installed; every other URL is left as it is."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in POSTGRES_SCHEMES:
        return url
    if importlib.util.find_spec("psycopg2") is not None:
        return url if scheme.lower() != "postgres" else f"postgresql://{rest}"
    return f"{POSTGRES_DRIVER}://{rest}"


def _convert(type_name: Any, raw: Any) -> Any:
    text = str(type_name)
    if isinstance(raw, str):
        if "Path" in text:
            return Path(raw)
        if text == "int":
            return int(raw)
        if text == "bool":
            return raw.strip().lower() in ("1", "true", "yes", "on")
    return raw
