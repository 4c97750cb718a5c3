"""Generate the README's reference sections from the code, so they cannot drift from it.

    python docs/gen_reference.py           # rewrite README.md in place
    python docs/gen_reference.py --check   # exit 1 (and show a diff) if README.md is stale

Each section sits between marker comments in README.md, ``<!-- BEGIN name -->`` and
``<!-- END name -->``, and is rendered from its source of truth:

* ``config``: every section of :class:`streamcl.settings.Settings`, one table each, with every
  field's dotted name, environment variable, type with its constraints, default and
  description;
* ``cli``: every subcommand and option of the argparse parser, :func:`streamcl.cli.build_parser`;
* ``metrics``: every family a fresh :class:`~streamcl.metrics.prometheus.ServiceMetrics`
  exposes (the exact names dashboards and alert rules must use), with its type, labels and help;
* ``serve-metrics``: the same for ``streamcl serve``'s
  :class:`~streamcl.metrics.serving.ServingMetrics`;
* ``strategies``: :data:`streamcl.strategies.STRATEGIES` with their parameters' defaults;
* ``benchmarks``: the summary, figures and speed sections of ``docs/benchmarks.md`` (written by
  ``bench/suite.py``; the per-stream tables stay there).

tests/deploy/test_readme.py fails when README.md differs from what this renders, e.g. when a
setting is added and the README is not regenerated.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"


def _cell(text: Any) -> str:
    """Text for a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: Any) -> str:
    return f"`{text}`"


# -- settings -----------------------------------------------------------------------------------

def _type_name(annotation: Any) -> str:
    """``str | None``, ``PLAINTEXT, SSL or SASL_SSL``, ``list[int]``, ... for a field type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " / ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "null"
    if annotation is typing.Any:
        return "any"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "length >="),
           ("max_length", "length <="))


def _constraints(metadata: list[Any], annotation: Any) -> list[str]:
    """Bounds from a field's metadata and from constrained types (PositiveInt is int > 0)."""
    found = list(metadata)
    stack = [annotation]
    while stack:  # PositiveInt inside ``list[...]`` or ``... | None``
        ann = stack.pop()
        if typing.get_origin(ann) is typing.Annotated:
            found += list(ann.__metadata__)
        stack += list(typing.get_args(ann))
    out = []
    for item in found:
        for attr, symbol in _BOUNDS:
            value = getattr(item, attr, None)
            if value is not None:
                out.append(f"{symbol} {value}")
    return list(dict.fromkeys(out))


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, Path):
        value = str(value)
    return _code(json.dumps(value) if not isinstance(value, str) else value)


def setting_description(name: str, field: Any) -> str:
    return field.description or ""


def render_config() -> str:
    """One table per section of the settings tree, in the tree's order."""
    from streamcl.settings import Settings, env_name, sections

    out: list[str] = []
    for section, model in sections().items():
        out += [f"**`{section}`**: {_cell(Settings.model_fields[section].description or '')}",
                "", "| setting | environment variable | type | default | description |",
                "|---|---|---|---|---|"]
        for name, field in model.model_fields.items():
            kind = _type_name(field.annotation)
            bounds = _constraints(field.metadata, field.annotation)
            if bounds:
                kind += f" ({', '.join(bounds)})"
            out.append(f"| {_code(f'{section}.{name}')} | {_code(env_name(section, name))} | "
                       f"{_cell(kind)} | {_cell(_default(field))} | "
                       f"{_cell(setting_description(name, field))} |")
        out.append("")
    return "\n".join(out).rstrip()


# -- command line -------------------------------------------------------------------------------

def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _subcommand_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction
                      | argparse._VersionAction):
            continue
        if action.option_strings:
            name = ", ".join(action.option_strings)
            if action.nargs != 0:
                name += " " + (action.metavar or action.dest.upper())
        else:
            name = action.metavar or action.dest
        if action.required or not action.option_strings:
            default = "**required**"
        elif action.nargs == 0:
            default = "off"
        elif isinstance(action, argparse._AppendAction):
            default = "repeatable"
        elif action.default is None:
            default = "unset"
        else:
            default = _code(action.default)
        text = action.help or ""
        if action.choices:
            text = (text + f" (one of: {', '.join(map(str, action.choices))})").strip()
        rows.append(f"| {_code(name)} | {_cell(default)} | {_cell(text)} |")
    return rows


def render_cli() -> str:
    from streamcl.cli import build_parser

    out: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str, help_text: str) -> None:
        out.append(f"**`{path}`**: {help_text}\n" if help_text else f"**`{path}`**\n")
        rows = _option_rows(parser)
        if rows:
            out.extend(["| option | default | meaning |", "|---|---|---|", *rows, ""])
        helps = _subcommand_help(parser)
        for name, sub in _subcommands(parser).items():
            walk(sub, f"{path} {name}", helps.get(name, ""))

    root = build_parser()
    helps = _subcommand_help(root)
    for name, sub in _subcommands(root).items():
        walk(sub, f"streamcl {name}", helps.get(name, ""))
    return "\n".join(out).rstrip()


# -- metrics ------------------------------------------------------------------------------------

#: The sample names each OpenMetrics family type exposes (what PromQL queries must use).
EXPOSED_SUFFIXES = {"counter": ("_total", "_created"),
                    "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "summary": ("_sum", "_count", "_created"), "info": ("_info",),
                    "gauge": ("",), "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum",
                                                                         "_gcount"),
                    "unknown": ("",)}


def parse_families(openmetrics_text: str) -> list[dict[str, Any]]:
    """Metric families of an OpenMetrics exposition: name, type, help, label names and the
    exposed sample names (``_total``, ``_bucket``/``_sum``/``_count``, ``_info``, ...)."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    families = []
    for family in text_string_to_metric_families(openmetrics_text):
        labels: list[str] = []
        for sample in family.samples:
            labels += [k for k in sample.labels if k not in labels and k != "le"]
        families.append({"name": family.name, "type": family.type,
                         "help": family.documentation, "labels": labels,
                         "samples": [family.name + s
                                     for s in EXPOSED_SUFFIXES.get(family.type, ("",))]})
    return families


def metric_families(metrics: Any = None) -> list[dict[str, Any]]:
    """What a fresh :class:`ServiceMetrics` (or the ``metrics`` given, e.g. the inference
    server's :class:`ServingMetrics`) exposes. Label names also come from the collectors, so a
    labelled family with no series yet (the consumer lag before the first partition
    assignment) still lists them."""
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.openmetrics.exposition import generate_latest

    from streamcl.metrics.prometheus import ServiceMetrics

    metrics = metrics if metrics is not None else ServiceMetrics()
    declared: dict[str, tuple[str, ...]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            declared[value._name] = tuple(value._labelnames)
    families = parse_families(generate_latest(metrics.registry).decode())
    for family in families:
        family["labels"] = list(dict.fromkeys([*declared.get(family["name"], ()),
                                               *family["labels"]]))
    return families


def render_metrics(metrics: Any = None) -> str:
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for f in metric_families(metrics):
        names = [n for n in f["samples"] if not n.endswith("_created")]
        shown = _code(names[0]) + "".join(
            f", {_code(n[len(f['name']):])}" for n in names[1:])
        rows.append(f"| {shown} | {f['type']} | {_cell(', '.join(f['labels']) or '—')} | "
                    f"{_cell(f['help'])} |")
    return "\n".join(rows)


def render_serve_metrics() -> str:
    from streamcl.metrics.serving import ServingMetrics

    return render_metrics(ServingMetrics())


# -- strategies ---------------------------------------------------------------------------------

def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n")[0].replace("``", "`")


def render_strategies() -> str:
    from streamcl.strategies import STRATEGIES, resolved_params

    rows = ["| `--strategy` | parameters and defaults (`--param k=v`, `learner.params` in the "
            "config) | method |", "|---|---|---|"]
    for name, cls in STRATEGIES.items():
        params = ", ".join(f"{k}={json.dumps(v)}" for k, v in resolved_params(name, {}).items())
        doc = cls.__doc__ if cls.__doc__ else sys.modules[cls.__module__].__doc__
        rows.append(f"| {_code(name)} | {_cell(params) or '—'} | {_cell(_first_line(doc))} |")
    return "\n".join(rows)


# -- benchmarks ---------------------------------------------------------------------------------

def render_benchmarks() -> str:
    """docs/benchmarks.md from its summary up to its per-stream tables, headings one level
    down (the README section has its own title)."""
    text = BENCHMARKS.read_text()
    start, end = text.find("## Summary"), text.find("## Per stream")
    body = text[start:end if end >= 0 else len(text)].strip()
    return "\n".join("#" + line if line.startswith("## ") else line
                     for line in body.splitlines())


# -- splicing -----------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[], str]] = {
    "config": render_config,
    "cli": render_cli,
    "metrics": render_metrics,
    "serve-metrics": render_serve_metrics,
    "strategies": render_strategies,
    "benchmarks": render_benchmarks,
}


def splice(text: str, sections: dict[str, Callable[[], str]] = SECTIONS) -> str:
    """``text`` with each ``<!-- BEGIN name -->...<!-- END name -->`` block re-rendered.
    Every section must have its markers exactly once: a lost marker is an error, not a
    silently skipped section."""
    for name, render in sections.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if len(pattern.findall(text)) != 1:
            raise ValueError(f"README.md needs exactly one '<!-- BEGIN {name} -->' ... "
                             f"'<!-- END {name} -->' block")
        body = render().rstrip("\n")
        text = pattern.sub(lambda m, body=body: f"{m.group(1)}{body}\n{m.group(2)}", text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 with a diff if README.md is out of date")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    current = args.readme.read_text()
    fresh = splice(current)
    if args.check:
        if fresh != current:
            sys.stdout.writelines(difflib.unified_diff(
                current.splitlines(keepends=True), fresh.splitlines(keepends=True),
                str(args.readme), "generated"))
            print(f"\n{args.readme} is out of date: run python docs/gen_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    if fresh != current:
        args.readme.write_text(fresh)
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
