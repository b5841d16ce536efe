"""Weights by name: a model-hub repo id, a release folder or a model directory -> a model directory.

A release (a hub repo such as ``Dongchao/almtokenizer2``, or a local folder laid out like one) is converted
once into a cache entry and loaded from there afterwards without touching the network. Entries live under
``$ALMTOK_CACHE`` (default ``$XDG_CACHE_HOME/almtok-jax``, else ``~/.cache/almtok-jax``), one folder per
(repo, revision, :data:`FORMAT_VERSION`); a local release folder is keyed by its resolved path and the size
and modification time of its checkpoint files instead of a revision.

An entry is a model directory plus :data:`MANIFEST` (the size of every file it holds). It is built in a
temporary folder beside it and renamed into place only when complete, under an exclusive lock file, so
two processes asking at once convert once (the second waits, then loads the first one's entry) and a kill
at any moment leaves no half-written entry. An entry whose files no longer match its manifest, or whose
weights cannot be read, is reported and rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from almtok_jax.config import load_model_config, to_dict
from almtok_jax.weights.model_dir import ModelDirError
from almtok_jax.weights.release import ReleaseError, checkpoint_order, download_release

# The converter's output format: entries written under another version are never read (bump it whenever
# conversion writes something different for the same release).
FORMAT_VERSION = 1
MANIFEST = "almtok-cache.json"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where entries live: ``cache_dir``, else ``$ALMTOK_CACHE``, else ``$XDG_CACHE_HOME/almtok-jax``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("ALMTOK_CACHE"):
        return Path(os.environ["ALMTOK_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "almtok-jax"


def is_hub_id(name: str) -> bool:
    """``owner/name`` as the model hub spells repo ids."""
    return _HUB_ID.fullmatch(name) is not None


def is_release_folder(folder: Path) -> bool:
    """A folder holding a released checkpoint (``ep<N>[-iter<M>].checkpoint``) or the SQ codec weights."""
    return folder.is_dir() and (any(checkpoint_order(p.name) is not None for p in folder.glob("ep*.checkpoint"))
                                or (folder / "sqcodec.pth").is_file())


# ------------------------------------------------------------------------------------------ conversion


def fetch_release(release: str, checkpoint_file: str | None = None, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub repo id, of which the files the converter reads are downloaded
    with ``huggingface_hub`` (at ``revision``, default the repo's main branch)."""
    path = Path(release)
    if path.exists():
        return path
    if not is_hub_id(release):
        raise ReleaseError(f"release folder {release} does not exist")
    try:
        import huggingface_hub
    except ImportError:
        raise ReleaseError(f"{release} is not a folder, and downloading it needs huggingface_hub "
                           "(pip install 'almtok-jax[hub]')") from None
    try:
        return download_release(huggingface_hub, release, checkpoint_file, revision)
    except ReleaseError:
        raise
    except Exception as e:  # network errors come in many types; report them all the same way, on one line
        reason = (str(e).strip().splitlines() or [""])[0]
        offline = " with HF_HUB_OFFLINE set" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise ReleaseError(f"could not download {release} from the model hub{offline} "
                           f"({type(e).__name__}: {reason}); download it by hand and pass the folder") from None


def convert_release(release: Path, out: Path, config_path: Path | None = None, force: bool = False,
                    checkpoint_file: str | None = None) -> Path:
    """Read, validate and write the model directory ``out`` (``config_path``: a preset overriding the
    architecture derived from the release); returns ``out``."""
    import yaml

    from almtok_jax.weights.convert import convert_checkpoint
    from almtok_jax.weights.model_dir import check_replaceable, save_model_dir, split_variables
    from almtok_jax.weights.release import read_release

    check_replaceable(out, force)  # before the (long) read, not after it
    given = load_model_config(config_path) if config_path is not None else None
    rel = read_release(release, given, checkpoint_file)
    # Checked whole from names and shapes; each variable is read from the checkpoint only as it is written.
    variables = convert_checkpoint(rel.model_state, rel.codec_state, rel.config, source=str(rel.checkpoint),
                                   lazy=True)
    config_yaml = yaml.safe_dump(to_dict(rel.config), sort_keys=False)
    return Path(save_model_dir(out, split_variables(variables), config_yaml, force=force))


# ------------------------------------------------------------------------------------------ cache entries


def _manifest(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def entry_problem(entry: Path) -> str | None:
    """Why ``entry`` is not a complete cache entry of this format (``None``: it is one)."""
    try:
        recorded = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        return f"{MANIFEST} missing"
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable ({e})"
    if not isinstance(recorded, dict) or recorded.get("format") != FORMAT_VERSION \
            or not isinstance(recorded.get("files"), dict):
        return f"{MANIFEST} is not a format {FORMAT_VERSION} manifest"
    present = _manifest(entry)
    for name, size in recorded["files"].items():
        if name not in present:
            return f"{name} missing"
        if present[name] != size:
            return f"{name} has {present[name]} bytes, {size} when written"
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed), released on exit or when the process dies."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_ours(entry: Path) -> None:
    """Remove ``entry`` and this cache's leftovers beside it (temporary and damaged folders of the same
    entry: only this module creates those names). Call with the entry's lock held."""
    if entry.exists():
        aside = entry.with_name(f"{entry.name}.damaged-{os.getpid()}")
        entry.rename(aside)  # a reader of the old entry fails on its own; no one finds a half-removed one
    # this cache's temporary and damaged folders, and save_model_dir's temporary folder of one of them
    ours = re.compile(rf"\.?{re.escape(entry.name)}\.(tmp|damaged)-\d+(\.almtok-tmp-[0-9a-f]{{16}})?")
    for leftover in entry.parent.iterdir():
        if leftover.is_dir() and ours.fullmatch(leftover.name):
            shutil.rmtree(leftover)


def ensure_entry(entry: Path, build: Callable[[Path], object], describe: str, rebuild: bool = False) -> Path:
    """``entry`` complete, built with ``build(folder)`` (which writes a model directory at ``folder``, a path
    that does not exist yet) if it is missing or damaged; ``rebuild`` forces a new build (an entry found
    unreadable). Concurrent callers build once: the others wait on the lock and reuse the result."""
    if not rebuild and entry_problem(entry) is None:
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry.with_name(entry.name + ".lock")):
        problem = entry_problem(entry)
        if problem is None and not rebuild:
            return entry  # another process built it while we waited
        if entry.exists():
            say(f"cache entry {entry} is damaged ({problem or 'its weights cannot be read'}); rebuilding it")
        _remove_ours(entry)
        tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        say(f"converting {describe} into {entry} (once)")
        try:
            build(tmp)
            files = _manifest(tmp)
            (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT_VERSION, "source": describe, "files": files},
                                                   indent=1) + "\n")
            tmp.rename(entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # save_model_dir removes its own temporary folder
            raise
    return entry


def is_cache_entry(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def _local_key(folder: Path, checkpoint_file: str | None, config_path: Path | None) -> str:
    """A local release's identity: its resolved path, the size and time of its weight files, the
    checkpoint chosen and the preset given."""
    folder = folder.resolve()
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".checkpoint", ".pth"))
    parts = [str(folder), str(checkpoint_file), *(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                                  for p in weights)]
    if config_path is not None:
        parts.append(Path(config_path).read_text())
    return f"{folder.name}-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}"


def entry_path(source: str, revision: str | None = None, checkpoint_file: str | None = None,
               config_path: Path | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache entry of a hub repo id (``hub/<owner>--<name>/<revision>/...``) or a local release folder
    (``local/<name>-<hash>/...``), for this :data:`FORMAT_VERSION`."""
    root = cache_root(cache_dir)
    leaf = f"format{FORMAT_VERSION}"
    if Path(source).exists():
        return root / "local" / _local_key(Path(source), checkpoint_file, config_path) / leaf
    options = [p for p in (checkpoint_file, config_path and
                           hashlib.sha256(Path(config_path).read_bytes()).hexdigest()[:16]) if p]
    return root / "hub" / source.replace("/", "--") / (revision or "main") / "-".join([leaf, *map(str, options)])


def resolve_model_dir(source: str | os.PathLike, revision: str | None = None, checkpoint_file: str | None = None,
                      config_path: Path | None = None, cache_dir: str | os.PathLike | None = None,
                      rebuild: bool = False) -> Path:
    """The model directory ``source`` names: a model directory (or any other existing path that is not a
    release: loading reports what it is) as is; a release folder or a hub repo id converted into its cache
    entry (:func:`ensure_entry`). Raises :class:`ModelDirError` for a path that exists nowhere."""
    name = str(source)
    path = Path(name)
    if path.exists() and not is_release_folder(path):
        return path
    if not path.exists() and not is_hub_id(name):
        raise ModelDirError(f"model directory {name}: no such folder (nor a release folder or hub repo id)")
    entry = entry_path(name, revision, checkpoint_file, config_path, cache_dir)
    if not rebuild and entry_problem(entry) is None:
        return entry
    # Fetched before anything is created, so a failed download leaves no trace in the cache (concurrent
    # downloads are the hub client's to share; the conversion below is ours, done once).
    try:
        release = fetch_release(name, checkpoint_file, revision)
    except ReleaseError as e:
        raise ModelDirError(f"model directory {name}: no such folder; as a hub repo id: {e}"
                            if not path.exists() else str(e)) from None
    describe = name if path.exists() else f"{name}@{revision or 'main'}"
    return ensure_entry(entry, lambda folder: convert_release(release, folder, config_path, False, checkpoint_file),
                        describe, rebuild)
