"""``streamcl report``: one self-contained HTML page (plus PNGs) about a learner's history.

Everything the page shows is read back from what the service already records: the event
journal (batches with their boundary decisions, ``publish`` and ``reject`` entries with the
gate's verdict and the candidate's metrics) and the model registry's manifests and aliases.
:class:`ReportData` holds the entries as the journal's typed values
(:mod:`streamcl.stream.entries`, so a dump of JSON objects reads exactly as the journal does)
and the manifests as the registry's JSON: a report can be built (and tested) from a journal dump
without a broker, a registry or a trained model.

:func:`write_report` writes ``report.html`` and three charts, ``accuracy.png`` (prequential
and holdout accuracy against the stream position, with the experience boundaries),
``accuracy_matrix.png`` (a heat map) and ``versions.png`` (the version lineage). The PNGs are
also embedded in the page as ``data:`` URIs and the page carries its own CSS, so
``report.html`` alone can be mailed, attached to a CI run or opened offline. Every string that
comes from data (rejection reasons, strategy names, triggers) is HTML-escaped.

The page ends with a small script that sets ``<body data-rendered="ok">`` once every image has
decoded (``"broken"`` otherwise): a headless browser's ``--dump-dom`` then tells whether the
page really renders, which a check of the HTML text cannot.

Charts are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never
through ``pyplot``: no global backend switch, no display, nothing left open between reports.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from streamcl.metrics.continual import AccuracyMatrix
from streamcl.stream.entries import (
    Batch,
    Entry,
    Evaluation,
    Gate,
    Publish,
    Reject,
    Verdict,
    entry_from_json,
)

#: Colours of the experience boundaries by trigger (README "Experience boundaries").
TRIGGER_COLOURS: dict[str, str] = {
    "drift": "#d62728",
    "new-class": "#2ca02c",
    "task": "#9467bd",
    "every": "#7f7f7f",
}
_OTHER_COLOUR = "#8c564b"
#: Aliases the report shows (the registry's public names for versions).
ALIASES: tuple[str, ...] = ("production",)
_DASH = "—"


class RegistryLike(Protocol):
    """What :func:`load_report_data` needs from a model registry
    (:class:`~streamcl.registry.registry.ModelRegistry`)."""

    def versions(self) -> list[int]: ...

    def manifest(self, version: int) -> dict[str, Any]: ...

    def alias(self, name: str) -> int | None: ...


# -- the data -------------------------------------------------------------------------------------
@dataclass
class ReportData:
    """Journal entries (in seq order), registry manifests and aliases.

    The derived views (boundaries, publications, ...) are computed from ``entries`` on access,
    so the journal stays the one source of truth.
    """

    entries: list[Entry] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    aliases: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_sources(cls, entries: Iterable[Entry | Mapping[str, Any]],
                     manifests: Iterable[Mapping[str, Any]],
                     aliases: Mapping[str, int | None]) -> ReportData:
        """Entries as typed values (a JSON object is read as the journal reads it, so a report
        of an old log shows what its entries mean today); manifests ordered by version; unset
        aliases dropped."""
        versions = sorted((dict(m) for m in manifests), key=lambda m: int(m["version"]))
        return cls(entries=[e if isinstance(e, Entry) else entry_from_json(e) for e in entries],
                   versions=versions,
                   aliases={str(k): int(v) for k, v in aliases.items() if v is not None})

    # derived views
    @property
    def batches(self) -> list[Batch]:
        return [e for e in self.entries if isinstance(e, Batch)]

    @property
    def boundaries(self) -> list[dict[str, Any]]:
        """The boundary decisions of the journaled batches (``Boundary.to_json()``), in stream
        order."""
        return [b.plan["boundary"] for b in self.batches if b.plan.get("boundary")]

    @property
    def publications(self) -> list[Publish]:
        return [e for e in self.entries if isinstance(e, Publish)]

    @property
    def rejections(self) -> list[Reject]:
        return [e for e in self.entries if isinstance(e, Reject)]

    @property
    def verdicts(self) -> list[Verdict]:
        """Publications and rejections, in stream order."""
        return sorted((e for e in self.entries if isinstance(e, Verdict)),
                      key=lambda e: e.position)

    @property
    def samples(self) -> int:
        """Samples trained: the end of the furthest batch plan."""
        return max((b.plan["position"] + b.plan["size"] for b in self.batches if b.plan),
                   default=0)

    @property
    def experiences(self) -> int:
        """Experiences opened so far: experience 0 once a sample arrived, one per boundary."""
        if self.boundaries:
            return max(b["experience"] for b in self.boundaries) + 1
        return 1 if self.samples > 0 else 0

    @property
    def boundary_counts(self) -> dict[str, int]:
        return dict(Counter(b["trigger"] for b in self.boundaries))

    def headline_sources(self) -> list[tuple[str, Evaluation]]:
        """Where the "current" metrics come from, best first, each with a caption.

        The serving model is what a reader cares about: the production alias's version (its
        publication, else its manifest), then the latest publication, then the latest rejected
        candidate (a stream whose every candidate was rejected still has numbers to show).
        """
        out: list[tuple[str, Evaluation]] = []
        prod = self.aliases.get("production")
        if prod is not None:
            for pub in reversed(self.publications):
                if pub.version == prod:
                    out.append((f"production version {prod} (published at position "
                                f"{pub.position})", pub.metrics))
                    break
            for m in self.versions:
                if m["version"] == prod and m.get("metrics"):
                    out.append((f"production version {prod} (registry manifest)",
                                Evaluation.from_json(m["metrics"])))
        if self.publications:
            pub = self.publications[-1]
            out.append((f"latest publication, version {pub.version} at position "
                        f"{pub.position}", pub.metrics))
        if self.rejections:
            rej = self.rejections[-1]
            out.append((f"latest rejected candidate, at position {rej.position}", rej.metrics))
        return out

    def headline_metric(self, key: str) -> tuple[Any, str] | None:
        """``(value, caption)`` of ``key`` (an :class:`Evaluation` field) from the first
        :meth:`headline_sources` that has it (an empty matrix counts as none)."""
        for caption, metrics in self.headline_sources():
            value = getattr(metrics, key)
            if value is not None and not (isinstance(value, AccuracyMatrix) and not value.rows):
                return value, caption
        return None


def load_report_data(journal_entries: Iterable[Entry | Mapping[str, Any]],
                     registry: RegistryLike | None = None) -> ReportData:
    """Gather a report's data from journal entries and (optionally) a model registry.

    Without a registry the version table is rebuilt from the journal's ``publish`` entries.
    """
    manifests: list[dict[str, Any]] = []
    aliases: dict[str, int | None] = {}
    if registry is not None:
        manifests = [registry.manifest(v) for v in registry.versions()]
        aliases = {name: registry.alias(name) for name in ALIASES}
    return ReportData.from_sources(journal_entries, manifests, aliases)


# -- formatting helpers ---------------------------------------------------------------------------
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None or isinstance(value, bool):
        return _DASH
    try:
        f = float(value)
    except (TypeError, ValueError):
        return _esc(value)
    return _DASH if math.isnan(f) else f"{f:.{digits}f}"


def _when(ts: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(ts)))
    except (TypeError, ValueError, OverflowError, OSError):
        return _DASH


def matrix_array(matrix: AccuracyMatrix) -> tuple[np.ndarray, list[int], list[int]]:
    """An accuracy matrix as a dense float array (NaN where undefined), row and column ids.

    Rows are the experiences that have a row (one with no defined cell yet is still a row:
    the experience was trained); columns the experiences that have a cell.

    >>> a, rows, cols = matrix_array(AccuracyMatrix({0: {0: 0.9}, 1: {0: 0.5, 1: 0.8}}))
    >>> rows, cols, a.tolist()
    ([0, 1], [0, 1], [[0.9, nan], [0.5, 0.8]])
    """
    rows = matrix.row_ids
    cols = sorted({c for row in matrix.rows.values() for c in row})
    out = np.full((len(rows), len(cols)), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            if (v := matrix.rows[r].get(c)) is not None:
                out[i, j] = v
    return out, rows, cols


# -- charts ---------------------------------------------------------------------------------------
def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No "Software" chunk: the same data gives the same bytes across matplotlib versions.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _candidate_accuracy(entry: Verdict) -> float | None:
    """A gated candidate's holdout accuracy: from its metrics, else the gate's own number."""
    acc = entry.metrics.holdout_accuracy
    return acc if acc is not None else entry.gate.candidate


def _empty_note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12,
            color="#555555")


def accuracy_chart(data: ReportData) -> bytes:
    """Prequential and holdout accuracy against the stream position, boundaries as lines."""
    from matplotlib.lines import Line2D

    fig = _figure(10, 4.5)
    ax = fig.add_subplot()
    evals = data.verdicts
    handles: list[Any] = []
    for key, label, colour in (("prequential_accuracy", "prequential accuracy (windowed)",
                                "#1f77b4"),
                               ("holdout_accuracy", "holdout accuracy (candidate)", "#ff7f0e")):
        pts = [(e.position, v, isinstance(e, Reject)) for e in evals
               if (v := getattr(e.metrics, key)) is not None]
        if not pts:
            continue
        xs, ys, rejected = zip(*pts, strict=True)
        (line,) = ax.plot(xs, ys, color=colour, marker="o", markersize=4, label=label)
        handles.append(line)
        rx = [x for x, r in zip(xs, rejected, strict=True) if r]
        ry = [y for y, r in zip(ys, rejected, strict=True) if r]
        if rx:
            ax.scatter(rx, ry, marker="X", s=90, color="#d62728", edgecolors="black",
                       linewidths=0.6, zorder=5)
    if data.rejections:
        handles.append(Line2D([], [], linestyle="none", marker="X", markersize=9,
                              color="#d62728", markeredgecolor="black",
                              label="rejected by the gate"))
    by_trigger: dict[str, list[int]] = {}
    for b in data.boundaries:
        by_trigger.setdefault(b["trigger"], []).append(b["index"])
    for trigger, xs_b in by_trigger.items():
        colour = TRIGGER_COLOURS.get(trigger, _OTHER_COLOUR)
        ax.vlines(xs_b, 0, 1, transform=ax.get_xaxis_transform(), colors=colour,
                  linestyles="--", linewidth=1.2, alpha=0.8)
        handles.append(Line2D([], [], color=colour, linestyle="--",
                              label=f"boundary: {trigger} ({len(xs_b)})"))
    ax.set_xlabel("samples trained (stream position)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    right = max([data.samples, *[e.position for e in evals],
                 *[x for xs_b in by_trigger.values() for x in xs_b]], default=0)
    ax.set_xlim(0, max(right, 1))
    ax.grid(alpha=0.3)
    if not evals:
        _empty_note(ax, "no publications yet" + ("" if by_trigger else ", no boundaries"))
    if handles:
        ax.legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.9)
    ax.set_title("Accuracy over the stream")
    return _png(fig)


def matrix_chart(matrix: AccuracyMatrix | None, caption: str = "") -> bytes:
    """:func:`matrix_figure` as PNG bytes."""
    return _png(matrix_figure(matrix, caption))


def matrix_figure(matrix: AccuracyMatrix | None, caption: str = "") -> Any:
    """The accuracy matrix as a heat map, each defined cell labelled with its value.

    Undefined cells are left white and unlabelled: a 0 there would
    read as total forgetting. Returned as a :class:`~matplotlib.figure.Figure` so the labels
    can be checked without decoding pixels.
    """
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot()
    a, rows, cols = matrix_array(matrix) if matrix is not None else (np.empty((0, 0)), [], [])
    if a.size == 0:
        ax.set_axis_off()
        _empty_note(ax, "no accuracy matrix yet")
        return fig
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    size = max(5.0, min(11.0, 90.0 / max(a.shape)))
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            v = a[i, j]
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=size,
                        color="black" if v > 0.6 else "white")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel("holdout samples of experience")
    ax.set_ylabel("after training experience")
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title("Accuracy matrix" + (f"\n{caption}" if caption else ""), fontsize=10)
    return fig


def versions_chart(data: ReportData, rows: list[dict[str, Any]]) -> bytes:
    """Holdout accuracy of each version at its position, parent links, rejected candidates."""
    from matplotlib.lines import Line2D

    fig = _figure(10, 4)
    ax = fig.add_subplot()
    points = {r["version"]: (r["position"], r["holdout"]) for r in rows
              if r["position"] is not None and r["holdout"] is not None}
    for r in rows:
        child, parent = points.get(r["version"]), points.get(r["parent"])
        if child and parent:
            ax.plot([parent[0], child[0]], [parent[1], child[1]], color="#999999", linewidth=1,
                    zorder=1)
    handles: list[Any] = []
    if points:
        xs, ys = zip(*points.values(), strict=True)
        ax.scatter(xs, ys, color="#1f77b4", s=40, zorder=3)
        handles.append(Line2D([], [], linestyle="none", marker="o", color="#1f77b4",
                              label="published version"))
        for v, (x, y) in points.items():
            ax.annotate(f"v{v}", (x, y), textcoords="offset points", xytext=(0, 11),
                        ha="center", fontsize=8)
    prod = data.aliases.get("production")
    if prod in points:
        ax.scatter(*points[prod], marker="*", s=320, color="#ffbf00", edgecolors="black",
                   zorder=4)
        handles.append(Line2D([], [], linestyle="none", marker="*", markersize=14,
                              color="#ffbf00", markeredgecolor="black", label="production"))
    rej = [(e.position, y) for e in data.rejections
           if (y := _candidate_accuracy(e)) is not None]
    if rej:
        ax.scatter(*zip(*rej, strict=True), marker="X", s=70, color="#d62728",
                   edgecolors="black", linewidths=0.6, zorder=3)
        handles.append(Line2D([], [], linestyle="none", marker="X", markersize=9,
                              color="#d62728", markeredgecolor="black",
                              label="rejected candidate"))
    ax.set_xlabel("samples trained (stream position)")
    ax.set_ylabel("holdout accuracy")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    if not points and not rej:
        _empty_note(ax, "no versions yet")
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.set_title("Model versions")
    return _png(fig)


# -- the page -------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; }
.empty { color: #666; font-style: italic; }
.caption { color: #555; font-size: 0.9em; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: middle;
          margin-right: 0.3em; border: 1px solid #555; }
"""

# Sets body[data-rendered] once the images have had their chance to load: "ok" only if every
# <img> decoded to a real bitmap, so a headless browser's DOM dump shows a broken page.
_SCRIPT = """<script>
(function () {
  function check() {
    var ok = Array.prototype.every.call(document.images, function (img) {
      return img.complete && img.naturalWidth > 0;
    });
    document.body.dataset.rendered = ok ? "ok" : "broken";
  }
  if (document.readyState === "complete") { check(); }
  else { window.addEventListener("load", check); }
})();
</script>"""


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: set[int],
           css_class: str = "") -> str:
    """A table; ``rows`` cells are already-escaped HTML, ``numeric`` column indices align right."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
        for i, c in enumerate(row)) + "</tr>\n" for row in rows)
    cls = f' class="{_esc(css_class)}"' if css_class else ""
    return f"<table{cls}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>"


def _gate_text(gate: Gate | None, trigger: str | None = None) -> str:
    if gate is None:
        return _DASH
    parts = [f"<strong>{_esc(gate.decision)}</strong>"]
    detail = f"candidate {_num(gate.candidate)} vs production {_num(gate.production)}"
    if gate.tolerance is not None:
        detail += f", tolerance {_num(gate.tolerance)}"
    parts.append(detail)
    if trigger is not None:
        parts.append(f"trigger {_esc(trigger)}")
    return "<br>".join(parts)


def version_rows(data: ReportData) -> list[dict[str, Any]]:
    """One row per version: the registry's manifests, plus versions only the journal knows."""
    pubs = {p.version: p for p in data.publications}
    by_alias: dict[int, list[str]] = {}
    for name, v in sorted(data.aliases.items()):
        by_alias.setdefault(v, []).append(name)
    manifests = {m["version"]: m for m in data.versions}
    rows = []
    for v in sorted(set(manifests) | set(pubs)):
        m, p = manifests.get(v, {}), pubs.get(v)
        holdout = (m.get("metrics") or {}).get("holdout_accuracy")
        if holdout is None and p is not None:
            holdout = p.metrics.holdout_accuracy
        rows.append({"version": v, "parent": m.get("parent"),
                     "created": m.get("created_at", p.ts if p else None),
                     "position": m.get("position", p.position if p else None),
                     "holdout": holdout, "aliases": by_alias.get(v, []),
                     "strategy": m.get("strategy"), "gate": p.gate if p else None,
                     "trigger": p.trigger if p else None})
    return rows


def _summary(data: ReportData) -> str:
    counts = data.boundary_counts
    by_trigger = ", ".join(f"{_esc(t)}: {n}" for t, n in sorted(counts.items())) or "none"
    items: list[tuple[str, str]] = [
        ("samples trained", f"{data.samples:,}"),
        ("batches", f"{len(data.batches):,}"),
        ("experiences", str(data.experiences)),
        ("boundaries", f"{sum(counts.values())} ({by_trigger})"),
        ("publications", str(len(data.publications))),
        ("gate rejections", str(len(data.rejections))),
        ("versions in the registry", str(len(data.versions))),
    ]
    for name in ALIASES:
        if name in data.aliases:
            items.append((f"{name} version", str(data.aliases[name])))
    # The scalar summaries are None where undefined; they follow from the matrix when it is
    # there (a matrix from another source than the headline's).
    derived: dict[str, float] = {}
    derived_from = ""
    if (matrix_src := data.headline_metric("accuracy_matrix")) is not None:
        matrix, derived_from = matrix_src
        derived = {"average_accuracy": matrix.average_accuracy(),
                   "forgetting": matrix.forgetting(),
                   "backward_transfer": matrix.backward_transfer()}
    for key, label in (("prequential_accuracy", "prequential accuracy"),
                       ("holdout_accuracy", "holdout accuracy"),
                       ("average_accuracy", "average accuracy"),
                       ("forgetting", "forgetting"),
                       ("backward_transfer", "backward transfer (BWT)"),
                       ("negative_flip_rate", "negative flip rate")):
        found = data.headline_metric(key)
        if found is not None:
            items.append((label, f'{_num(found[0])} <span class="caption">'
                                 f"({_esc(found[1])})</span>"))
        elif key in derived and not math.isnan(derived[key]):
            items.append((label, f'{_num(derived[key])} <span class="caption">(computed '
                                 f"from the accuracy matrix of the {_esc(derived_from)})</span>"))
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{v}</td></tr>\n" for k, v in items)
    return f'<table class="summary">\n<tbody>\n{body}</tbody></table>'


def _boundaries_section(data: ReportData) -> str:
    if not data.boundaries:
        return '<p class="empty">No experience boundaries yet.</p>'
    legend = " ".join(
        f'<span><span class="swatch" style="background:'
        f'{TRIGGER_COLOURS.get(t, _OTHER_COLOUR)}"></span>{_esc(t)}</span>'
        for t in sorted(data.boundary_counts))
    rows = [(_esc(b["experience"]), _esc(b["index"]), _esc(b["trigger"]),
             _num(b.get("statistic"), 4))
            for b in data.boundaries]
    return (f'<p class="caption">Colours in the chart: {legend}</p>\n'
            + _table(["experience", "starts at sample", "trigger", "detector statistic"], rows,
                     {0, 1, 3}, "boundaries"))


def _versions_section(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="empty">No model versions yet: nothing has been published.</p>'
    cells = [(_esc(r["version"]), _DASH if r["parent"] is None else _esc(r["parent"]),
              _when(r["created"]), _DASH if r["position"] is None else f"{r['position']:,}",
              _num(r["holdout"]), _esc(", ".join(r["aliases"])) or _DASH,
              _esc(r["strategy"]) if r["strategy"] is not None else _DASH,
              _gate_text(r["gate"], r["trigger"]))
             for r in rows]
    return _table(["version", "parent", "created", "position", "holdout acc", "aliases",
                   "strategy", "gate decision"], cells, {0, 1, 3, 4}, "versions")


def _rejections_section(data: ReportData) -> str:
    if not data.rejections:
        return '<p class="empty">No gate rejections.</p>'
    cells = []
    for e in data.rejections:
        cells.append((_esc(e.seq), f"{e.position:,}", _esc(e.trigger), _when(e.ts),
                      _num(_candidate_accuracy(e)), _num(e.gate.production),
                      _num(e.gate.tolerance), _esc(e.reason)))
    return _table(["seq", "position", "trigger", "time", "candidate acc", "production acc",
                   "tolerance", "reason"], cells, {0, 1, 4, 5, 6}, "rejections")


def _img(name: str, png: bytes, alt: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{_esc(alt)}" data-file="{_esc(name)}">'


def render_html(data: ReportData, charts: Mapping[str, bytes], title: str,
                matrix_caption: str | None) -> str:
    """The page, with ``charts`` (file name -> PNG bytes) embedded as data URIs."""
    rows = version_rows(data)
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    matrix_note = (f'<p class="caption">From the {_esc(matrix_caption)}. Row <i>r</i>: after '
                   "training experience <i>r</i>; column <i>c</i>: holdout samples of "
                   "experience <i>c</i>; blank: undefined.</p>" if matrix_caption else
                   '<p class="empty">No accuracy matrix yet: no candidate has been evaluated on '
                   "the holdout.</p>")
    pubs_note = ("" if data.publications or data.rejections else
                 '<p class="empty">No publications yet: the gate has not evaluated a candidate.'
                 "</p>")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="caption">Generated {generated} from {len(data.entries):,} journal entries '
        f"and {len(data.versions)} registry manifests.</p>",
        '<h2 id="summary">Summary</h2>',
        _summary(data),
        '<h2 id="accuracy">Accuracy over time</h2>',
        pubs_note,
        _img("accuracy.png", charts["accuracy.png"],
             "prequential and holdout accuracy against the stream position"),
        '<h2 id="boundaries">Experience boundaries</h2>',
        _boundaries_section(data),
        '<h2 id="matrix">Accuracy matrix</h2>',
        matrix_note,
        _img("accuracy_matrix.png", charts["accuracy_matrix.png"], "accuracy matrix heat map"),
        '<h2 id="versions">Version history</h2>',
        _img("versions.png", charts["versions.png"], "model versions"),
        _versions_section(rows),
        '<h2 id="rejections">Gate rejections</h2>',
        _rejections_section(data),
        _SCRIPT,
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(p for p in parts if p)


def write_report(data: ReportData, out_dir: Path, title: str = "streamcl report") -> Path:
    """Write ``report.html``, ``accuracy.png``, ``accuracy_matrix.png`` and ``versions.png``.

    Returns the HTML's path. ``out_dir`` is created if needed; existing files are replaced.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    found = data.headline_metric("accuracy_matrix")
    matrix, caption = found if found is not None else (None, None)
    charts = {
        "accuracy.png": accuracy_chart(data),
        "accuracy_matrix.png": matrix_chart(matrix, caption or ""),
        "versions.png": versions_chart(data, version_rows(data)),
    }
    for name, png in charts.items():
        (out_dir / name).write_bytes(png)
    page = out_dir / "report.html"
    page.write_text(render_html(data, charts, title, caption), encoding="utf-8")
    return page
