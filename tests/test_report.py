"""``streamcl.report``: the HTML page and charts, from synthetic journal + registry data.

The data mimic a real run: 4,000 samples in batches of 100, four experiences opened by
new-class and drift boundaries, a gate that published six versions and rejected two
candidates. A headless Chromium then loads the page: the page's own script reports whether
every embedded image decoded, which is what "the report renders" means to a reader.
"""

from __future__ import annotations

import base64
import html
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from streamcl.metrics.continual import AccuracyMatrix
from streamcl.report import (
    ReportData,
    load_report_data,
    matrix_array,
    matrix_figure,
    write_report,
)

BATCH = 100
SAMPLES = 4000
# (index, trigger, new experience id, detector statistic)
BOUNDARIES = [(1000, "new-class", 1, None), (2000, "drift", 2, 0.1342),
              (3000, "new-class", 3, None)]
EVIL_REASON = "<script>alert('pwned')</script> & holdout dropped"
T0 = 1_700_000_000.0


def _experience_at(position: int) -> int:
    return sum(1 for index, *_ in BOUNDARIES if position >= index)


def _matrix(position: int, rejected: bool) -> dict[str, dict[str, float]]:
    """A plausible accuracy matrix: old experiences fade, a rejected candidate forgot more."""
    last = _experience_at(position)
    out: dict[str, dict[str, float]] = {}
    for r in range(last + 1):
        out[str(r)] = {str(c): round(0.92 - 0.07 * (r - c) - (0.2 if rejected and c < r else 0),
                                     3) for c in range(r + 1)}
    return out


def _metrics(position: int, rejected: bool = False) -> dict[str, Any]:
    matrix = _matrix(position, rejected)
    final = list(matrix[max(matrix, key=int)].values())
    return {"prequential_accuracy": round(0.55 + position / 10_000, 3),
            "holdout_accuracy": round(sum(final) / len(final), 3),
            "accuracy_matrix": matrix,
            "average_accuracy": round(sum(final) / len(final), 3),
            "forgetting": 0.07 if len(final) > 1 else None,
            "backward_transfer": -0.07 if len(final) > 1 else None,
            "negative_flip_rate": 0.012}


def realistic_entries() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = [{"type": "start", "seq": 0, "config_hash": "ab" * 32,
                                      "pid": 1, "host": "h"}]
    boundary_at = {index: (trigger, exp, stat) for index, trigger, exp, stat in BOUNDARIES}
    # evaluations after the batch that ends at this position: (kind, trigger)
    evals = {600: ("publish", "samples"), 1000: ("publish", "experience-end"),
             1200: ("reject", "samples"), 2000: ("publish", "experience-end"),
             2200: ("reject", "time"), 2600: ("publish", "samples"),
             3000: ("publish", "experience-end"), 3800: ("publish", "samples")}
    version = 0
    for position in range(0, SAMPLES, BATCH):
        boundary = None
        if position in boundary_at:
            trigger, exp, stat = boundary_at[position]
            boundary = {"index": position, "trigger": trigger, "experience": exp,
                        "statistic": stat}
        entries.append({"type": "batch", "seq": len(entries),
                        "ranges": {"0": [position, position + BATCH - 1]},
                        "plan": {"position": position, "size": BATCH,
                                 "new_labels": [2 * _experience_at(position)] if boundary else [],
                                 "boundary": boundary},
                        "samples": BATCH, "rejected": 0})
        end = position + BATCH
        if end in evals:
            kind, trigger = evals[end]
            entry: dict[str, Any] = {"type": kind, "seq": len(entries), "position": end,
                                     "trigger": trigger, "ts": T0 + end,
                                     "metrics": _metrics(end, rejected=kind == "reject")}
            cand = entry["metrics"]["holdout_accuracy"]
            if kind == "publish":
                version += 1
                entry["version"] = version
                entry["gate"] = {"decision": "promoted", "candidate": cand,
                                 "production": None if version == 1 else cand - 0.01,
                                 "tolerance": 0.02}
            else:
                entry["reason"] = (EVIL_REASON if end == 1200 else
                                   "holdout accuracy 0.61 < production 0.78 - tolerance 0.02")
                entry["gate"] = {"decision": "rejected", "candidate": cand,
                                 "production": 0.78, "tolerance": 0.02}
            entries.append(entry)
        if end % 1000 == 0:
            entries.append({"type": "snapshot", "seq": len(entries), "path": f"s{end}",
                            "sha256": "0" * 64, "covers_seq": len(entries) - 1,
                            "offsets": {"0": end}})
    return entries


def realistic_manifests(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"version": e["version"], "parent": e["version"] - 1 or None,
             "created_at": e["ts"], "position": e["position"], "metrics": e["metrics"],
             "sha256": f"{e['version']:064x}", "strategy": "der++"}
            for e in entries if e["type"] == "publish"]


@pytest.fixture(scope="module")
def full_data() -> ReportData:
    entries = realistic_entries()
    return ReportData.from_sources(entries, reversed(realistic_manifests(entries)),
                                   {"production": 6, "candidate": 6})


@pytest.fixture(scope="module")
def full_report(full_data: ReportData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(full_data, tmp_path_factory.mktemp("full"), title="digits <run 7>")


@pytest.fixture(scope="module")
def empty_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(ReportData(), tmp_path_factory.mktemp("empty"))


def _png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        return np.asarray(img.convert("RGB"), dtype=np.float64)


def _table(page: str, css_class: str) -> list[list[str]]:
    """Cells (tags stripped, entities kept) of ``<table class=css_class>``'s body rows."""
    match = re.search(rf'<table class="{css_class}">(.*?)</table>', page, re.S)
    assert match, f"no {css_class} table"
    body = match.group(1).split("<tbody>", 1)[1]
    return [[re.sub(r"<[^>]+>", " ", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row,
                                                                      re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


# -- the data views -------------------------------------------------------------------------------
def test_views_of_a_realistic_journal(full_data: ReportData) -> None:
    assert full_data.samples == SAMPLES
    assert len(full_data.batches) == SAMPLES // BATCH
    assert full_data.experiences == 4
    assert full_data.boundary_counts == {"new-class": 2, "drift": 1}
    assert [b["index"] for b in full_data.boundaries] == [1000, 2000, 3000]
    assert [p.version for p in full_data.publications] == [1, 2, 3, 4, 5, 6]
    assert [r.position for r in full_data.rejections] == [1200, 2200]
    assert [m["version"] for m in full_data.versions] == [1, 2, 3, 4, 5, 6]  # sorted
    value, caption = full_data.headline_metric("average_accuracy")
    assert value == full_data.publications[-1].metrics.average_accuracy
    assert "production version 6" in caption


def test_empty_data_views() -> None:
    data = ReportData()
    assert (data.samples, data.experiences, data.boundary_counts) == (0, 0, {})
    assert data.headline_metric("accuracy_matrix") is None


def test_headline_prefers_production_over_a_later_rejection() -> None:
    """The summary describes the serving model, not the last (rejected) candidate."""
    gate = {"decision": "promoted", "tolerance": 0.02}
    entries = [{"type": "publish", "seq": 0, "version": 1, "position": 100, "trigger": "samples",
                "metrics": {"average_accuracy": 0.8}, "gate": gate},
               {"type": "reject", "seq": 1, "position": 200, "reason": "worse",
                "trigger": "samples", "metrics": {"average_accuracy": 0.3},
                "gate": {**gate, "decision": "rejected"}}]
    assert (ReportData.from_sources(entries, [], {}).headline_metric("average_accuracy")[0]
            == 0.8)
    only_rejected = ReportData.from_sources(entries[1:], [], {})
    assert only_rejected.headline_metric("average_accuracy")[0] == 0.3


def test_matrix_array_has_gaps_as_nan() -> None:
    a, rows, cols = matrix_array(AccuracyMatrix.from_json(
        {"0": {"0": 0.9}, "2": {"0": 0.4, "2": 0.7}, "1": {}}))
    assert rows == [0, 1, 2] and cols == [0, 2]
    assert a[0, 0] == 0.9 and a[2, 1] == 0.7
    assert np.isnan(a[0, 1]) and np.isnan(a[1]).all()


def test_matrix_heat_map_writes_numbers_only_in_defined_cells() -> None:
    fig = matrix_figure(AccuracyMatrix({0: {0: 0.9}, 1: {0: 0.456, 1: 0.8}}))
    ax = fig.axes[0]
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == ["0.46", "0.80", "0.90"]  # the None cell stays blank
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]


def test_load_report_data_from_a_registry() -> None:
    class Registry:
        def versions(self) -> list[int]:
            return [3, 1]

        def manifest(self, version: int) -> dict[str, Any]:
            return {"version": version, "parent": None, "created_at": T0, "position": version,
                    "metrics": {}, "sha256": "x", "strategy": "er"}

        def alias(self, name: str) -> int:
            return 3

    start = {"type": "start", "seq": 0, "config_hash": "0" * 64}
    data = load_report_data(iter([start]), Registry())
    assert [m["version"] for m in data.versions] == [1, 3]
    assert data.aliases == {"production": 3}
    assert [(e.type, e.seq) for e in data.entries] == [("start", 0)]
    assert load_report_data([]).versions == []


# -- the written report ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["full_report", "empty_report"])
def test_pngs_are_valid_and_embedded(which: str, request: pytest.FixtureRequest) -> None:
    page_path: Path = request.getfixturevalue(which)
    page = page_path.read_text(encoding="utf-8")
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"[^>]*'
                          r'data-file="([\w.]+)"', page)
    assert sorted(name for _, name in embedded) == ["accuracy.png", "accuracy_matrix.png",
                                                    "versions.png"]
    for b64, name in embedded:
        path = page_path.parent / name
        assert base64.b64decode(b64) == path.read_bytes()  # the page is self-contained
        assert path.stat().st_size > 3000
        pixels = _png_pixels(path)
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 500
        assert pixels.std() > 5  # not a blank canvas
    # nothing loaded from elsewhere: no links, no external scripts, styles or fonts
    assert not re.search(r"<link|<script[^>]+src=|url\(|@import|https?://", page)


def test_full_report_contents(full_report: Path) -> None:
    page = full_report.read_text(encoding="utf-8")
    assert "<title>digits &lt;run 7&gt;</title>" in page
    for heading in ("Summary", "Accuracy over time", "Experience boundaries", "Accuracy matrix",
                    "Version history", "Gate rejections"):
        assert f">{heading}</h2>" in page

    assert _table(page, "boundaries") == [["1", "1000", "new-class", "—"],
                                          ["2", "2000", "drift", "0.1342"],
                                          ["3", "3000", "new-class", "—"]]
    versions = _table(page, "versions")
    assert [row[0] for row in versions] == ["1", "2", "3", "4", "5", "6"]
    assert [row[1] for row in versions] == ["—", "1", "2", "3", "4", "5"]
    assert versions[-1][5] == "candidate, production"
    assert all(row[5] == "—" for row in versions[:-1])
    assert all(row[7].startswith("promoted") for row in versions)
    assert versions[0][2] == "2023-11-14 22:23:20 UTC"  # created_at of v1 (T0 + 600)
    assert versions[0][3] == "600"

    rejections = _table(page, "rejections")
    assert [row[1] for row in rejections] == ["1,200", "2,200"]
    assert rejections[1][7] == "holdout accuracy 0.61 &lt; production 0.78 - tolerance 0.02"
    # the hostile reason is shown as text, never as markup
    assert html.escape(EVIL_REASON) in page
    assert "<script>alert" not in page
    assert page.count("<script>") == 1  # only the page's own render check

    summary = dict((k, v) for k, v in re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>",
                                                 page.split('<table class="summary">')[1]
                                                 .split("</table>")[0]))
    assert summary["samples trained"] == "4,000"
    assert summary["experiences"] == "4"
    assert summary["boundaries"] == "3 (drift: 1, new-class: 2)"
    assert summary["publications"] == "6" and summary["gate rejections"] == "2"
    assert summary["production version"] == "6"
    final = _metrics(3900)
    assert summary["average accuracy"].startswith(f"{final['average_accuracy']:.3f}")
    assert summary["forgetting"].startswith("0.070")
    assert summary["backward transfer (BWT)"].startswith("-0.070")


def test_summary_derives_continual_metrics_from_the_matrix(tmp_path: Path) -> None:
    entries = [{"type": "publish", "seq": 0, "version": 1, "position": 10, "trigger": "samples",
                "gate": {"decision": "promoted"},
                "metrics": {"accuracy_matrix": {"0": {"0": 0.9}, "1": {"0": 0.5, "1": 0.8}}}}]
    page = write_report(ReportData.from_sources(entries, [], {}),
                        tmp_path).read_text(encoding="utf-8")
    # GEM/RWalk on [[0.9, -], [0.5, 0.8]] (streamcl.metrics.continual's doctest)
    assert re.search(r"<th>average accuracy</th><td>0\.650 .*computed", page)
    assert re.search(r"<th>forgetting</th><td>0\.400 ", page)
    assert re.search(r"<th>backward transfer \(BWT\)</th><td>-0\.400 ", page)


def test_empty_report_says_so(empty_report: Path) -> None:
    page = empty_report.read_text(encoding="utf-8")
    for text in ("No publications yet", "No experience boundaries yet", "No model versions yet",
                 "No accuracy matrix yet", "No gate rejections"):
        assert text in page
    assert "<th>samples trained</th><td>0</td>" in page


# -- in a real browser ----------------------------------------------------------------------------
def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.fail("no headless browser: install Debian's chromium "
                "(apt-get install -y --no-install-recommends chromium)")


def _browse(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
           "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _body_tag(dom: str) -> str:
    match = re.search(r"<body[^>]*>", dom)
    assert match, dom[:500]
    return match.group(0)


@pytest.mark.parametrize("which", ["full_report", "empty_report"])
def test_chromium_renders_every_image(which: str, request: pytest.FixtureRequest,
                                      tmp_path: Path) -> None:
    page: Path = request.getfixturevalue(which)
    dom = _browse(page, tmp_path / "profile", "--dump-dom").stdout
    assert 'data-rendered="ok"' in _body_tag(dom)
    for heading in ("Summary", "Accuracy over time", "Accuracy matrix", "Version history",
                    "Gate rejections"):
        assert f">{heading}</h2>" in dom


def test_chromium_render_check_catches_a_broken_image(full_report: Path,
                                                      tmp_path: Path) -> None:
    """The page's check must be able to fail: a corrupted image reads as "broken"."""
    page = full_report.read_text(encoding="utf-8")
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA",
                                   1), encoding="utf-8")
    dom = _browse(broken, tmp_path / "profile", "--dump-dom").stdout
    assert 'data-rendered="broken"' in _body_tag(dom)


def test_chromium_screenshot_is_not_blank(full_report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    _browse(full_report, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2000")
    pixels = _png_pixels(shot)
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.var() > 0
    # more than a background: a real share of the page is ink (text, charts)
    assert (pixels.mean(axis=2) < 200).mean() > 0.02
