"""The settings tree: nested YAML, ``STREAMCL_<SECTION>__<NAME>`` variables, one-line errors, and
one set of learner defaults shared by the service, ``TrainerConfig`` and ``streamcl simulate``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from streamcl import DEFAULT_STRATEGY
from streamcl.cli import build_parser, main, settings_from_args
from streamcl.data import Stream
from streamcl.settings import (
    ConsumerSettings,
    LearnerSettings,
    Settings,
    SettingsError,
    load_settings,
    sections,
)
from streamcl.trainer import TrainerConfig


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No STREAMCL_* variable of the machine running the tests leaks into these."""
    for key in list(os.environ):
        if key.upper().startswith("STREAMCL_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, config: object) -> Path:
    path = tmp_path / "streamcl.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def test_nested_yaml_fills_each_section(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not checked here")
    path = write(tmp_path, f"""
learner: {{input_shape: [1, 8, 8], model: cnn, hidden: [4], strategy: er,
          params: {{mem_size: 50}}, monitor: loss, torch_threads: 2}}
kafka: {{bootstrap_servers: "k1:9092,k2:9092", security_protocol: SSL,
        ssl_cafile: {tmp_path / "ca.pem"}}}
consumer: {{topic: digits, encoding: json, batch_size: 8, prefetch: false}}
journal: {{name: learner-7}}
snapshots: {{dir: /data/snaps, every_batches: 5, every_s: null, keep: 2}}
publication: {{registry: "s3://models/x", every_samples: null, gate_tolerance: 0.1}}
metrics: {{port: 0, window: 50}}
""")
    s = load_settings(path)
    assert s.learner.input_shape == [1, 8, 8] and s.learner.params == {"mem_size": 50}
    assert (s.learner.monitor, s.learner.torch_threads) == ("loss", 2)
    assert s.kafka.client_config() == {"security_protocol": "SSL",
                                       "ssl_cafile": str(tmp_path / "ca.pem")}
    assert (s.consumer.topic, s.consumer.batch_size, s.consumer.prefetch) == ("digits", 8, False)
    assert s.group_id() == "learner-7"  # no consumer.group_id: the learner's name
    assert (s.snapshots.dir, s.snapshots.every_s, s.snapshots.keep) == (Path("/data/snaps"),
                                                                        None, 2)
    assert s.publication.every_samples is None and s.publication.gate_tolerance == 0.1
    assert (s.metrics.port, s.metrics.window, s.metrics.host) == (0, 50, "0.0.0.0")
    config = s.learner.trainer_config()
    assert (config.input_shape, config.model, config.hidden) == ((1, 8, 8), "cnn", (4,))


def test_environment_overrides_the_file_setting_by_setting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, {"learner": {"input_shape": [16], "params": {"mem_size": 9}},
                            "consumer": {"topic": "from-file", "batch_size": 999}})
    monkeypatch.setenv("STREAMCL_CONSUMER__BATCH_SIZE", "64")
    monkeypatch.setenv("STREAMCL_LEARNER__PARAMS", '{"mem_size": 500}')
    monkeypatch.setenv("STREAMCL_SNAPSHOTS__EVERY_S", "null")  # null unsets
    s = load_settings(path)
    assert s.consumer.batch_size == 64 and s.consumer.topic == "from-file"
    assert s.learner.params == {"mem_size": 500} and s.learner.input_shape == [16]
    assert s.snapshots.every_s is None


def test_the_environment_alone_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMCL_LEARNER__INPUT_SHAPE", "[784]")
    monkeypatch.setenv("STREAMCL_KAFKA__BOOTSTRAP_SERVERS", "kafka:9092")
    s = load_settings()
    assert s.learner.input_shape == [784] and s.kafka.bootstrap_servers == "kafka:9092"


# (YAML text, environment, what the one line must say)
BAD = {
    "bad value": ("learner: {input_shape: [16]}\nconsumer: {batch_size: -3}\n", {},
                  ["setting consumer.batch_size (STREAMCL_CONSUMER__BATCH_SIZE or "
                   "consumer.batch_size in the config file)", "greater than 0"]),
    "bad list item": ("learner: {input_shape: [16, 0]}\n", {},
                      ["setting learner.input_shape", "item 1"]),
    "no input shape": ("consumer: {topic: t}\n", {},
                       ["setting learner.input_shape", "Field required"]),
    "unknown top-level key": ("learner: {input_shape: [16]}\nbogus: 1\n", {},
                              ["setting bogus in the config file: not a setting",
                               "learner, kafka, consumer"]),
    "flat key of old files": ("learner: {input_shape: [16]}\nsnapshot_dir: /x\n", {},
                              ["setting snapshot_dir", "snapshots.dir",
                               "STREAMCL_SNAPSHOTS__DIR"]),
    "unknown key in a section": ("learner: {input_shape: [16]}\nconsumer: {bogus: 1}\n", {},
                                 ["setting consumer.bogus", "not a setting",
                                  "consumer has topic, group_id"]),
    "key in the wrong section": ("learner: {input_shape: [16]}\nconsumer: {keep: 1}\n", {},
                                 ["setting consumer.keep", "did you mean snapshots.keep?"]),
    "section not a mapping": ("learner: {input_shape: [16]}\nconsumer: 5\n", {},
                              ["setting consumer", "must be a mapping of consumer settings"]),
    "unknown variable of a section": ("learner: {input_shape: [16]}\n",
                                      {"STREAMCL_METRICS__PROT": "1"},
                                      ["setting metrics.prot (STREAMCL_METRICS__PROT",
                                       "not a setting"]),
    "variable not JSON": ("learner: {input_shape: [16]}\n",
                          {"STREAMCL_LEARNER__PARAMS": "{mem_size: 5"},
                          ["setting learner.params (STREAMCL_LEARNER__PARAMS): not valid JSON"]),
    "flat variable of old deployments": ("learner: {input_shape: [16]}\n",
                                         {"STREAMCL_SNAPSHOT_DIR": "/data/snapshots"},
                                         ["STREAMCL_SNAPSHOT_DIR is no longer read",
                                          "STREAMCL_SNAPSHOTS__DIR"]),
    "file not a mapping": ("- 1\n", {}, ["must be a mapping of section: settings"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_streamcl_run_refuses_a_bad_setting_in_one_line(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    text, env, needles = BAD[case]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main(["run", "--config", str(write(tmp_path, text))])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamcl: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_a_flat_variable_is_refused_even_when_the_tree_is_valid(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A forgotten STREAMCL_BATCH_SIZE would otherwise be ignored without a word."""
    monkeypatch.setenv("STREAMCL_LEARNER__INPUT_SHAPE", "[4]")
    monkeypatch.setenv("STREAMCL_BATCH_SIZE", "64")
    with pytest.raises(SettingsError, match="set STREAMCL_CONSUMER__BATCH_SIZE instead"):
        load_settings()
    monkeypatch.delenv("STREAMCL_BATCH_SIZE")
    monkeypatch.setenv("STREAMCL_TEST_BOOTSTRAP", "host:9092")  # not a setting, not refused
    assert load_settings().consumer.batch_size == 32


def test_every_setting_is_documented_and_sections_forbid_unknown_keys() -> None:
    for name, model in sections().items():
        assert Settings.model_fields[name].description, name
        assert model.model_config.get("extra") == "forbid", name
        for field_name, field in model.model_fields.items():
            assert field.description, f"{name}.{field_name}"


# -- one set of learner defaults ----------------------------------------------------------------

def test_trainer_config_defaults_are_the_learner_settings() -> None:
    assert TrainerConfig(input_shape=(4,)).strategy == DEFAULT_STRATEGY
    assert TrainerConfig(input_shape=(4,)) == LearnerSettings(input_shape=[4]).trainer_config()
    fields = {f.name for f in dataclasses.fields(TrainerConfig)}
    assert fields - {"device"} == set(LearnerSettings.model_fields) - {"torch_threads"}


def test_trainer_config_json_is_unchanged() -> None:
    """Journals and snapshots store this JSON: same keys and values for the same settings."""
    config = LearnerSettings(input_shape=[4], hidden=[8], strategy="naive", seed=3,
                             detector_params={"delta": 0.01}).trainer_config()
    assert config.to_json() == {
        "input_shape": [4], "model": "mlp", "hidden": [8], "strategy": "naive", "params": {},
        "lr": 0.05, "momentum": 0.0, "boundaries": "drift", "detector": "adwin",
        "detector_params": {"delta": 0.01}, "min_length": 0, "cooldown": 0,
        "monitor": "error", "seed": 3, "device": "cpu"}
    assert TrainerConfig.from_json(config.to_json()) == config


def test_simulate_flags_default_to_the_learner_settings() -> None:
    args = build_parser().parse_args(["simulate", "--data", "x.npz"])
    assert settings_from_args(LearnerSettings, args, input_shape=[4]) == \
        LearnerSettings(input_shape=[4])
    assert settings_from_args(ConsumerSettings, args) == ConsumerSettings()
    assert set(LearnerSettings.model_fields) - {"input_shape"} <= set(vars(args))  # a flag each


def test_simulate_flags_are_read_by_the_model() -> None:
    args = build_parser().parse_args(
        ["simulate", "--data", "x.npz", "--hidden", "64,32", "--param", "mem_size=100",
         "--param", "alpha=0.5", "--monitor", "loss", "--lr", "0.1", "--threads", "3",
         "--detector-param", "delta=0.01", "--min-length", "7", "--batch-size", "16"])
    learner = settings_from_args(LearnerSettings, args, input_shape=[4])
    assert (learner.hidden, learner.params, learner.monitor) == (
        [64, 32], {"mem_size": 100, "alpha": 0.5}, "loss")
    assert (learner.lr, learner.torch_threads, learner.min_length) == (0.1, 3, 7)
    assert learner.detector_params == {"delta": 0.01}
    assert settings_from_args(ConsumerSettings, args).batch_size == 16


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--momentum", "-1", "greater than or equal to 0"),
    ("--threads", "0", "greater than 0"),
    ("--hidden", "8,x", "item 1: Input should be a valid integer"),
    ("--cooldown", "soon", "valid integer"),
])
def test_simulate_refuses_what_the_model_refuses_in_one_line(
        flag: str, value: str, needle: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "tiny.npz"
    Stream(np.zeros((8, 4), np.float32), np.arange(8) % 2).save(data)
    code = main(["simulate", "--data", str(data), "--json", flag, value])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.splitlines() == [err.strip()] and f"{flag} {value!r}: " in err and needle in err
