"""Property tests of the settings loader (hypothesis): any config file and any ``STREAMCL_*``
environment give :class:`Settings` or a one-line :class:`SettingsError`, never another exception.

Why: a service that dies at start with a traceback (or a multi-line message cut in a container
log) instead of the line naming the bad setting is an operator's lost hour. The settings are
deterministic (``derandomize``, no example database) so CI sees the same cases on every run,
and the properties run in a thread joined with a wall-clock limit, so a hang fails the test
instead of freezing the suite.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic_core import PydanticUndefined

from streamcl.settings import (
    ENV_PREFIX,
    FLAT_NAMES,
    Settings,
    SettingsError,
    env_name,
    load_settings,
    sections,
)

from .fuzzing import fuzz_settings
from .fuzzing import within_deadline as _within_deadline

EXAMPLES = 300
HANG_S = 60.0
FUZZ = fuzz_settings(EXAMPLES)

#: cases run per property, and what they came to
STATS: dict[str, dict[str, int]] = {}

TREE = sections()
SETTING_PATHS = [(s, f) for s, model in TREE.items() for f in model.model_fields]


def outcome(load: Callable[[], Settings], stats: dict[str, int]) -> None:
    """The one property: Settings, or a SettingsError of one non-empty line."""
    stats["cases"] = stats.get("cases", 0) + 1
    try:
        loaded = load()
    except SettingsError as exc:
        text = str(exc)
        assert text and len(text.splitlines()) == 1 and text == text.strip(), repr(text)
        stats["error"] = stats.get("error", 0) + 1
        return
    assert isinstance(loaded, Settings)
    loaded.learner.trainer_config()  # a loaded learner section is a valid trainer config
    stats["settings"] = stats.get("settings", 0) + 1


def within_deadline(name: str, prop: Callable[[], None]) -> None:
    """Run a hypothesis property under the wall-clock guard, then check it really ran."""
    _within_deadline(name, prop, HANG_S)
    assert STATS.get(name, {}).get("cases", 0) >= EXAMPLES // 2, STATS.get(name)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Exactly these ``STREAMCL_*`` variables for the block (the machine's own set aside).
    Not monkeypatch: its fixture is per test, hypothesis runs many examples in one."""
    saved = {k: v for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX)}
    for key in saved:
        del os.environ[key]
    try:
        os.environ.update(values)
        yield
    finally:
        for key in values:
            os.environ.pop(key, None)
        os.environ.update(saved)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="settings-fuzz-") as tmp:
        yield Path(tmp)


# -- strategies -----------------------------------------------------------------------------------

env_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                   st.sampled_from(["PLAINTEXT", "drift", "mlp", "er", "/tmp/x", "s3://b/p"]))
names = st.one_of(st.sampled_from([f for _, f in SETTING_PATHS] + list(TREE)),
                  st.text(max_size=8))
nested = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(names, inner, max_size=4)),
                      max_leaves=16)


@st.composite
def config_trees(draw: st.DrawFn) -> Any:
    """A config nested like the real one: sections of settings, some valid, some not."""
    tree: dict[Any, Any] = {}
    if draw(st.integers(0, 3)):
        tree["learner"] = {"input_shape": draw(st.sampled_from([[4], [1, 2, 2], [4], [0], "4"]))}
    for section in draw(st.lists(st.sampled_from(list(TREE)), max_size=3)):
        body = tree.setdefault(section, {})
        if not isinstance(body, dict):
            continue
        model = TREE[section]
        for field in draw(st.lists(st.sampled_from(list(model.model_fields)), max_size=3)):
            default = model.model_fields[field].default
            valid = [] if default is PydanticUndefined else [_plain(default)]
            body[field] = draw(st.one_of(nested, st.sampled_from(valid or [None])))
    if draw(st.integers(0, 4)) == 0:  # a flat key of earlier versions, or any key at all
        tree[draw(st.one_of(st.sampled_from(sorted(FLAT_NAMES)), scalar))] = draw(nested)
    return tree


def _plain(value: Any) -> Any:
    """A default as YAML can write it (paths as text)."""
    return str(value) if isinstance(value, Path) else value


def _yaml(tree: Any) -> str:
    return yaml.safe_dump(tree, allow_unicode=True)


yaml_texts = st.one_of(
    st.text(max_size=200),  # any text
    config_trees().map(_yaml), config_trees().map(_yaml), config_trees().map(_yaml),
    nested.map(_yaml),
    st.sampled_from(["", "---", "learner:", "learner: 5", "[1, 2]", "a: [", "? a\n: b",
                     "{1: 2}", "learner: {input_shape: [4]}\n1: 2", "x: !!binary aGk=",
                     "learner: {input_shape: [4], lr: .nan}", "*unknown", "&a [*a]",
                     "learner: {input_shape: [4]}\nkafka: {bootstrap_servers: 5}",
                     "learner: {input_shape: [4]}\n...\n---\nb: 1", "\ufeffa: 1", "a: \x85b"]))

env_names = st.one_of(
    st.sampled_from([env_name(s, f) for s, f in SETTING_PATHS]),
    st.sampled_from([ENV_PREFIX + s.upper() for s in TREE]),
    st.sampled_from([ENV_PREFIX + k.upper() for k in sorted(FLAT_NAMES)]),
    st.sampled_from([env_name(s, f).lower() for s, f in SETTING_PATHS[:8]]),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789", min_size=1, max_size=24).map(
        lambda s: ENV_PREFIX + s))
env_values = st.one_of(
    env_text,
    nested.map(json.dumps),
    st.sampled_from(["[4]", "[784]", "null", "{}", "[]", "1", "-1", "0", "1e400", "nan",
                     "true", "[1, 2", '{"input_shape": [4]}', '{"mem_size": 500}', "", " ",
                     "PLAINTEXT", "SSL"]))
environments = st.one_of(st.just({}), st.dictionaries(env_names, env_values, max_size=4))


# -- properties -----------------------------------------------------------------------------------

def test_any_config_text_and_environment(workdir: Path) -> None:
    name = "text+env"
    stats = STATS.setdefault(name, {})
    path = workdir / "fuzz.yaml"

    @FUZZ
    @given(text=yaml_texts, env=environments)
    # each escaped load_settings as a traceback before the fix: a non-string key, and a
    # nesting deep enough for PyYAML's parser to hit Python's recursion limit
    @example(text="{1: 2}", env={})
    @example(text="Null: 1", env={})
    @example(text="[" * 600, env={})
    @example(text="learner: {input_shape: [4]}\n1: 2", env={})
    def prop(text: str, env: dict[str, str]) -> None:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        with environment(env):
            outcome(lambda: load_settings(path), stats)

    within_deadline(name, prop)


def test_any_config_bytes(workdir: Path) -> None:
    """Not even text: invalid UTF-8, NULs, binary junk."""
    name = "bytes"
    stats = STATS.setdefault(name, {})
    path = workdir / "fuzz-bytes.yaml"

    @FUZZ
    @given(raw=st.one_of(st.binary(max_size=200),
                         config_trees().map(lambda t: _yaml(t).encode()),
                         st.tuples(config_trees(), st.binary(max_size=8)).map(
                             lambda tb: _yaml(tb[0]).encode() + tb[1])))
    @example(raw=b"\xff\xfe\x00")
    def prop(raw: bytes) -> None:
        path.write_bytes(raw)
        with environment({}):
            outcome(lambda: load_settings(path), stats)

    within_deadline(name, prop)


def test_config_path_that_is_not_a_file(workdir: Path) -> None:
    with environment({}):
        for path in (workdir, workdir / "missing.yaml", workdir / "a\nb.yaml"):
            outcome(lambda p=path: load_settings(p), STATS.setdefault("paths", {}))


def test_environment_only() -> None:
    name = "env"
    stats = STATS.setdefault(name, {})

    @FUZZ
    @given(env=environments, shape=st.sampled_from([None, "[4]", "[1, 2, 2]"]))
    def prop(env: dict[str, str], shape: str | None) -> None:
        if shape is not None:
            env = {env_name("learner", "input_shape"): shape, **env}
        with environment(env):
            outcome(lambda: load_settings(None), stats)

    within_deadline(name, prop)
