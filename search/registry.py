"""The champion registry under models/: promote the best trial, list the history, roll back,
load the champion, evaluate a version (`search evaluate`). Scoring is search/evaluate.py and
the pages search/reports.py; the registry uses both and neither uses it.

Layout:
    models/history/<time>-<study>-<trial>/   every champion ever promoted, kept whole:
        model.keras  champion.json  MODEL_CARD.md  evaluation.json  per_family.csv  reports/
    models/champion -> history/<id>           a relative symlink to the current one
    models/evaluations/<version>/            `search evaluate` of a version, swapped in whole

A promotion writes a complete new version folder first (staged as history/.<version>.*) and then
swaps the `champion` link with one atomic rename, so a crash at any point leaves the previous
champion whole and current; stale staging folders are removed by the next promotion. A file lock
makes concurrent promotions and rollbacks fail fast instead of interleaving; it is taken before
the heavy imports (Keras), so the loser says so at once.

Every promotion and rollback is also recorded in the study's database (table
`search_promotions`, created with SQLAlchemy Core on the study storage URL, SQLite or PostgreSQL),
so every machine sharing the study sees the same history.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa
from filelock import FileLock, Timeout

from search.durable import fsync_dir, fsync_tree
from search.errors import PromotionInProgress, RegistryError
from search.settings import Settings

if TYPE_CHECKING:
    import optuna

    from search.evaluate import HeldOutSplit

MODEL_FILE = "model.keras"
INFO_FILE = "champion.json"
CARD_FILE = "MODEL_CARD.md"
PREDICT_BATCH = 64
LOCK_FILE = ".registry.lock"
EVALUATIONS_DIR = "evaluations"  # models/evaluations/<version>/: `search evaluate` output

_METADATA = sa.MetaData()
PROMOTIONS = sa.Table(
    "search_promotions",
    _METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("action", sa.String(16), nullable=False),  # promote | rollback
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("who", sa.String(255), nullable=False),  # user@host
    sa.Column("version", sa.String(255), nullable=False),
    sa.Column("previous", sa.String(255)),
    sa.Column("study", sa.String(512)),
    sa.Column("trial", sa.Integer),
    sa.Column("metrics", sa.JSON),
    sa.Column("registry", sa.Text),  # the models folder on the machine that did it
)


@dataclass
class Champion:
    path: Path
    model: Any
    info: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def phyla(self) -> list[str]:
        return list(self.info["phyla"])

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for uint8 images (n, size, size, 3), in fixed-size batches so the same
        images always give the same numbers."""
        chunks = [
            np.asarray(
                self.model.predict_on_batch(images[i : i + PREDICT_BATCH].astype(np.float32))
            )
            for i in range(0, len(images), PREDICT_BATCH)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes)), np.float32)


def champion_link(models_dir: Path) -> Path:
    return Path(models_dir) / "champion"


def history_dir(models_dir: Path) -> Path:
    return Path(models_dir) / "history"


def load_champion(models_dir: Path, path: Path | None = None) -> Champion:
    """Load the current champion (or the version at `path`)."""
    folder = Path(path) if path is not None else champion_link(models_dir)
    if not folder.exists():
        raise RegistryError(f"no champion at {folder}: run promote-best first")
    try:
        import keras

        info = json.loads((folder / INFO_FILE).read_text())
        model = keras.models.load_model(folder / MODEL_FILE, compile=False)
    except Exception as exc:
        raise RegistryError(
            f"champion at {folder} fails to load ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); promote again with --force "
            "or roll back to an earlier version"
        ) from None
    return Champion(folder.resolve(), model, info)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The complete trial with the highest value and a checkpoint (the lowest number among
    equals)."""
    trials = top_trials(study, 1)
    if not trials:
        raise _nothing_to_promote(study)
    return trials[0]


def _nothing_to_promote(study: optuna.Study) -> RegistryError:
    return RegistryError(
        f"study {study.study_name!r} has no complete trial to promote: run `search worker` first"
    )


def top_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The k best complete trials with a checkpoint, best first (the lowest number among
    equals). On RDB storage one query finds them, and the whole study is read only when one
    of them has no checkpoint: reading every trial whole took seconds at 2,000 trials
    (benchmarks/big_study.py)."""
    from optuna.trial import TrialState

    ids = _top_trial_ids(study, k)
    if ids is not None:
        found = [study._storage.get_trial(i) for i in ids]
        if all("checkpoint" in t.user_attrs for t in found):
            return found
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and "checkpoint" in t.user_attrs
    ]
    return sorted(complete, key=lambda t: (-t.value, t.number))[:k]


def _top_trial_ids(study: optuna.Study, k: int) -> list[int] | None:
    """Ids of the k complete trials with the highest finite values, lowest number first among
    equals (Optuna's own get_best_trial leaves ties open); None off RDB storage."""
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    from search.study import rdb_behind

    storage = rdb_behind(study._storage)
    if storage is None:
        return None
    trials, values = models.TrialModel.__table__, models.TrialValueModel.__table__
    query = (
        sa.select(trials.c.trial_id)
        .join(values, values.c.trial_id == trials.c.trial_id)
        .where(
            trials.c.study_id == study._study_id,
            trials.c.state == TrialState.COMPLETE,
            values.c.objective == 0,
            values.c.value_type == models.TrialValueModel.TrialValueType.FINITE,
        )
        .order_by(values.c.value.desc(), trials.c.number.asc())
        .limit(k)
    )
    with storage.engine.connect() as conn:
        return list(conn.execute(query).scalars())


# ---------------------------------------------------------------------------------------------
# promotion


@contextmanager
def registry_lock(models_dir: Path, what: str) -> Iterator[None]:
    """The registry's one writer at a time; a second one fails at once instead of waiting."""
    models_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(models_dir / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise PromotionInProgress(
            f"another promotion or rollback holds {models_dir / LOCK_FILE}: wait for it to "
            f"finish, then run {what} again"
        ) from None
    try:
        yield
    finally:
        lock.release()


def promote_best(
    settings: Settings,
    *,
    force: bool = False,
    ensemble: int | str | None = None,
    tta: str = "none",
) -> dict[str, Any]:
    """Promote the study's best complete trial (or, with `ensemble`, the ensemble selected from
    its best trials; with `tta`, averaged over the mirrored image: search.ensemble.choose) to
    models/champion, atomically, with its test-split evaluation, reports and model card; record
    it in the study's database."""
    models_dir = Path(settings.models_dir)
    with registry_lock(models_dir, "promote-best"):
        _log(f"promote: registry {models_dir} locked")
        return _promote_locked(settings, models_dir, force, ensemble, tta)


def _promote_locked(
    settings: Settings,
    models_dir: Path,
    force: bool,
    ensemble: int | str | None,
    tta: str,
) -> dict[str, Any]:
    import keras

    from search.champion_model import Member, build_champion
    from search.dataset import load_prepared
    from search.ensemble import AUTO_LIBRARY, choose, fetch, info_signature
    from search.evaluate import HeldOutSplit, score, with_version
    from search.reports import model_card, write_evaluation
    from search.study import load, open_artifact_store, open_storage, redact

    storage = open_storage(settings, heartbeat=False)
    study = load(storage, settings)
    attrs = study.user_attrs
    if ensemble is None:
        library_size = 1
    else:
        library_size = AUTO_LIBRARY if ensemble == "auto" else int(ensemble)
    candidates = top_trials(study, library_size)
    if not candidates:
        raise _nothing_to_promote(study)
    data = load_prepared(settings.data_dir)
    if attrs.get("data_hash") != data.data_hash:
        raise RegistryError(
            f"{settings.data_dir} is not the data study {settings.study!r} was run on: "
            "prepare the same source again, or point --data-dir at it"
        )
    store = open_artifact_store(settings)
    choice = choose(study.study_name, candidates, store, ensemble, tta)
    trial = choice.members[0][0]
    current = _current_info(models_dir)
    if (
        current
        and current.get("study") == study.study_name
        and info_signature(current) == choice.signature()
    ):
        return {"promoted": False, "reason": "already champion", **current}
    history = history_dir(models_dir)
    history.mkdir(parents=True, exist_ok=True)
    _remove_stale(models_dir)
    label = (
        f"ensemble{len(choice.members)}-{trial.number}" if choice.is_ensemble else str(trial.number)
    )
    version = _new_version(history, study.study_name, label + ("-tta" if choice.tta else ""))
    make_up = {
        "backbone": "+".join(dict.fromkeys(t.params["backbone"] for t, _ in choice.members)),
        "kind": "ensemble" if choice.is_ensemble else "single",
        "members": [
            {
                "trial": t.number,
                "weight": w,
                "backbone": t.params["backbone"],
                "val_macro_f1": t.value,
            }
            for t, w in choice.members
        ],
        "tta": "flip" if choice.tta else "none",
        "selection": choice.details,
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=history))
    try:
        _log(f"promote: assembling {describe_champion(make_up)}")
        members = []
        for member, weight in choice.members:
            checkpoint = staging / f"trial_{member.number}_checkpoint.keras"
            fetch(store, member, "checkpoint", checkpoint)
            members.append(Member(member, checkpoint, weight))
        keras.backend.clear_session()
        model = build_champion(members, data, settings, attrs, tta=choice.tta)
        for member in members:
            member.checkpoint.unlink()
        model.save(staging / MODEL_FILE)
        del model
        # Judge exactly what is stored: the saved file, loaded back as `search predict` will.
        meta = {"classes": data.classes, "phyla": data.phyla, "image_size": data.image_size}
        saved = Champion(
            staging, keras.models.load_model(staging / MODEL_FILE, compile=False), meta
        )
        split = HeldOutSplit.of(data)
        _log(f"promote: evaluating on {len(split.labels)} test images")
        probs, evaluation = score(saved, split)
        comparison, previous = _compare_with_current(models_dir, split, evaluation, force)
        evaluation = with_version(version, evaluation, previous)
        _log("promote: writing evaluation, reports and model card")
        write_evaluation(staging, evaluation, split, probs, version)
        info = {
            "version": version,
            "study": study.study_name,
            "trial": trial.number,
            "storage": redact(settings.storage),
            "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "promoted_by": who(),
            **make_up,
            "weights": attrs.get("weights"),
            "image_size": data.image_size,
            "classes": data.classes,
            "phyla": data.phyla,
            "data_hash": data.data_hash,
            "split_by": data.info.get("split_by", "image"),
            "params": trial.params,
            "seed": trial.user_attrs.get("seed"),
            "validation": {
                k.removeprefix("val_"): v
                for k, v in trial.user_attrs.items()
                if k.startswith("val_")
            }
            if not (choice.is_ensemble or choice.tta)
            else {"macro_f1": choice.val_macro_f1},
            "test": evaluation["metrics"],
            "previous": comparison,
        }
        budget = search_budget(study)
        info["n_trials"] = budget["n_trials"]
        card = model_card(info, evaluation, budget, data.info)
        (staging / CARD_FILE).write_text(card, encoding="utf-8")
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        os.chmod(staging, 0o755)  # mkdtemp made it private; a version is for every reader
        fsync_tree(staging)
        final = history / version
        staging.rename(final)
        point_champion_at(models_dir, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log(f"promote: champion is now {version}")
    previous_version = current.get("version") if current else None
    _record(_engine(storage), "promote", info, previous_version, models_dir)
    _save_note(study, info, evaluation, models_dir)
    return {"promoted": True, **info}


def describe_champion(info: dict[str, Any]) -> str:
    """'trial 7 (efficientnet_lite0)', or an ensemble's members and weights; + TTA."""
    from search.ensemble import champion_members

    members = champion_members(info)
    if len(members) > 1:
        parts = ", ".join(f"{m['trial']} x{m['weight']:.2f}" for m in members)
        text = f"an ensemble of {len(members)} trials ({parts}; {info['backbone']})"
    else:
        text = f"trial {members[0]['trial']} ({info['backbone']})"
    return text + (" with flip TTA" if info.get("tta") == "flip" else "")


def _new_version(history: Path, study: str, label: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    version = f"{stamp}-{study}-{label}"
    if (history / version).exists():
        version = f"{version}-{uuid.uuid4().hex[:6]}"
    return version


def _remove_stale(models_dir: Path) -> None:
    """Staging folders and temporary links of promotions that crashed (we hold the lock, so no
    other promotion is running)."""
    for path in history_dir(models_dir).glob(".*"):
        if path.is_dir() and not path.is_symlink():
            _log(f"promote: removing {path.name}, left by an interrupted promotion")
            shutil.rmtree(path, ignore_errors=True)
    for path in Path(models_dir).glob(".champion-*"):
        path.unlink(missing_ok=True)


def _current_info(models_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((champion_link(models_dir) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


def _compare_with_current(
    models_dir: Path, split: HeldOutSplit, new: dict[str, Any], force: bool
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Score the current champion on the same test split; refuse to replace a better one.
    Returns (champion.json's `previous`, evaluation.json's `previous`)."""
    from search.evaluate import compare, score

    if not champion_link(models_dir).exists():
        return None, None
    try:
        current = load_champion(models_dir)
        _, old = score(current, split)
    except RegistryError as exc:
        if not force:
            raise RegistryError(f"{exc}; use --force to replace it anyway") from None
        return {"version": None, "error": str(exc)}, None
    old_f1, new_f1 = old["metrics"]["macro_f1"], new["metrics"]["macro_f1"]
    if old_f1 > new_f1 and not force:
        raise RegistryError(
            f"the current champion {current.info.get('version')} is better on the test split "
            f"(macro-F1 {old_f1:.4f} > {new_f1:.4f}); use --force to replace it"
        )
    version = current.info.get("version")
    comparison = compare(new, old, version)
    return {"version": version, "test": old["metrics"], "delta": comparison["delta"]}, comparison


def search_budget(study: optuna.Study) -> dict[str, Any]:
    """Trials by state, training time summed over trials, and the wall time of the search:
    from each trial's state and times only (search.status.trial_times, one query)."""
    from search.status import trial_times

    trials = trial_times(study)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    spent = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if t.datetime_start and t.datetime_complete
    ]
    return {
        "n_trials": len(trials),
        "states": dict(Counter(t.state.name for t in trials)),
        "trial_seconds": round(sum(spent), 1) if spent else None,
        "wall_seconds": round((max(ends) - min(starts)).total_seconds(), 1)
        if starts and ends
        else None,
    }


def point_champion_at(models_dir: Path, version_dir: Path) -> None:
    """Swap models/champion to `version_dir` with one atomic rename of a fresh symlink."""
    link = champion_link(models_dir)
    if link.exists() and not link.is_symlink():
        raise RegistryError(f"{link} is a plain folder, not a registry link: move it away first")
    tmp = Path(models_dir) / f".champion-{uuid.uuid4().hex}"
    os.symlink(os.path.relpath(version_dir, models_dir), tmp)
    os.replace(tmp, link)
    fsync_dir(Path(models_dir))


# ---------------------------------------------------------------------------------------------
# history and rollback


def who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _engine(storage: Any) -> sa.Engine | None:
    """The SQL engine behind the study storage; None behind a gRPC storage proxy."""
    return getattr(storage, "engine", None)


def _ensure_table(engine: sa.Engine) -> None:
    try:
        _METADATA.create_all(engine, checkfirst=True)
    except sa.exc.SQLAlchemyError:
        # Two machines creating it at the same moment: the loser's CREATE fails; fine if it's there.
        if not sa.inspect(engine).has_table(PROMOTIONS.name):
            raise


def _record(
    engine: sa.Engine | None,
    action: str,
    info: dict[str, Any],
    previous: str | None,
    models_dir: Path,
) -> None:
    """One row in search_promotions. The link swap already happened: a failure here is reported,
    not raised, since the registry itself is consistent."""
    from search.study import with_retries

    row = {
        "action": action,
        "at": dt.datetime.now(dt.UTC),
        "who": who(),
        "version": info["version"],
        "previous": previous,
        "study": info.get("study"),
        "trial": info.get("trial"),
        "metrics": info.get("test"),
        "registry": str(Path(models_dir).resolve()),
    }

    def insert() -> None:
        if engine is None:
            raise RegistryError("the storage is a gRPC proxy; run with the database URL")
        _ensure_table(engine)
        with engine.begin() as conn:
            conn.execute(PROMOTIONS.insert().values(**row))

    try:
        with_retries(insert, f"recording the {action} of {info['version']}")
    except Exception as exc:
        _log(
            f"warning: {action} of {info['version']} done, but not recorded in the study "
            f"database ({type(exc).__name__}: {exc}); `search registry` will list it as 'local'"
        )


def _save_note(
    study: optuna.Study, info: dict[str, Any], evaluation: dict[str, Any], models_dir: Path
) -> None:
    """The study's optuna-dashboard note: the current champion and its report."""
    from optuna_dashboard import save_note

    from search.reports import dashboard_note

    report = f"{Path(models_dir).name}/history/{info['version']}/reports/index.html"
    try:
        save_note(study, dashboard_note(info, evaluation, report))
    except Exception as exc:  # the note is a convenience; the promotion stands
        _log(f"warning: dashboard note not saved ({type(exc).__name__}: {exc})")


def history(settings: Settings) -> list[dict[str, Any]]:
    """Every promotion and rollback recorded in the study database, oldest first, plus version
    folders found here that no record mentions (action 'local')."""
    from search.study import open_storage, redact

    models_dir = Path(settings.models_dir)
    engine = _engine(open_storage(settings, heartbeat=False))
    if engine is None:
        raise RegistryError(
            f"{redact(settings.storage)} is a storage proxy: the registry history lives in the "
            "database itself; run `search registry --storage <database URL>`"
        )
    try:
        _ensure_table(engine)
        with engine.connect() as conn:
            rows = conn.execute(sa.select(PROMOTIONS).order_by(PROMOTIONS.c.id)).mappings().all()
    except sa.exc.SQLAlchemyError as exc:
        raise RegistryError(
            f"cannot read the registry history from {redact(settings.storage)} "
            f"({type(exc).__name__}): check the storage URL"
        ) from None
    local = _local_versions(models_dir)
    current = _current_version(models_dir)
    entries = [
        {
            "id": row["id"],
            "action": row["action"],
            "at": _utc(row["at"]),
            "who": row["who"],
            "version": row["version"],
            "previous": row["previous"],
            "study": row["study"],
            "trial": row["trial"],
            "metrics": row["metrics"] or {},
            "here": row["version"] in local,
            "current": False,
        }
        for row in rows
    ]
    recorded = {e["version"] for e in entries}
    for version in sorted(set(local) - recorded):
        info = local[version]
        entries.append(
            {
                "id": None,
                "action": "local",
                "at": info.get("promoted_at"),
                "who": info.get("promoted_by"),
                "version": version,
                "previous": (info.get("previous") or {}).get("version"),
                "study": info.get("study"),
                "trial": info.get("trial"),
                "metrics": info.get("test") or {},
                "here": True,
                "current": False,
            }
        )
    for entry in reversed(entries):
        if entry["version"] == current:
            entry["current"] = True
            break
    return entries


def render_history(entries: list[dict[str, Any]]) -> str:
    """A table, oldest first; `*` marks the current champion."""
    if not entries:
        return "no promotion recorded yet: run promote-best"
    header = ("", "id", "when (UTC)", "action", "version", "trial", "acc", "macro-F1", "by",
              "previous")  # fmt: skip
    rows = [header]
    for e in entries:
        m = e.get("metrics") or {}
        rows.append(
            (
                "*" if e.get("current") else "",
                "" if e["id"] is None else str(e["id"]),
                (e.get("at") or "")[:19].replace("T", " "),
                e["action"],
                e["version"] + ("" if e.get("here", True) else " (not here)"),
                "" if e.get("trial") is None else str(e["trial"]),
                _fmt(m.get("accuracy")),
                _fmt(m.get("macro_f1")),
                e.get("who") or "",
                e.get("previous") or "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def rollback(settings: Settings, version: str | None = None) -> dict[str, Any]:
    """Make an earlier version the champion again (default: the one promoted before the current
    one), with the same atomic link swap as a promotion; recorded in the study database."""
    from search.study import load, open_storage

    models_dir = Path(settings.models_dir)
    with registry_lock(models_dir, "rollback"):
        storage = open_storage(settings, heartbeat=False)
        current = _current_version(models_dir)
        local = _local_versions(models_dir)
        if version is None:
            target = _version_before(_engine(storage), current, local)
        else:
            target = _match(version, local)
        if target == current:
            raise RegistryError(f"{target} is already the champion: nothing to roll back")
        champion = load_champion(models_dir, history_dir(models_dir) / target)  # loads: usable
        point_champion_at(models_dir, history_dir(models_dir) / target)
        _log(f"rollback: champion is now {target} (was {current})")
        _record(_engine(storage), "rollback", champion.info, current, models_dir)
        try:
            study = load(storage, settings.replace(study=champion.info["study"]))
            evaluation = json.loads(
                (history_dir(models_dir) / target / "evaluation.json").read_text()
            )
            _save_note(study, champion.info, evaluation, models_dir)
        except Exception as exc:  # an older version without evaluation.json, or a gone study
            _log(f"warning: dashboard note not updated ({type(exc).__name__}: {exc})")
    return {"version": target, "previous": current}


def _local_versions(models_dir: Path) -> dict[str, dict[str, Any]]:
    """Version folders under models/history with a readable champion.json, by name."""
    found: dict[str, dict[str, Any]] = {}
    folder = history_dir(models_dir)
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            found[path.name] = json.loads((path / INFO_FILE).read_text())
        except (OSError, ValueError):
            continue
    return found


def _current_version(models_dir: Path) -> str | None:
    link = champion_link(models_dir)
    return link.resolve().name if link.is_symlink() and link.exists() else None


def _version_before(engine: sa.Engine | None, current: str | None, local: dict[str, Any]) -> str:
    """The champion promoted before the current one (by the recorded promotion order, else by
    version name, which starts with the UTC time), among the versions present here."""
    if current is None:
        raise RegistryError("there is no champion to roll back from: name a version to restore")
    try:
        _ensure_table(engine)
        with engine.connect() as conn:
            order = (
                conn.execute(
                    sa.select(PROMOTIONS.c.version)
                    .where(PROMOTIONS.c.action == "promote")
                    .order_by(PROMOTIONS.c.id)
                )
                .scalars()
                .all()
            )
    except sa.exc.SQLAlchemyError:
        order = []
    if current in order:
        last = len(order) - 1 - order[::-1].index(current)
        earlier = [v for v in order[:last] if v in local and v != current]
    else:
        earlier = [v for v in sorted(local) if v < current]
    if not earlier:
        raise RegistryError(
            f"no champion before {current} is kept here: run `search registry` to list versions "
            "and `search rollback VERSION` to pick one"
        )
    return earlier[-1]


def _match(version: str, local: dict[str, Any]) -> str:
    """A version by its full name or a unique prefix of it."""
    if version in local:
        return version
    hits = [v for v in local if v.startswith(version)]
    if len(hits) == 1:
        return hits[0]
    have = ", ".join(sorted(local)[-5:]) or "none"
    what = "matches several versions" if hits else "is not a version kept here"
    raise RegistryError(f"{version!r} {what} (latest: {have}); run `search registry` to list them")


def _utc(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return str(value)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else ""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluate_champion(settings: Settings, model_path: Path | None = None) -> dict[str, Any]:
    """Evaluate the champion (or the version at `model_path`) on the test split and write
    models/evaluations/<version>/ (evaluation.json, per_family.csv, reports/)."""
    from search.dataset import load_prepared
    from search.evaluate import HeldOutSplit, compare, score, summary, with_version
    from search.reports import REPORTS_DIR

    models_dir = Path(settings.models_dir)
    champion = load_champion(models_dir, model_path)
    version = str(champion.info.get("version") or champion.path.name)
    split = HeldOutSplit.of(load_prepared(settings.data_dir))
    _log(f"evaluate: {version} on {len(split.labels)} test images")
    probs, evaluation = score(champion, split)
    previous = (champion.info.get("previous") or {}).get("version")
    comparison = None
    if previous and (models_dir / "history" / previous).is_dir():
        try:
            _, old = score(load_champion(models_dir, models_dir / "history" / previous), split)
            comparison = compare(evaluation, old, previous)
        except RegistryError as exc:
            _log(f"evaluate: previous champion {previous} not compared: {exc}")
    evaluation = with_version(version, evaluation, comparison)
    out = models_dir / EVALUATIONS_DIR / version
    paths = _write_atomically(out, evaluation, split, probs, version)
    warning = ""
    if champion.info.get("data_hash") not in (None, split.data_hash):
        warning = (
            f"warning: {version} was trained on other prepared data than {settings.data_dir}; "
            "its test split may hold images it was trained on"
        )
    current = champion_link(models_dir)
    is_champion = current.exists() and current.resolve() == champion.path
    return {
        "version": version,
        "champion": is_champion,
        "folder": str(out),
        "files": {k: str(v) for k, v in paths.items()},
        "evaluation": evaluation,
        "summary": summary(evaluation, out / REPORTS_DIR / "index.html", warning),
    }


def _write_atomically(
    out: Path, evaluation: dict[str, Any], split: HeldOutSplit, probs: np.ndarray, title: str
) -> dict[str, Path]:
    """Write into a staging folder beside `out`, then swap it in: readers never see half, and
    two evaluations of one version take turns."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        return _swap_in(out, evaluation, split, probs, title)


def _swap_in(
    out: Path, evaluation: dict[str, Any], split: HeldOutSplit, probs: np.ndarray, title: str
) -> dict[str, Path]:
    from search.reports import write_evaluation

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        written = write_evaluation(staging, evaluation, split, probs, title)
        os.chmod(staging, 0o755)  # mkdtemp made it private
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        if out.exists():
            os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {k: out / v.relative_to(staging) for k, v in written.items()}
