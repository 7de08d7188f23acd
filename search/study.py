"""Storage URL -> Optuna storage and study: SQLite tuned for several local workers, PostgreSQL with
a small pre-pinged pool, heartbeats with retry of stale trials, sampler and pruner choice."""

from __future__ import annotations

import importlib.metadata
import platform
import random
import sqlite3
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy.exc
from filelock import FileLock
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy.engine import make_url

from search.errors import ConfigError, StorageError
from search.settings import Settings

T = TypeVar("T")
# Heartbeats, the retry callback and grouped TPE are marked experimental; we rely on them on
# purpose and the warnings would only clutter every worker's log.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
PRUNERS = ("median", "hyperband", "sha", "percentile", "none")
TRANSIENT = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLite: wait on a locked file instead of failing. Others: a small pool that checks each
    connection before use, so workers survive a database restart."""
    if make_url(url).get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": 120}}
    return {
        "pool_size": 2,
        "max_overflow": 2,
        "pool_pre_ping": True,
        "pool_recycle": 300,
        "connect_args": {"connect_timeout": 10},
    }


def with_retries(fn: Callable[[], T], what: str, attempts: int = 6, base_s: float = 0.5) -> T:
    """Retry a storage call on connection errors with jittered exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except TRANSIENT as exc:
            if attempt == attempts - 1:
                raise StorageError(f"{what} failed after {attempts} tries: {_reason(exc)}") from exc
            time.sleep(base_s * 2**attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_storage(settings: Settings, *, heartbeat: bool = True) -> RDBStorage:
    """Open (and create if needed) the RDB storage named by settings.storage."""
    url = settings.storage
    try:
        make_url(url)
    except Exception:
        raise StorageError(
            f"bad storage URL {url!r}: use sqlite:///path.sqlite3 or "
            "postgresql://user:password@host:5432/db"
        ) from None
    hb: dict[str, Any] = {}
    if heartbeat:
        hb = {
            "heartbeat_interval": settings.heartbeat_interval,
            "grace_period": settings.grace_period,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(
                max_retry=settings.max_retry
            ),
        }
    db_path = sqlite_path(url)

    def create() -> RDBStorage:
        return RDBStorage(url, engine_kwargs=engine_kwargs(url), **hb)

    try:
        if db_path is None:
            return with_retries(create, f"connecting to {redact(url)}", attempts=4)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        # One process at a time creates the tables; WAL lets readers and one writer overlap.
        with FileLock(str(db_path) + ".lock", timeout=120):
            with sqlite3.connect(db_path, timeout=120) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
            return create()
    except StorageError as exc:
        raise StorageError(
            f"cannot reach storage {redact(url)}: {exc}; check the URL and that the database "
            "server is running"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error, OSError) as exc:
        raise StorageError(
            f"cannot open storage {redact(url)}: {_reason(exc)}; check the URL, the path and "
            "that the database server is running"
        ) from None
    except ImportError as exc:
        raise StorageError(f"no database driver for {redact(url)}: {exc}") from None


def make_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    """Median is the default: see benchmarks/pruners.py for the measurement behind the choice."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(33.0, n_startup_trials=4, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=max_epochs)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=2)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner {name!r}: choose one of {', '.join(PRUNERS)}")


def make_sampler(seed: int | None = None) -> optuna.samplers.BaseSampler:
    """TPE that models dependent parameters together and, with several workers, treats running
    trials as bad (constant liar) so workers do not all try the same region."""
    return optuna.samplers.TPESampler(
        multivariate=True, group=True, constant_liar=True, n_startup_trials=8, seed=seed
    )


def library_versions() -> dict[str, str]:
    """What a re-run must match to reproduce a trial."""
    import keras

    names = ["optuna", "keras", "numpy", "scikit-learn", "pillow", "rare-species-search"]
    backend = keras.backend.backend()
    names.append({"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}.get(backend, backend))
    versions = {"python": platform.python_version(), "keras_backend": backend}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def create_or_load(storage: RDBStorage, settings: Settings) -> optuna.Study:
    """The study the first worker creates and every later worker loads."""

    def create() -> optuna.Study:
        return optuna.create_study(
            storage=storage,
            study_name=settings.study,
            direction="maximize",
            sampler=make_sampler(),
            pruner=make_pruner(settings.pruner, settings.max_epochs),
            load_if_exists=True,
        )

    return with_retries(create, f"creating study {settings.study!r}")


def load(storage: RDBStorage, settings: Settings) -> optuna.Study:
    """Load an existing study; a missing one is an error that lists what exists."""

    def get() -> optuna.Study:
        return optuna.load_study(
            study_name=settings.study,
            storage=storage,
            sampler=make_sampler(),
            pruner=make_pruner(settings.pruner, settings.max_epochs),
        )

    try:
        return with_retries(get, f"loading study {settings.study!r}")
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        have = ", ".join(names) if names else "none"
        raise StorageError(
            f"study {settings.study!r} not found in {redact(settings.storage)} (studies there: "
            f"{have}); check --study, or start a worker to create it"
        ) from None
