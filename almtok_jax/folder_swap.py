"""Writing a folder next to its final place and swapping it in, touching nothing we did not create.

The temporary folder of a write and the aside name of the folder it replaces are ours alone:
``.<name>.almtok-tmp-<token>`` and ``.<name>.almtok-replaced-<token>`` (hidden, with a random token that no
two writers share), and a temporary folder carries :data:`MARKER` from its creation on. Only names of
this form are ever removed or renamed back, so a user's ``DIR.tmp`` or ``DIR.replaced`` is never touched.

Writers into one parent folder take turns (:func:`parent_lock`, an exclusive ``flock`` on the parent
folder itself, so no lock file is left behind), which makes leftovers of our names found while holding the
lock those of a killed writer, safe to clear. Object-store locations (``gs://...``) cannot be locked; their
writers still never share a temporary folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from collections.abc import Iterator

from etils import epath

MARKER = ".almtok-temporary"  # inside a temporary folder: written by almtok-jax, safe to remove


def new_token() -> str:
    return secrets.token_hex(8)


def temporary_path(directory: epath.Path, token: str) -> epath.Path:
    return directory.with_name(f".{directory.name}.almtok-tmp-{token}")


def aside_path(directory: epath.Path, token: str) -> epath.Path:
    return directory.with_name(f".{directory.name}.almtok-replaced-{token}")


def _ours(directory: epath.Path, kind: str) -> list[epath.Path]:
    """Existing siblings of ``directory`` named as our ``kind`` ("tmp" or "replaced") folders."""
    pattern = re.compile(rf"\.{re.escape(directory.name)}\.almtok-{kind}-[0-9a-f]{{16}}")
    parent = directory.parent
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir())


def is_local(directory: epath.Path) -> bool:
    return "://" not in str(directory)


@contextlib.contextmanager
def parent_lock(directory: epath.Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory``'s parent folder (local paths; a no-op for object stores).
    Creates the parent if needed."""
    if not is_local(directory):
        yield
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def recover(directory: epath.Path, is_complete) -> None:
    """Finish or undo what a killed writer of ``directory`` left (call with :func:`parent_lock` held):
    our temporary folders are removed; an aside folder is put back when ``directory`` is missing (the kill
    came between the two renames of a swap), else removed (the kill came after the new one was in place).
    ``is_complete(path)`` says whether a folder holds a complete result."""
    if is_local(directory):  # elsewhere a temporary folder may be another writer's, in use
        for tmp in _ours(directory, "tmp"):
            if (tmp / MARKER).exists():
                tmp.rmtree()
    for aside in _ours(directory, "replaced"):
        if is_complete(directory):
            aside.rmtree()
        elif not directory.exists() and is_complete(aside):
            aside.rename(directory)
