"""Where a sweep's study lives: a journal file (one machine) or an RDB server (several machines).

    --storage runs/x.journal            Optuna's journal file (default: DIR/study.journal)
    --storage sqlite:///runs/x.db       one machine, through optuna.storages.RDBStorage
    --storage postgresql://user:pw@host/db   mysql://...   workers on any number of machines

An RDB storage runs with heartbeats (sweep.heartbeat_interval, sweep.grace_period): a trial whose
worker stopped beating (killed, its machine gone) is failed and re-queued once by Optuna's retry
callback, and the next worker that asks resumes it in its folder. Every bad input is a ConfigError
(exit 2) before anything is written: a missing folder, a folder given as the file, a malformed URL,
an unknown dialect, a missing driver (with its pip command) and a server that cannot be reached.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

from q2g.errors import ConfigError

DRIVERS = {  # dialect -> the pip command of its default driver (SQLAlchemy 2.1: postgresql:// is psycopg 3)
    "postgresql": 'pip install "psycopg[binary]" (or pip install -e ".[postgres]")',
    "mysql": "pip install mysqlclient (or use mysql+pymysql:// with pip install pymysql)",
    "sqlite": "(part of Python)",
}
DRIVER_PACKAGES = {  # a driver named in the URL (dialect+driver://) -> its pip command
    "psycopg": 'pip install "psycopg[binary]"',
    "psycopg2": "pip install psycopg2-binary",
    "pg8000": "pip install pg8000",
    "asyncpg": "pip install asyncpg",
    "pymysql": "pip install pymysql",
    "mysqldb": "pip install mysqlclient",
}


def is_url(storage: str | None) -> bool:
    return bool(storage) and "://" in storage


def describe(storage: str | None, out: Path) -> str:
    """The storage as written in sweep.json and messages (an RDB URL without its password)."""
    if not is_url(storage):
        return str(Path(storage) if storage else out / "study.journal")
    from sqlalchemy.engine import make_url

    return make_url(storage).render_as_string(hide_password=True)


def check_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise ConfigError(f"--storage {path}: is a folder; give a {what} file path inside it")
    if not path.parent.is_dir():
        raise ConfigError(f"--storage {path}: the folder {path.parent} does not exist (create it, or fix the path)")


def check_storage(storage: str | None) -> None:
    """Refuse a storage that cannot work, without connecting or writing (the default journal:
    DIR/study.journal, always fine)."""
    if not storage:
        return
    if not is_url(storage):
        check_file(Path(storage), "journal")
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(storage)
    except (ArgumentError, ValueError) as e:
        raise ConfigError(
            f"--storage {storage!r}: not a database URL ({e}); e.g. postgresql://user:pw@host/db"
        ) from None
    dialect = url.get_backend_name()
    if dialect not in DRIVERS:
        raise ConfigError(f"--storage: unknown database {dialect!r}; use postgresql://, mysql:// or sqlite:///")
    try:
        url.get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise ConfigError(f"--storage: unknown driver {url.drivername!r} for {dialect}") from None
    except ImportError as e:
        raise ConfigError(
            f"--storage {describe(storage, Path())}: the {dialect} driver is not installed ({e}): "
            f"{DRIVER_PACKAGES.get(url.get_dialect().driver, DRIVERS[dialect])}"
        ) from None
    if dialect == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise ConfigError(
                f"--storage {storage}: an in-memory SQLite study is lost on exit; give sqlite:///path.db"
            )
        check_file(Path(url.database), "SQLite")
    elif not url.host:
        raise ConfigError(f"--storage {describe(storage, Path())}: no server host in the URL")


@contextmanager
def quiet(optuna):
    """Optuna's notes that heartbeats and the retry callback are "experimental", and that
    heartbeats are meant for study.optimize (the sweep asks and tells, and beats itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        yield


def retry_callback(optuna):
    """Optuna's 're-queue a dead worker's trial once' callback, as (keyword, callback)."""
    storages = optuna.storages
    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9 (RetryFailedTrialCallback: alias)
        return "heartbeat_stale_trial_callback", storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    return "failed_trial_callback", storages.RetryFailedTrialCallback(max_retry=1)


def open_storage(optuna, storage: str | None, out: Path, heartbeat_interval: int, grace_period: int):
    """The Optuna storage object; an RDB that cannot be reached is a ConfigError (exit 2: the
    URL, the server or its credentials need fixing before the sweep can start)."""
    if not is_url(storage):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(str(Path(storage) if storage else out / "study.journal")))
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with quiet(optuna):
            keyword, callback = retry_callback(optuna)
            return optuna.storages.RDBStorage(
                storage,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                **{keyword: callback},
            )
    except SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise ConfigError(f"--storage {describe(storage, out)}: cannot open the database: {reason}") from None
