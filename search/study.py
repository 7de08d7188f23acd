"""Storage URL -> Optuna storage and study: SQLite tuned for several local workers, PostgreSQL with
a small pre-pinged pool, heartbeats with retry of stale trials, sampler and pruner choice; the
artifact store (a folder, or S3-compatible storage) and the gRPC storage proxy for large fleets."""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import platform
import random
import re
import sqlite3
import sys
import time
import warnings
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import optuna
import sqlalchemy
import sqlalchemy.exc
import sqlalchemy.orm
import sqlalchemy.pool
from filelock import FileLock
from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore
from optuna.artifacts._protocol import ArtifactStore
from optuna.storages import GrpcStorageProxy, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._rdb import models as rdb_models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url

from search.errors import ConfigError, StorageError
from search.settings import Settings, storage_url

T = TypeVar("T")
# Heartbeats, the retry callback and grouped TPE are marked experimental; we rely on them on
# purpose and the warnings would only clutter every worker's log.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
PRUNERS = ("median", "hyperband", "sha", "percentile", "none")
TRANSIENT = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
UPSERTS = {"postgresql": pg_dialect.insert, "sqlite": sqlite_dialect.insert}
# A suggested parameter waiting to be written: name, internal value, distribution, previous one.
_Param = tuple[str, float, optuna.distributions.BaseDistribution, Any]
# A head trial's reports reach the database at least this often (see reports_together).
REPORTS_EVERY_S = 5.0
SCHEMA_LOCK = 0x5EA4C4  # pg_advisory_lock key: one process at a time creates the tables


@dataclass
class _Reports:
    """A trial's reports not written yet, and when its reports were last written."""

    every_s: float
    written_at: float
    values: dict[int, float] = field(default_factory=dict)


@dataclass
class _Attrs:
    """A trial's user and system attributes not written yet."""

    user: dict[str, Any] = field(default_factory=dict)
    system: dict[str, Any] = field(default_factory=dict)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs; also one SQLAlchemy cannot parse
    (a mistyped port), since that is exactly when the URL ends up in an error message."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"(://[^/@]*?:)[^/]*@", r"\1***@", url)


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


POOL_SIZE = 2  # the worker's main thread and its heartbeat thread
MAX_OVERFLOW = 1  # a spare for the rare overlap (status, callbacks): 3 connections at most


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLite: wait on a locked file instead of failing. Others: a small pool that checks each
    connection before use, so workers survive a database restart; its size bounds the
    connections one worker can hold (docs/fleet.md does the max_connections arithmetic)."""
    if make_url(url).get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": 120}}
    return {
        "pool_size": POOL_SIZE,
        "max_overflow": MAX_OVERFLOW,
        "pool_pre_ping": True,
        "pool_recycle": 300,
        "connect_args": {"connect_timeout": 10},
    }


def is_transient(exc: BaseException | None) -> bool:
    """A lost database connection anywhere in the exception's chain: Optuna wraps some in
    StorageInternalError, and its tell can turn one into another error on its way out."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, TRANSIENT):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def with_retries(fn: Callable[[], T], what: str, attempts: int = 6, base_s: float = 0.5) -> T:
    """Retry a storage call on connection errors with jittered exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts - 1:
                raise StorageError(f"{what} failed after {attempts} tries: {_reason(exc)}") from exc
            time.sleep(base_s * 2**attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class ResilientRDBStorage(RDBStorage):
    """RDBStorage whose heartbeat outlives a database restart.

    Optuna's heartbeat thread ends at the first error it meets, so a short outage would leave a
    healthy trial without heartbeat, and another worker would fail it as stale half-way through.
    Here a failed beat is logged and the next one, an interval later, tries again."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as exc:
            if not is_transient(exc):
                raise
            print(
                f"heartbeat: trial id {trial_id} missed a beat ({_reason(exc)}); trying again",
                file=sys.stderr,
                flush=True,
            )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_params: dict[int, list[_Param]] = {}
        self._pending_reports: dict[int, _Reports] = {}
        self._pending_attrs: dict[int, _Attrs] = {}
        # The trial this process has just created, until the first read of a trial: Optuna's
        # `ask` reads the trial it created straight back (6 queries), and it can only hold
        # what creating it returned, since nothing else knows of it yet.
        self._just_created: FrozenTrial | None = None
        # The trial this process last started (created, or taken from the queue): an outage
        # in `ask`, after the trial is running but before the worker has it, would otherwise
        # leave it RUNNING for good, with no heartbeat for anyone to find it stale by.
        self.last_started_trial_id: int | None = None

    def _create_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None = None
    ) -> FrozenTrial:
        trial = super()._create_new_trial(study_id, template_trial)
        if trial.state == TrialState.RUNNING:
            self.last_started_trial_id = trial._trial_id
        self._just_created = trial if template_trial is None else None
        return trial

    def get_trial(self, trial_id: int) -> FrozenTrial:
        created, self._just_created = self._just_created, None
        if created is not None and created._trial_id == trial_id:
            return copy.deepcopy(created)  # Optuna's cache keeps the object it created
        return super().get_trial(trial_id)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        if changed and state == TrialState.RUNNING:  # a queued trial taken by this process
            self.last_started_trial_id = trial_id
        return changed

    @contextlib.contextmanager
    def params_together(self, trial_id: int) -> Iterator[None]:
        """Within the block, the trial's suggested parameters are kept and then written in one
        transaction (one trial look-up and check, one commit) instead of one transaction per
        suggest. Nothing reads a trial's own parameters from the storage in between: the trial
        keeps them in memory, and other workers' samplers see them a few milliseconds later."""
        self._pending_params[trial_id] = []
        try:
            yield
        finally:
            rows = self._pending_params.pop(trial_id)
            if rows:
                with _create_scoped_session(self.scoped_session, True) as session:
                    self._add_params(session, trial_id, rows)

    def _set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: optuna.distributions.BaseDistribution,
        previous_distribution: optuna.distributions.BaseDistribution | None,
    ) -> None:
        pending = self._pending_params.get(trial_id)
        if pending is None:
            super()._set_trial_param(
                trial_id, param_name, param_value_internal, distribution, previous_distribution
            )
            return
        pending.append((param_name, param_value_internal, distribution, previous_distribution))

    def _add_params(
        self, session: sqlalchemy.orm.Session, trial_id: int, rows: list[_Param]
    ) -> None:
        """Optuna's checks (`_set_trial_param_without_commit`) for several parameters."""
        trial = rdb_models.TrialModel.find_or_raise_by_id(trial_id, session)
        self.check_trial_is_updatable(trial_id, trial.state)
        for name, value, distribution, previous in rows:
            if previous is None:
                record = (
                    session.query(rdb_models.TrialParamModel)
                    .join(rdb_models.TrialModel)
                    .filter(rdb_models.TrialModel.study_id == trial.study_id)
                    .filter(rdb_models.TrialParamModel.param_name == name)
                    .first()
                )
                if record is not None:
                    previous = optuna.distributions.json_to_distribution(record.distribution_json)
            if previous is not None:
                optuna.distributions.check_distribution_compatibility(previous, distribution)
            session.add(
                rdb_models.TrialParamModel(
                    trial_id=trial_id,
                    param_name=name,
                    param_value=value,
                    distribution_json=optuna.distributions.distribution_to_json(distribution),
                )
            )

    @contextlib.contextmanager
    def reports_together(self, trial_id: int, every_s: float) -> Iterator[None]:
        """Within the block, the trial's reports are kept and written together at most every
        `every_s` seconds and when the block ends (also by an exception: a pruned trial's
        value is its last report). A report costs a transaction (trial look-up and check,
        upsert, commit; 3-4 ms on PostgreSQL), a trial makes one per epoch, and nothing needs
        them sooner: the trial's own pruning check reads its reports from memory, other trials'
        pruners read finished trials, and the dashboard's live curve lags by at most `every_s`."""
        pending = _Reports(every_s=every_s, written_at=time.monotonic())
        self._pending_reports[trial_id] = pending
        try:
            yield
        finally:
            del self._pending_reports[trial_id]
            if pending.values:
                self._write_reports(trial_id, pending.values)

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        pending = self._pending_reports.get(trial_id)
        if pending is None:
            self._write_reports(trial_id, {step: intermediate_value})
            return
        pending.values[step] = intermediate_value
        now = time.monotonic()
        if now - pending.written_at >= pending.every_s:
            self._write_reports(trial_id, pending.values)
            pending.values.clear()  # only once written: an outage keeps them for the next try
            pending.written_at = now

    def _write_reports(self, trial_id: int, values: dict[int, float]) -> None:
        """Reports in one transaction: Optuna's check that the trial is still running, then one
        multi-row upsert (Optuna looks each step up and then inserts or updates it)."""
        insert = UPSERTS.get(self.engine.name)
        with _create_scoped_session(self.scoped_session, True) as session:
            if insert is None:
                for step, value in values.items():
                    self._set_trial_intermediate_value_without_commit(
                        session, trial_id, step, value
                    )
                return
            model = rdb_models.TrialIntermediateValueModel
            rows = []
            for step, value in values.items():
                stored, kind = model.intermediate_value_to_stored_repr(value)
                rows.append(
                    {
                        "trial_id": trial_id,
                        "step": step,
                        "intermediate_value": stored,
                        "intermediate_value_type": kind,
                    }
                )
            trial = rdb_models.TrialModel.find_or_raise_by_id(trial_id, session)
            self.check_trial_is_updatable(trial_id, trial.state)
            self._upsert(session, insert, model, rows, ("trial_id", "step"))

    @staticmethod
    def _upsert(
        session: sqlalchemy.orm.Session,
        insert: Callable[..., Any],
        model: Any,
        rows: list[dict[str, Any]],
        keys: tuple[str, ...],
    ) -> None:
        """All `rows` in one INSERT ... ON CONFLICT (keys) DO UPDATE of the other columns."""
        if not rows:
            return
        statement = insert(model).values(rows)
        session.execute(
            statement.on_conflict_do_update(
                index_elements=[getattr(model, k) for k in keys],
                set_={c: statement.excluded[c] for c in rows[0] if c not in keys},
            )
        )

    @contextlib.contextmanager
    def attrs_together(self, trial_id: int) -> Iterator[None]:
        """Within the block, the trial's user and system attributes (artifact uploads record
        theirs as system attributes) are kept and written in one transaction when the block
        ends, also by an exception: at a trial's end that is one transaction instead of one
        per artifact and one for the attributes. Nothing reads them back from the storage in
        between: the trial keeps its user attributes in memory."""
        pending = self._pending_attrs[trial_id] = _Attrs()
        try:
            yield
        finally:
            del self._pending_attrs[trial_id]
            if pending.user or pending.system:
                self._write_attrs(trial_id, pending)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        pending = self._pending_attrs.get(trial_id)
        if pending is None:
            super().set_trial_system_attr(trial_id, key, value)
            return
        pending.system[key] = value

    def set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        """Several user attributes in one statement and one transaction: RDBStorage writes one
        attribute per transaction (a look-up, an upsert and a commit, with its fsync, each).
        Within `attrs_together` they are kept until the block ends."""
        pending = self._pending_attrs.get(trial_id)
        if pending is None:
            self._write_attrs(trial_id, _Attrs(user=dict(attrs)))
            return
        pending.user.update(attrs)

    def _write_attrs(self, trial_id: int, attrs: _Attrs) -> None:
        """User and system attributes in one transaction: the same checks and upsert as
        Optuna's, one statement per kind on PostgreSQL and SQLite; one by one on others."""
        kinds = (
            (rdb_models.TrialUserAttributeModel, attrs.user),
            (rdb_models.TrialSystemAttributeModel, attrs.system),
        )
        insert = UPSERTS.get(self.engine.name)
        with _create_scoped_session(self.scoped_session, True) as session:
            trial = rdb_models.TrialModel.find_or_raise_by_id(trial_id, session)
            self.check_trial_is_updatable(trial_id, trial.state)
            for model, values in kinds:
                if insert is None:
                    for key, value in values.items():
                        self._set_trial_attr_without_commit(session, model, trial_id, key, value)
                    continue
                rows = [
                    {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                    for k, v in values.items()
                ]
                self._upsert(session, insert, model, rows, ("trial_id", "key"))


class QueueAwareCachedStorage(_CachedStorage):
    """Optuna's trial cache (what `optuna.load_study` wraps an RDB storage in), except that
    `ask` looks for a queued trial with one indexed query: Optuna reads every unfinished trial
    of the study whole for it (7 queries, all other workers' running trials with their
    parameters, attributes and reports), to find that none is queued, as is almost always the
    case. Uses Optuna's private `_CachedStorage` on purpose (optuna is pinned to 5.x)."""

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        if states == (TrialState.WAITING,) and not self._has_waiting_trials(study_id):
            return []
        return super().get_all_trials(study_id, deepcopy, states)

    def _has_waiting_trials(self, study_id: int) -> bool:
        """Whether the study's queue holds a trial (one indexed query)."""
        trials = rdb_models.TrialModel.__table__
        query = (
            sqlalchemy.select(trials.c.trial_id)
            .where(trials.c.study_id == study_id, trials.c.state == TrialState.WAITING)
            .limit(1)
        )
        with self._backend.engine.connect() as conn:
            return conn.execute(query).first() is not None


def cached(storage: RDBStorage | GrpcStorageProxy) -> optuna.storages.BaseStorage:
    """The storage a study opens: an RDB storage behind Optuna's trial cache."""
    if isinstance(storage, RDBStorage):
        return QueueAwareCachedStorage(storage)
    return storage


def rdb_behind(storage: optuna.storages.BaseStorage) -> RDBStorage | None:
    """The RDB storage behind Optuna's trial cache (`study._storage`, `trial.storage`), for
    what Optuna's API cannot do in one query or one transaction; None on any other storage
    (the gRPC proxy, in-memory studies)."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) else None


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """Set a running trial's user attributes together: one transaction on our RDB storage, one
    by one on any other (the gRPC proxy, in-memory studies). `trial.user_attrs` shows them."""
    backend = rdb_behind(trial.storage)
    if not isinstance(backend, ResilientRDBStorage):
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    backend.set_trial_user_attrs(trial._trial_id, attrs)
    trial._cached_frozen_trial.user_attrs.update(attrs)  # what Trial.set_user_attr does too


def _together_on_our_storage(
    trial: optuna.Trial, block: Callable[[ResilientRDBStorage], contextlib.AbstractContextManager]
) -> contextlib.AbstractContextManager:
    """`block(storage)` where the trial is on our RDB storage; a block that does nothing on any
    other (the gRPC proxy, in-memory studies), where each write goes out at once."""
    backend = rdb_behind(trial.storage)
    if not isinstance(backend, ResilientRDBStorage):
        return contextlib.nullcontext()
    return block(backend)


def attrs_together(trial: optuna.Trial) -> contextlib.AbstractContextManager:
    """Write the trial's user and system attributes set within the block (artifact uploads
    included) in one transaction at its end on our RDB storage (see
    ResilientRDBStorage.attrs_together); one by one on any other."""
    return _together_on_our_storage(trial, lambda s: s.attrs_together(trial._trial_id))


def params_together(trial: optuna.Trial) -> contextlib.AbstractContextManager:
    """Write the parameters a trial suggests within the block in one transaction on our RDB
    storage (see ResilientRDBStorage.params_together); one by one on any other."""
    return _together_on_our_storage(trial, lambda s: s.params_together(trial._trial_id))


def reports_together(
    trial: optuna.Trial, every_s: float = REPORTS_EVERY_S
) -> contextlib.AbstractContextManager:
    """Write the trial's reports within the block together, at most every `every_s` seconds
    and at its end, on our RDB storage (see ResilientRDBStorage.reports_together); one by one
    on any other."""
    return _together_on_our_storage(trial, lambda s: s.reports_together(trial._trial_id, every_s))


def open_storage(settings: Settings, *, heartbeat: bool = True) -> RDBStorage | GrpcStorageProxy:
    """Open (and create if needed) the RDB storage named by settings.storage, or connect to a
    storage proxy for grpc://host:port."""
    shown = settings.storage  # messages show the URL as the user wrote it, less its password
    if shown.startswith("grpc://"):
        return _connect_proxy(shown)
    url = storage_url(shown)
    try:
        make_url(url)
    except Exception:
        raise StorageError(
            f"bad storage URL {redact(shown)!r}: use sqlite:///path.sqlite3 or "
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
        if make_url(url).get_backend_name() != "postgresql":
            return ResilientRDBStorage(url, engine_kwargs=engine_kwargs(url), **hb)
        # Workers started together race to create Optuna's tables on a fresh database, and
        # PostgreSQL rejects all but one; an advisory lock lets them in one at a time. It is
        # held by this connection and ends with it.
        locker = sqlalchemy.create_engine(
            url, poolclass=sqlalchemy.pool.NullPool, connect_args={"connect_timeout": 10}
        )
        try:
            with locker.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK})
                return ResilientRDBStorage(url, engine_kwargs=engine_kwargs(url), **hb)
        finally:
            locker.dispose()

    try:
        if db_path is None:
            return with_retries(create, f"connecting to {redact(shown)}", attempts=4)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        # One process at a time creates the tables; WAL lets readers and one writer overlap.
        with FileLock(str(db_path) + ".lock", timeout=120):
            with sqlite3.connect(db_path, timeout=120) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
            return create()
    except StorageError as exc:
        raise StorageError(
            f"cannot reach storage {redact(shown)}: {exc}; check the URL and that the database "
            "server is running"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error, OSError) as exc:
        raise StorageError(
            f"cannot open storage {redact(shown)}: {_reason(exc)}; check the URL, the path and "
            "that the database server is running"
        ) from None
    except ImportError as exc:
        raise StorageError(
            f"no database driver for {redact(shown)} ({exc}): the installed drivers open "
            "sqlite:///path.sqlite3 and postgresql://user:password@host:5432/db"
        ) from None


def _connect_proxy(url: str) -> GrpcStorageProxy:
    """A client of `serve_storage_proxy`. Optuna 5's gRPC client sends no heartbeats, so behind
    a proxy a SIGKILLed worker's trial is not failed on its own (docs/fleet.md)."""
    parts = urlsplit(url)
    if not parts.hostname or not parts.port:
        raise StorageError(f"bad storage URL {url!r}: use grpc://host:port")
    proxy = GrpcStorageProxy(host=parts.hostname, port=parts.port)
    try:
        proxy.wait_server_ready(timeout=60)
    except ConnectionError:
        raise StorageError(
            f"cannot reach the storage proxy at {parts.hostname}:{parts.port}: check that the "
            "storage-proxy service is running"
        ) from None
    return proxy


def open_artifact_store(settings: Settings) -> ArtifactStore:
    """Where checkpoints and histories go: `artifacts_dir` (a folder every worker and the
    dashboard mount), or `artifact_url` = s3://bucket for S3-compatible storage, reached with
    boto3's usual AWS_* variables (AWS_ENDPOINT_URL for MinIO and the like)."""
    if not settings.artifact_url:
        try:
            settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the artifact folder {settings.artifacts_dir} ({exc.strerror}): "
                "check --artifacts-dir / SEARCH_ARTIFACTS_DIR"
            ) from None
        return FileSystemArtifactStore(str(settings.artifacts_dir))
    parts = urlsplit(settings.artifact_url)
    if parts.scheme != "s3" or not parts.netloc or parts.path.strip("/") or parts.query:
        raise ConfigError(
            f"artifact URL {settings.artifact_url!r} is not supported: use s3://bucket (no "
            "key prefix), or leave SEARCH_ARTIFACT_URL empty to use SEARCH_ARTIFACTS_DIR"
        )
    try:
        import boto3  # noqa: F401  (optional: only S3 users need it)
    except ImportError:
        raise ConfigError(
            "SEARCH_ARTIFACT_URL is an s3:// URL but boto3 is not installed: pip install boto3"
        ) from None
    return Boto3ArtifactStore(parts.netloc)


def serve_storage_proxy(settings: Settings, host: str = "0.0.0.0", port: int = 13000) -> None:
    """Serve the study storage over gRPC (Optuna's storage proxy): a large fleet then holds one
    connection pool here instead of one per worker. Workers use SEARCH_STORAGE=grpc://host:port;
    heartbeats and retries of stale trials run here, on the RDB side."""
    from optuna.storages import run_grpc_proxy_server

    storage = open_storage(settings)
    print(f"storage proxy: serving {redact(settings.storage)} on {host}:{port}", flush=True)
    run_grpc_proxy_server(storage, host=host, port=port)


def make_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    """Median (8 startup trials, 5 warm-up epochs) is the default. benchmarks/pruners.py, 24
    trials x 2 seeds: it reached the same best validation and test macro-F1 as no pruning with
    80% of the epochs, while the eager median (4, 2), percentile, SHA and Hyperband saved 50-77%
    of the epochs but lost 0.02-0.05 test macro-F1. Choose `sha` or `hyperband` for speed."""
    if name == "median":
        return FromStep(optuna.pruners.MedianPruner(n_startup_trials=8, n_warmup_steps=5), 5)
    if name == "percentile":
        return FromStep(
            optuna.pruners.PercentilePruner(33.0, n_startup_trials=4, n_warmup_steps=2), 2
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=max_epochs)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=2)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner {name!r}: choose one of {', '.join(PRUNERS)}")


def is_new_best(trial: optuna.Trial, value: float) -> bool:
    """Whether `value` beats every complete trial so far (one indexed query on RDB storage)."""
    try:
        return value > trial.study.best_value
    except ValueError:  # no complete trial yet
        return True


class FromStep(optuna.pruners.BasePruner):
    """Asks `pruner` (Optuna's median or percentile) only from step `first` on, where its warm-up
    ends, and hands it the study's complete trials read once per trial.

    Both pruners read every complete trial of the study, and the study's direction, from the
    storage at each step, though before warm-up ends the answer is a certain "no", and a trial
    that completes elsewhere while this one runs changes a median of hundreds by little. So a
    trial pays one study read for pruning instead of one per epoch (benchmarks/
    storage_throughput.py); trials completed during it count from the worker's next trial."""

    def __init__(self, pruner: optuna.pruners.BasePruner, first: int) -> None:
        self.pruner, self.first = pruner, first
        self._view: tuple[int, _CompleteTrials] | None = None

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.first:
            return False
        if self._view is None or self._view[0] != trial._trial_id:
            self._view = (trial._trial_id, _CompleteTrials(study))
        return self.pruner.prune(self._view[1], trial)  # type: ignore[arg-type]


class _CompleteTrials:
    """The two things a percentile pruner asks of a study, read once: its direction and its
    complete trials (Optuna's own read, `deepcopy=False`: shared, not to be changed)."""

    def __init__(self, study: optuna.Study) -> None:
        self.direction = study.direction
        self._complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def get_trials(
        self, deepcopy: bool = True, states: tuple[TrialState, ...] | None = None
    ) -> list[optuna.trial.FrozenTrial]:
        if states != (TrialState.COMPLETE,):
            raise NotImplementedError("this view holds the complete trials only")
        return list(self._complete)


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


OBJECTIVE_NAME = "validation macro-F1"  # what the dashboard and reports call the objective


def create_or_load(storage: RDBStorage, settings: Settings) -> optuna.Study:
    """The study the first worker creates and every later worker loads. Its objective is named
    (optuna-dashboard would say "Objective 0"), also on a study created before it was: one
    read per worker start, and a write only where the name is missing."""

    def create() -> optuna.Study:
        return optuna.create_study(
            storage=cached(storage),
            study_name=settings.study,
            direction="maximize",
            sampler=make_sampler(),
            pruner=make_pruner(settings.pruner, settings.max_epochs),
            load_if_exists=True,
        )

    study = with_retries(create, f"creating study {settings.study!r}")
    if with_retries(lambda: study.metric_names, "reading the objective's name") is None:
        # Two workers may both write it: the same value, and Optuna ignores the second insert.
        with_retries(lambda: study.set_metric_names([OBJECTIVE_NAME]), "naming the objective")
    return study


def load(storage: RDBStorage, settings: Settings) -> optuna.Study:
    """Load an existing study; a missing one is an error that lists what exists."""

    def get() -> optuna.Study:
        return optuna.load_study(
            study_name=settings.study,
            storage=cached(storage),
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
