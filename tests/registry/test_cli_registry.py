"""``streamcl registry``: list, show, promote, rollback, diff — and one-line errors."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from streamcl.cli import main
from streamcl.registry import ModelRegistry, models_topic

Publish = Callable[..., dict[str, Any]]


@pytest.fixture
def reg(tmp_path: Path, publish: Publish) -> ModelRegistry:
    """Three versions; production went v1 -> v2."""
    registry = ModelRegistry(tmp_path / "registry")
    publish(registry, 0, aliases=["production"])
    publish(registry, 1, aliases=["production"])
    publish(registry, 2)
    return registry


def cli(capsys: pytest.CaptureFixture[str], registry: ModelRegistry | str,
        *args: str) -> tuple[int, str, str]:
    location = registry if isinstance(registry, str) else registry.url
    code = main(["registry", "--registry", location, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_list(reg: ModelRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, reg, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["version", "created"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == ["v1", "v2", "v3"]
    # version, date, time, position, holdout, aliases, parent
    assert rows["v2"][3:] == ["256", "60.0%", "production", "v1"]
    assert rows["v3"][3:] == ["384", "70.0%", "-", "v2"]
    assert rows["v1"][3:] == ["128", "50.0%", "-", "-"]


def test_show(reg: ModelRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    for spelling in ("2", "v2"):
        code, out, _ = cli(capsys, reg, "show", spelling)
        assert code == 0 and json.loads(out) == reg.manifest(2)


def test_promote_and_rollback_without_broker(reg: ModelRegistry,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, reg, "promote", "v3")
    assert code == 0 and out.strip() == "production -> v3 (was v2)"
    assert "not announced" in err
    assert reg.alias("production") == 3
    code, out, _ = cli(capsys, reg, "rollback")
    assert code == 0 and out.strip() == "production -> v2 (was v3)"
    code, out, _ = cli(capsys, reg, "rollback", "--to", "v3", "--alias", "production")
    assert code == 0 and reg.alias("production") == 3
    code, out, _ = cli(capsys, reg, "promote", "1", "--alias", "canary")
    assert code == 0 and reg.aliases() == {"canary": 1, "production": 3}


def test_diff(reg: ModelRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, reg, "diff", "v1", "3")
    assert code == 0
    assert out.splitlines()[0] == "v1 -> v3"
    assert "holdout_accuracy" in out and "head.weight" in out and "[2, 16] -> [6, 16]" in out
    code, out, _ = cli(capsys, reg, "diff", "1", "3", "--json")
    assert code == 0 and json.loads(out) == json.loads(json.dumps(reg.diff(1, 3)))


@pytest.mark.parametrize(("args", "message"), [
    (("show", "v99"), "no version v99"),
    (("show", "seven"), "give a version number like 7 or v7"),
    (("promote", "v0"), "numbered from 1"),
    (("diff", "1", "42"), "no version v42"),
    (("rollback", "--alias", "staging"), "alias 'staging' is not set"),
])
def test_errors_are_one_line(reg: ModelRegistry, capsys: pytest.CaptureFixture[str],
                             args: tuple[str, ...], message: str) -> None:
    before = reg.alias_record("production")
    code, out, err = cli(capsys, reg, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("streamcl: error: ")
    assert message in err
    assert reg.alias_record("production") == before  # nothing moved


def test_nothing_to_roll_back_and_bad_locations(tmp_path: Path, publish: Publish,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    registry = ModelRegistry(tmp_path / "one")
    publish(registry, 0, aliases=["production"])
    code, _, err = cli(capsys, registry, "rollback")
    assert code == 2 and "nothing to roll back to" in err and len(err.splitlines()) == 1
    code, _, err = cli(capsys, str(tmp_path / "missing"), "list")
    assert code == 2 and "no registry there" in err and len(err.splitlines()) == 1
    code, _, err = cli(capsys, "nosuchproto://x/y", "list")
    assert code == 2 and "nosuchproto" in err and len(err.splitlines()) == 1


def test_config_supplies_location_and_announces(
        kafka_bootstrap: str, tmp_path: Path, publish: Publish,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """With --config the registry location, the brokers and the service name come from the
    settings, and promote/rollback are announced on <name>.models."""
    monkeypatch.chdir(tmp_path)
    name = f"svc-{uuid.uuid4().hex[:8]}"
    location = tmp_path / "models"
    config = {"learner": {"input_shape": [64]}, "journal": {"name": name},
              "kafka": {"bootstrap_servers": kafka_bootstrap},
              "publication": {"registry": str(location)}}
    (tmp_path / "service.yaml").write_text(json.dumps(config))  # JSON is YAML
    registry = ModelRegistry(location)
    publish(registry, 0, aliases=["production"])
    publish(registry, 1)
    base = ["registry", "--config", str(tmp_path / "service.yaml")]
    assert main([*base, "promote", "2"]) == 0
    assert main([*base, "rollback"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["production -> v2 (was v1)", "production -> v1 (was v2)"]
    assert f"announced on {name}.models" in err
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    try:
        tp = TopicPartition(models_topic(name), 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        events: list[dict] = []
        deadline = time.monotonic() + 20
        while len(events) < 2 and time.monotonic() < deadline:
            events += [json.loads(r.value) for recs in consumer.poll(timeout_ms=200).values()
                       for r in recs]
    finally:
        consumer.close(autocommit=False)
    assert [(e["event"], e["version"], e["alias"]) for e in events] == [
        ("promote", 2, "production"), ("rollback", 1, "production")]
    assert all(e["registry"] == registry.url for e in events)
