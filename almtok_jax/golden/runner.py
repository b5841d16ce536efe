"""Load fixtures, dispatch on their kind, compare every expected output at the fixture's tolerance."""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

# kind -> "module:function"; each function takes a Fixture and returns {out name: array}.
KINDS: dict[str, str] = {
    "resample": "almtok_jax.golden.audio:resample",
    "whisper_logmel": "almtok_jax.golden.audio:whisper_logmel",
    "whisper_encoder": "almtok_jax.golden.whisper:whisper_encoder",
    "wavlm": "almtok_jax.golden.wavlm:wavlm",
    "musicfm": "almtok_jax.golden.musicfm:musicfm",
    "sqcodec": "almtok_jax.golden.sqcodec:sqcodec",
    "transformer_block": "almtok_jax.golden.quantizer:transformer_block",
    "rvq_eval": "almtok_jax.golden.quantizer:rvq_eval",
    "rvq_train": "almtok_jax.golden.quantizer:rvq_train",
    "query_quantizer": "almtok_jax.golden.quantizer:query_quantizer",
    "dit": "almtok_jax.golden.flow:dit",
    "flow_loss": "almtok_jax.golden.flow:flow_loss",
    "sampler": "almtok_jax.golden.flow:sampler",
    "release_e2e": "almtok_jax.golden.release:release_e2e",
}


@dataclass
class Fixture:
    """One golden file: weights under their reference names, inputs, expected outputs, meta."""

    path: Path
    meta: dict
    params: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def config(self) -> dict:
        return self.meta["config"]

    @property
    def state_dict(self) -> dict[str, np.ndarray]:
        """``param/*`` and ``buffer/*`` together, as the reference's ``state_dict()``."""
        return {**self.params, **self.buffers}


@dataclass
class Result:
    """Comparison of one output array."""

    fixture: str
    name: str
    status: str  # ok | FAIL | skipped
    max_abs: float = float("nan")
    atol: float = float("nan")
    note: str = ""

    def line(self) -> str:
        extra = f"  # {self.note}" if self.note else ""
        return f"{self.fixture} {self.name} {self.max_abs:.3g} {self.atol:.3g} {self.status}{extra}"


@dataclass
class Outcome:
    results: list[Result] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(r.status == "FAIL" for r in self.results)

    @property
    def passed(self) -> int:
        return sum(r.status == "ok" for r in self.results)


def load_fixture(path: str | Path) -> Fixture:
    """Read a fixture ``.npz`` (``expected.npz`` of ``release_tiny`` included)."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        if "meta" not in z.files:
            raise ValueError(f"{path}: not a golden fixture (no 'meta' entry)")
        meta = json.loads(str(z["meta"]))
        groups: dict[str, dict[str, np.ndarray]] = {"param": {}, "buffer": {}, "in": {}, "out": {}}
        for name in z.files:
            head, _, rest = name.partition("/")
            if head in groups:
                groups[head][rest] = z[name]
    return Fixture(path, meta, groups["param"], groups["buffer"], groups["in"], groups["out"])


def handler_for(kind: str) -> Callable[[Fixture], dict[str, np.ndarray]]:
    """The function computing ``kind``; raises ``NotImplementedError`` for a kind we do not know."""
    if kind not in KINDS:
        raise NotImplementedError(f"unknown fixture kind {kind!r}")
    module_name, _, fn = KINDS[kind].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise NotImplementedError(f"kind {kind!r} is not implemented yet ({module_name})") from e
        raise
    return getattr(module, fn)


def compare(fixture: str, name: str, ours: np.ndarray | None, expected: np.ndarray, atol: float) -> Result:
    if ours is None:
        return Result(fixture, name, "skipped", atol=atol, note="not exposed by the implementation")
    ours = np.asarray(ours)
    if ours.shape != expected.shape:
        return Result(fixture, name, "FAIL", atol=atol, note=f"shape {ours.shape} != {expected.shape}")
    if expected.size == 0:
        return Result(fixture, name, "ok", 0.0, atol)
    diff = np.abs(ours.astype(np.float64) - expected.astype(np.float64))
    max_abs = float(np.max(diff)) if np.all(np.isfinite(diff)) else float("inf")
    if max_abs <= atol:
        return Result(fixture, name, "ok", max_abs, atol)
    scale = float(np.max(np.abs(expected)))  # float32 rounding noise grows with the array's largest values
    return Result(fixture, name, "FAIL", max_abs, atol, note=f"largest |expected| {scale:.3g}")


def fixture_atols(meta: dict, names: Iterable[str]) -> dict[str, float]:
    """Every output's absolute tolerance: ``meta["atol"]`` where the fixture gives that map, else derived
    from its ``tolerance`` section (``exact`` patterns of ``out/`` names -> 0, ``per_output[<output>]
    ["atol_recommended"]`` for ``<output>`` or ``<output>_<clip>``); names neither covers get none."""
    if "atol" in meta:
        return meta["atol"]
    tolerance = meta.get("tolerance", {})
    per_output = {k: v["atol_recommended"] for k, v in tolerance.get("per_output", {}).items()}
    atols = {}
    for name in names:
        if any(fnmatch.fnmatchcase(f"out/{name}", pattern) for pattern in tolerance.get("exact", ())):
            atols[name] = 0.0
            continue
        output = max((k for k in per_output if name == k or name.startswith(k + "_")), key=len, default=None)
        if output is not None:
            atols[name] = per_output[output]
    return atols


def run_fixture(path: str | Path) -> Outcome:
    """Run one fixture file; a missing or failing handler fails every expected output."""
    fx = load_fixture(path)
    label = fx.path.name
    atols = fixture_atols(fx.meta, fx.expected)
    outcome = Outcome()
    try:
        with jax.default_matmul_precision("highest"):
            ours = fx_handler_outputs(fx)
    except NotImplementedError as e:
        for name in fx.expected:
            outcome.results.append(Result(label, name, "FAIL", note=f"not implemented: {e}"))
        return outcome
    for name, expected in fx.expected.items():
        if name not in atols:
            outcome.results.append(Result(label, name, "FAIL", note="fixture gives no atol"))
            continue
        outcome.results.append(compare(label, name, ours.get(name), expected, float(atols[name])))
    return outcome


def fx_handler_outputs(fx: Fixture) -> dict[str, np.ndarray]:
    outputs = handler_for(fx.kind)(fx)
    return {k: np.asarray(v) for k, v in outputs.items()}


def fixture_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders to the fixture ``.npz`` files they hold (reader test files have no meta)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(f for f in sorted(p.rglob("*.npz")) if not f.name.endswith(".expected.npz"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such fixture file or folder")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m almtok_jax.golden", description=__doc__)
    parser.add_argument("paths", nargs="+", help="fixture .npz files or folders of them")
    args = parser.parse_args(argv)
    total = Outcome()
    for f in fixture_files(args.paths):
        outcome = run_fixture(f)
        for r in outcome.results:
            print(r.line(), flush=True)
        total.results.extend(outcome.results)
    print(f"{total.passed} passed, {total.failed} failed")
    return 1 if total.failed else 0


if __name__ == "__main__":
    sys.exit(main())
