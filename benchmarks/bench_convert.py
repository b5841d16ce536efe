"""Memory and time of converting a full-size release, and of loading the result (not a test). From the repo root:

    python benchmarks/bench_convert.py [--workdir /tmp/almtok-bench-convert] [--keep] \
        [--out benchmarks/results/convert.json]

Writes a synthetic full-size release into ``--workdir`` (the key names and shapes of
``../shared/fixtures/release_full_keys``, random values, the release's own files; about 8 GB, reused by a
later run with ``--keep``), then in one fresh child process each:

* **convert**: ``convert_torch_weights.py --release WORKDIR/release --out WORKDIR/model`` (the command a
  user runs), its wall time and peak RSS (``ru_maxrss``: Python, JAX and everything the conversion holds);
* **load**: ``ALMTokenizer2.load(WORKDIR/model)`` (what ``infer.py`` does before any audio), its wall time
  and peak RSS.

Each is reported against the converted parameters' size (the float32 values kept in the model directory).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import current_rss_mib, machine, peak_rss_mib, run_child_process  # noqa: E402

FIXTURES = REPO.parent / "shared" / "fixtures"


def write_full_release(folder: Path) -> float:
    """The synthetic full-size release; returns its tensor data in GiB."""
    from tests.synthetic_release import FULL_FILES, Values, full_size_shapes, release_rope, write_release

    model, codec = full_size_shapes(FIXTURES)
    return write_release(folder, model, codec, FULL_FILES, Values(0, release_rope(FIXTURES))) / 2**30


def child_convert(workdir: Path) -> dict:
    from almtok_jax.cli.convert import main

    before, start = current_rss_mib(), time.perf_counter()
    code = main(["--release", str(workdir / "release"), "--out", str(workdir / "model"), "--force"])
    if code:
        raise SystemExit(f"conversion failed ({code})")
    return {"wall_s": time.perf_counter() - start, "rss_before_mib": before, "peak_rss_mib": peak_rss_mib()}


def child_load(workdir: Path) -> dict:
    import jax

    from almtok_jax.tokenizer import ALMTokenizer2

    before, start = current_rss_mib(), time.perf_counter()
    tok = ALMTokenizer2.load(workdir / "model")
    jax.block_until_ready(tok.variables)
    params = sum(x.nbytes for x in jax.tree.leaves(tok.variables))
    return {"wall_s": time.perf_counter() - start, "rss_before_mib": before, "peak_rss_mib": peak_rss_mib(),
            "params_mib": params / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/almtok-bench-convert"))
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the synthetic release")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "convert.json")
    parser.add_argument("--child", choices=("convert", "load"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps((child_convert if args.child == "convert" else child_load)(args.workdir)))
        return
    release = args.workdir / "release"
    if not (release / "ep5.checkpoint").is_file():
        start = time.perf_counter()
        shutil.rmtree(release, ignore_errors=True)
        gib = write_full_release(release)
        print(f"synthetic full-size release: {gib:.2f} GiB of tensors in {time.perf_counter() - start:.0f} s")
    checkpoint_gib = (release / "ep5.checkpoint").stat().st_size / 2**30
    script = str(Path(__file__).resolve())
    convert = run_child_process(script, ["--child", "convert", "--workdir", str(args.workdir)])
    load = run_child_process(script, ["--child", "load", "--workdir", str(args.workdir)])
    params = load["params_mib"]
    for result in (convert, load):
        result["peak_over_params"] = result["peak_rss_mib"] / params
    report = {"machine": machine(), "checkpoint_gib": checkpoint_gib, "params_gib": params / 1024,
              "convert": convert, "load": load}
    print(f"ep5.checkpoint {checkpoint_gib:.2f} GiB, converted parameters {params / 1024:.2f} GiB")
    for name, r in (("convert", convert), ("load", load)):
        print(f"{name:8s} {r['wall_s']:7.1f} s   peak RSS {r['peak_rss_mib'] / 1024:6.2f} GiB "
              f"= {r['peak_over_params']:.2f} x parameters (RSS before: {r['rss_before_mib'] / 1024:.2f} GiB)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
