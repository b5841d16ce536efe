"""The listening report (``report.html`` of ``almtok-evaluate``), loaded in headless Chromium.

The page is served from its own folder on 127.0.0.1 with a checking script appended (in a copy, beside it):
every audio element must load its source's metadata, every image must decode, and clicking a column
heading must sort. The summary cells must hold exactly the numbers of ``summary.json``.
"""

from __future__ import annotations

import functools
import html
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import soundfile as sf
from conftest import AUDIO

from almtok_jax.cli import evaluate
from almtok_jax.cli.report import ALL
from almtok_jax.metrics import METRIC_NAMES

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)

CHECK = """<script>
window.addEventListener("load", async () => {
  const audio = await Promise.all([...document.querySelectorAll("audio")].map(a => new Promise(done => {
    const result = ok => done({src: a.getAttribute("src"), ok, duration: a.duration});
    if (a.readyState >= 1 || a.error) return result(!a.error);
    a.addEventListener("loadedmetadata", () => result(true));
    a.addEventListener("error", () => result(false));
    setTimeout(() => result(false), 10000);  // never loaded
  })));
  const images = [...document.images].map(i => ({src: i.getAttribute("src"), ok: i.complete && i.naturalWidth > 0}));
  const column = [...document.querySelectorAll("#clips thead th")].findIndex(th => th.textContent === "stoi");
  document.querySelectorAll("#clips thead th")[column].click();
  const sorted = [...document.querySelectorAll("#clips tbody tr")].map(r => r.cells[0].textContent);
  const out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify({audio, images, sorted});
  document.body.appendChild(out);
});
</script></body>"""


@pytest.fixture(scope="module")
def report(tiny_checkpoint, tmp_path_factory) -> Path:
    """The README's evaluation command on the tiny model, over clips in two category folders."""
    root = tmp_path_factory.mktemp("report")
    for category, source, seconds in (("speech", AUDIO / "speech" / "p225_001.wav", None),
                                      ("speech", AUDIO / "speech" / "p231_001.wav", None),
                                      ("music", AUDIO / "music" / "0_refer.wav", (5, 8))):
        wav, sr = sf.read(source)
        if seconds is not None:
            wav = wav[seconds[0] * sr: seconds[1] * sr]
        (root / "clips" / category).mkdir(parents=True, exist_ok=True)
        sf.write(root / "clips" / category / source.name, wav, sr)
    evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data", str(root / "clips"), "-o", str(root / "eval"),
                   "--steps", "1", "--plots", "3"])
    return root / "eval"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def load_in_chromium(page: Path) -> str:
    """The DOM of ``page`` after its scripts ran, served over HTTP from its folder on 127.0.0.1."""
    handler = functools.partial(QuietHandler, directory=str(page.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{page.name}"
        done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--mute-audio",
                               "--virtual-time-budget=20000", "--dump-dom", url],
                              capture_output=True, text=True, timeout=180)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="no Chromium installed (apt-get install chromium; .ci/run installs it)")
def test_report_plays_shows_and_matches_the_summary(report):
    assert CHROMIUM is not None, "CI is set but no Chromium is installed (.ci/run installs it)"
    summary = json.loads((report / "summary.json").read_text())
    page = (report / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained: no network
    check_page = report / "report_check.html"
    check_page.write_text(page.replace("</body>", CHECK))
    dom = load_in_chromium(check_page)
    found = re.search(r'<pre id="check">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    check = json.loads(html.unescape(found.group(1)))

    # Two players per listened clip, each source loaded with the clip's duration; every image decoded.
    names = ["music/0_refer", "speech/p225_001", "speech/p231_001"]
    assert sorted(a["src"] for a in check["audio"]) == sorted(
        f"listen/{n}.{kind}.wav" for n in names for kind in ("original", "reconstruction"))
    assert all(a["ok"] for a in check["audio"]), check["audio"]
    durations = {a["src"]: a["duration"] for a in check["audio"]}
    assert durations["listen/music/0_refer.original.wav"] == pytest.approx(3.0, abs=0.01)
    assert len(check["images"]) == 3 and all(i["ok"] for i in check["images"]), check["images"]
    assert all((report / i["src"]).is_file() for i in check["images"])

    # The summary table holds summary.json's numbers, over all clips and per category folder.
    assert set(summary["categories"]) == {"music", "speech"}
    groups = {ALL: summary["metrics"], **{c: g["metrics"] for c, g in summary["categories"].items()}}
    cells = re.findall(r'<td data-metric="(\w+)" data-category="([^"]*)" data-mean="([^"]*)" data-std="([^"]*)" '
                       r'data-count="(\d+)"', dom)
    assert len(cells) == len(groups) * len(METRIC_NAMES)
    for metric, category, mean, std, count in cells:
        want = groups[html.unescape(category)][metric]
        assert (float(mean), float(std), int(count)) == (want["mean"], want["std"], want["count"])

    # A click on "stoi" sorts the clips table by it, ascending.
    stoi = {r["file"]: float(r["stoi"]) for r in csv_rows(report)}
    assert check["sorted"] == sorted(stoi, key=stoi.get)
    codec = summary["codec"]
    assert codec["evaluations_per_window"] == 4 and "rk4, 1 uniform steps" in codec["sampler"]
    for shown in (codec["sampler"], f"{summary['bitrate_bps']:.0f} bit/s", "estimator evaluations per window"):
        assert shown in page


def csv_rows(out: Path) -> list[dict[str, str]]:
    import csv

    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))
