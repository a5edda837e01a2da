"""Where dictionaries live, how they are keyed, and how concurrent builders stay apart.

A dictionary's key is the sha256 of everything that determines its content: the model
spec hash, the acquisition scheme hash, the resolved sampling (method, size, seed,
transforms, bounds), the features version and the store format version. Dictionaries
sit in one directory (``default_dictionary_dir()``) as ``<key[:32]>.zarr``.

Builders write into a unique hidden sibling (``.<name>.tmp-<pid>-<random>``) and rename
it into place when complete; a per-key file lock (POSIX ``flock``, released by the
kernel even on ``kill -9``) makes a second builder of the same key wait and then reuse
the first one's result instead of simulating again.

A size budget keeps the directory bounded: :func:`in_use` marks a dictionary as used (a
shared ``flock`` on ``.locks/<name>.use``, whose modification time records the last
use), and :func:`evict_to_budget` removes the least recently used dictionaries, never one
held by :func:`in_use`, until the directory fits its budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fingerprint.errors import DictionaryError

from .store import FORMAT_VERSION, open_dictionary, read_attributes

logger = logging.getLogger(__name__)

__all__ = [
    "DICTIONARY_DIR_ENV",
    "build_lock",
    "cache_size",
    "cleanup_stale_builds",
    "cleanup_stale_temporaries",
    "evict_to_budget",
    "in_use",
    "default_dictionary_dir",
    "dictionary_key",
    "list_dictionaries",
    "store_path",
    "temporary_sibling",
]

#: Environment variable overriding the dictionary directory.
DICTIONARY_DIR_ENV = "FINGERPRINT_DICTIONARY_DIR"
_TMP_MARK = ".tmp-"
_TRASH_MARK = ".trash-"


def default_dictionary_dir() -> Path:
    """The dictionary directory: ``$FINGERPRINT_DICTIONARY_DIR`` if set, else the user
    cache directory (``platformdirs.user_cache_dir('fingerprint')/dictionaries``)."""
    env = os.environ.get(DICTIONARY_DIR_ENV)
    if env:
        return Path(env).expanduser()
    try:
        from platformdirs import user_cache_dir  # lazy: optional dependency
    except ImportError:  # pragma: no cover - platformdirs ships with pip's environments
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fingerprint"
    else:
        base = Path(user_cache_dir("fingerprint"))
    return base / "dictionaries"


def dictionary_key(model_spec_hash: str, scheme_hash: str, sampling: dict[str, Any] | str,
                   features_version: int, format_version: int = FORMAT_VERSION) -> str:
    """sha256 hex digest identifying a dictionary's content."""
    if not isinstance(sampling, str):
        sampling = json.dumps(sampling, sort_keys=True, separators=(",", ":"))
    text = json.dumps({
        "model": str(model_spec_hash), "scheme": str(scheme_hash), "sampling": sampling,
        "features_version": int(features_version), "format_version": int(format_version),
    }, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def store_path(directory: str | os.PathLike, key: str) -> Path:
    """Path of the dictionary with ``key`` inside ``directory``."""
    return Path(directory) / f"{key[:32]}.zarr"


def temporary_sibling(target: Path) -> Path:
    """A fresh, unique hidden path next to ``target`` for building it."""
    return target.parent / f".{target.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def cleanup_stale_temporaries(target: Path) -> int:
    """Remove build leftovers of ``target`` whose builder process is gone (this host).

    Returns the number of directories removed.
    """
    prefix = f".{target.name}"
    removed = 0
    if not target.parent.is_dir():
        return 0
    for entry in target.parent.iterdir():
        name = entry.name
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        if rest.startswith(_TRASH_MARK):
            stale = True
        elif rest.startswith(_TMP_MARK):
            try:
                pid = int(rest[len(_TMP_MARK):].split("-")[0])
            except ValueError:
                continue
            stale = not _pid_alive(pid)
        else:
            continue
        if stale:
            logger.info("removing leftover of an interrupted build: %s", entry)
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


@contextlib.contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Exclusive lock for building ``target`` (blocks while another process holds it).

    Uses ``fcntl.flock`` on ``<parent>/.locks/<name>.lock``; the kernel releases it when
    the holder exits, however it exits. Where flock is unavailable the lock is a no-op
    (the atomic rename still keeps concurrent builds from corrupting each other).
    """
    try:
        import fcntl  # lazy: POSIX-only module (absent on Windows)
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_dir = target.parent / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _use_path(store: Path) -> Path:
    return store.parent / ".locks" / f"{store.name}.use"


@contextlib.contextmanager
def in_use(store: str | os.PathLike) -> Iterator[None]:
    """Mark the dictionary at ``store`` (which may not exist yet) as in use for the block:
    :func:`evict_to_budget` never removes it meanwhile. Entering and leaving record the
    use (for least-recently-used eviction). Where ``flock`` is unavailable only the use
    is recorded."""
    path = _use_path(Path(store))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl  # lazy: POSIX-only module (absent on Windows)

            fcntl.flock(fd, fcntl.LOCK_SH)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        os.utime(path)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.utime(path)
        os.close(fd)  # releases the lock


def _last_used(store: Path) -> float:
    for path in (_use_path(store), store):
        with contextlib.suppress(OSError):
            return path.stat().st_mtime
    return 0.0


def _stores(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir()
            if not p.name.startswith(".") and p.is_dir() and (p / "zarr.json").exists()]


def _companions(store: Path) -> list[Path]:
    """Files kept beside a store and named after it (e.g. its cached search index)."""
    prefix = f"{store.name}."
    return [p for p in store.parent.iterdir() if p.name.startswith(prefix) and p.is_file()]


def _footprint(store: Path) -> int:
    total = _dir_size(store)
    for path in _companions(store):
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


def cache_size(directory: str | os.PathLike) -> int:
    """Bytes taken by the dictionaries in ``directory`` and the files kept beside them
    (their search indexes; build leftovers excluded)."""
    return sum(_footprint(p) for p in _stores(Path(directory)))


def evict_to_budget(directory: str | os.PathLike, budget: int, *, need: int = 0,
                    keep: tuple[str | os.PathLike, ...] = ()) -> list[Path]:
    """Remove the least recently used dictionaries of ``directory`` until they take at
    most ``budget - need`` bytes (with the files kept beside them, such as their search
    index). Dictionaries held by :func:`in_use` (in any process on this host) or listed
    in ``keep`` are never removed; a removal is atomic (renamed away, then deleted).
    Returns the removed paths."""
    directory = Path(directory)
    kept = {Path(p).name for p in keep}
    entries = [(_last_used(p), p.name, p, _footprint(p)) for p in _stores(directory)]
    total = sum(e[3] for e in entries)
    removed: list[Path] = []
    for _, _, path, size in sorted(entries):
        if total + need <= budget:
            break
        if path.name in kept:
            continue
        lock = _use_path(path)
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl  # lazy: POSIX-only module (absent on Windows)

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # pragma: no cover - non-POSIX: no eviction
                continue
            except OSError:  # in use
                continue
            trash = path.parent / f".{path.name}{_TRASH_MARK}{secrets.token_hex(4)}"
            try:
                os.rename(path, trash)
            except OSError:  # gone already
                continue
            logger.info("dictionary cache over its budget: evicting %s (%d bytes)", path, size)
            for companion in _companions(path):
                with contextlib.suppress(OSError):
                    companion.unlink()
            shutil.rmtree(trash, ignore_errors=True)
            total -= size
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def cleanup_stale_builds(directory: str | os.PathLike) -> int:
    """Remove the leftovers of every interrupted build in ``directory`` (temporaries of
    builder processes that are gone, and trash). Returns the number removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    targets = set()
    for entry in directory.iterdir():
        name = entry.name
        for mark in (_TMP_MARK, _TRASH_MARK):
            if name.startswith(".") and mark in name:
                targets.add(name[1:name.index(mark)])
    return sum(cleanup_stale_temporaries(directory / t) for t in sorted(targets))


def _dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_size
    return total


def describe(path: Path) -> dict[str, Any]:
    """One-entry summary of the store at ``path`` (``valid`` False with ``error`` when
    it does not open)."""
    entry: dict[str, Any] = {"path": str(path)}
    try:
        d = open_dictionary(path)
    except DictionaryError as exc:
        entry.update(valid=False, error=str(exc))
        with contextlib.suppress(DictionaryError):
            attrs = read_attributes(path)
            entry.update(name=attrs.get("name"), key=attrs.get("key"))
        return entry
    m = d.metadata
    entry.update(
        valid=True, key=m.get("key"), name=m.get("name"), atoms=d.n_atoms,
        measurements=int(d.signals.shape[1]), features=int(d.features.shape[1]),
        parameter_names=d.parameter_names, model_class=m.get("model_class"),
        scheme_hash=m.get("scheme_hash"), features_version=m.get("features_version"),
        seed=m.get("sampling", {}).get("seed"), method=m.get("sampling", {}).get("method"),
        created=m.get("created"), size_bytes=_dir_size(path),
    )
    return entry


def list_dictionaries(directory: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Summaries of the dictionaries in ``directory`` (default: the dictionary directory),
    oldest first. Each entry has ``path``, ``valid`` and, for valid stores, ``key``,
    ``name``, ``atoms``, ``measurements``, ``features``, ``parameter_names``,
    ``model_class``, ``scheme_hash``, ``features_version``, ``seed``, ``method``,
    ``created`` and ``size_bytes``; invalid ones carry ``error``."""
    directory = Path(directory) if directory is not None else default_dictionary_dir()
    if not directory.is_dir():
        return []
    entries = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        if not (path / "zarr.json").exists():
            continue
        entries.append(describe(path))
    entries.sort(key=lambda e: (e.get("created") or "", e["path"]))
    return entries
