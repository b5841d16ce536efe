"""An offline stand-in for Google Cloud Storage, for the storage tests: ``gs://BUCKET/KEY`` lives at
``ROOT/BUCKET/KEY`` on the local disk.

:func:`install` (in the process under test) replaces the three ways a ``gs://`` location is reached:

* ``etils.epath`` without TensorFlow goes through fsspec's ``gs`` / ``gcs`` filesystem: a local
  filesystem that maps the bucket under ``ROOT`` takes its place;
* orbax writes array data through TensorStore's ``gcs`` kvstore and asks the bucket whether it has a
  hierarchical namespace: both are pointed at the file driver under ``ROOT`` / answered ``False``;
* ``pathlib.Path`` refuses any argument whose text starts with ``gs:`` (a user-given URI wrapped in
  ``pathlib`` becomes a local folder ``gs:/BUCKET/...``): the call raises, so the run under test fails.

``python tests/mock_gcs.py ROOT SCRIPT ARGS...`` installs it for good and runs ``SCRIPT`` as ``__main__``;
in process, pass pytest's ``monkeypatch`` so that everything is undone after the test.
"""

from __future__ import annotations

import os
import pathlib
import runpy
import sys

from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry as fsspec_registry


class PathConversionError(AssertionError):
    """A ``gs://`` location went through ``pathlib.Path``."""


class _Permanent:
    setattr = staticmethod(setattr)

    @staticmethod
    def setitem(mapping, key, value):
        mapping[key] = value


def install(root: str, monkeypatch=_Permanent) -> None:
    """Serve ``gs://`` from ``root``; patches go through ``monkeypatch.setattr`` / ``setitem``."""
    root = os.path.abspath(root)

    def local(uri: str) -> str:
        for prefix in ("gs://", "gcs://"):
            if uri.startswith(prefix):
                return os.path.join(root, uri.removeprefix(prefix))
        return uri

    class BucketFileSystem(DirFileSystem):
        """What gcsfs is to epath: paths in and out are ``BUCKET/KEY``; no folders needed before writes."""

        protocol = ("gs", "gcs")

        def __init__(self, **options):
            super().__init__(path=root, fs=LocalFileSystem(auto_mkdir=True), **options)

    for name in ("gs", "gcs"):
        monkeypatch.setitem(fsspec_registry, name, BucketFileSystem)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches one filesystem per scheme

    from orbax.checkpoint._src.path import gcs_utils

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda path: {"driver": "file", "path": local(str(path))})
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)

    original_new = pathlib.Path.__new__

    def guarded_new(cls, *args, **kwargs):
        for arg in args:
            if str(arg).startswith("gs:"):
                raise PathConversionError(f"pathlib.Path({str(arg)!r}): a gs:// location lost its scheme")
        return original_new(cls, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "__new__", guarded_new)


if __name__ == "__main__":
    install(sys.argv[1])
    script = sys.argv[2]
    sys.argv = sys.argv[2:]
    runpy.run_path(script, run_name="__main__")
