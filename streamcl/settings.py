"""The service's settings: one tree of pydantic models, from a YAML file and the environment.

The tree has one section per part of the service, and each part is handed its section whole:
``learner`` (the model and the continual-learning method: :class:`LearnerSettings`, the one
source of :class:`~streamcl.trainer.TrainerConfig`'s defaults and of ``streamcl simulate``'s
flags), ``kafka`` (brokers and client security), ``consumer`` (the input topic and
micro-batches), ``journal`` (the learner's name), ``snapshots``, ``publication`` (registry,
quality gate, holdout) and ``metrics``. A setting is declared once, here, with its default,
its bounds and its description; the README's reference is generated from these models.

The YAML file of ``streamcl run --config FILE.yaml`` is nested by section; an environment
variable names the section and the setting joined by ``__`` (``STREAMCL_CONSUMER__BATCH_SIZE=64``;
dicts and lists as JSON, ``STREAMCL_LEARNER__PARAMS='{"mem_size": 500}'``). The environment
wins over the file, setting by setting, so a container can override one value of a baked-in
file. An invalid or unknown setting fails at start with one line naming it.

>>> s = Settings(learner={"input_shape": [784], "strategy": "er", "params": {"mem_size": 200}})
>>> s.learner.trainer_config().strategy, s.consumer.batch_size, s.group_id()
('er', 32, 'streamcl')
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

from streamcl import DEFAULT_STRATEGY

if TYPE_CHECKING:  # the trainer takes its defaults from LearnerSettings: import it lazily
    from streamcl.trainer import TrainerConfig

ENV_PREFIX = "STREAMCL_"
ENV_DELIMITER = "__"


class SettingsError(ValueError):
    """An invalid setting: the message names it, where it came from, and what is wrong."""


class Section(BaseModel):
    """A section of the tree: unknown keys are errors, not silently ignored typos."""

    model_config = ConfigDict(extra="forbid")


class LearnerSettings(Section):
    """The learner: what :class:`~streamcl.trainer.TrainerConfig` holds, plus its threads.

    These are also ``streamcl simulate``'s flags and ``TrainerConfig``'s defaults, so a
    simulation, a test and the service agree on what an unset value means."""

    input_shape: list[PositiveInt] = Field(
        description="shape of one sample's x, e.g. [784] or [1, 28, 28]")
    model: str = Field("mlp", description='mlp, cnn or package.module:function')
    hidden: list[PositiveInt] = Field(
        [256, 256], description='MLP layer widths, or CNN channel counts')
    strategy: str = Field(DEFAULT_STRATEGY,
                          description='continual-learning strategy (see Strategies)')
    params: dict[str, Any] = Field(
        {}, description='the strategy\'s parameters, e.g. {"mem_size": 500}')
    lr: PositiveFloat = Field(0.05, description='SGD learning rate')
    momentum: float = Field(0.0, ge=0, description='SGD momentum')
    boundaries: str = Field(
        "drift",
        description="experience boundary triggers: drift, task, new-class, every:N, or a "
                    "comma list")
    detector: str = Field("adwin", description='drift detector: adwin, page-hinkley, ddm or kswin')
    detector_params: dict[str, Any] = Field(
        {}, description='the detector\'s parameters (River\'s names), e.g. {"delta": 0.002}')
    min_length: int = Field(
        0, ge=0, description='fewest samples in an inferred (drift, new-class) experience')
    cooldown: int = Field(
        0, ge=0, description='samples after a boundary before the detector listens again')
    monitor: Literal["error", "loss"] = Field(
        "error", description='what the drift detector watches: prequential errors or losses')
    seed: int = Field(
        0, description='random seed (initialisation, replay sampling, holdout selection)')
    max_classes: PositiveInt = Field(
        1000,
        description="most distinct labels the head grows to; samples of a label past it go to "
                    "the dead-letter topic (label_cap)")
    torch_threads: PositiveInt | None = Field(
        None,
        description="torch intra-op threads (unset: one for a small model, else the CPUs this "
                    "process may use, less one for a prefetching consumer)")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        from streamcl.strategies import STRATEGIES

        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}")
        return name

    def trainer_config(self) -> TrainerConfig:
        """The trainer's stored config: everything but the thread count, which changes speed
        and the last bits of results, so the journal's start entries record it instead."""
        from streamcl.trainer import TrainerConfig

        return TrainerConfig(
            input_shape=tuple(self.input_shape), model=self.model, hidden=tuple(self.hidden),
            strategy=self.strategy, params=dict(self.params), lr=self.lr,
            momentum=self.momentum, boundaries=self.boundaries, detector=self.detector,
            detector_params=dict(self.detector_params), min_length=self.min_length,
            cooldown=self.cooldown, monitor=self.monitor, seed=self.seed,
            max_classes=self.max_classes)


class KafkaSettings(Section):
    """Where the brokers are and how to reach them; no bootstrap servers means "start the
    embedded broker"."""

    bootstrap_servers: str | None = Field(
        None,
        description="Kafka bootstrap servers (host:port[,host:port...]); unset: start the "
                    "embedded broker on a free loopback port, on kafka.embedded_storage")
    embedded_storage: str | None = Field(
        None,
        description="where the embedded broker (no bootstrap_servers) keeps its data: a tansu "
                    "storage URL, s3://BUCKET/ (endpoint and keys from AWS_* variables) or "
                    "postgres://... where tansu is built with it; memory:// loses everything "
                    "on restart; unset: `streamcl run` refuses to start an embedded broker")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="PLAINTEXT, SSL (TLS), SASL_SSL (SASL over TLS) or SASL_PLAINTEXT (SASL "
                    "without TLS: the login is protected by SCRAM, the data is not)")
    ssl_cafile: str | None = Field(
        None, description="CA bundle (PEM) that signed the brokers' certificates")
    ssl_certfile: str | None = Field(
        None, description='client certificate (PEM) for mutual TLS; with ssl_keyfile')
    ssl_keyfile: str | None = Field(
        None, description='client private key (PEM) for mutual TLS; with ssl_certfile')
    sasl_mechanism: str | None = Field(
        None, description='with SASL_*: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512')
    sasl_plain_username: str | None = Field(None, description='with SASL_*: the user name')
    sasl_plain_password: str | None = Field(
        None,
        description="with SASL_*: the password (give it as an environment variable from a "
                    "secret, not in the file)")

    def client_config(self) -> dict[str, Any]:
        """The security part of every Kafka client's configuration (consumer, journal,
        announcer), so all of them connect the same way."""
        from streamcl.stream.broker import kafka_config

        return kafka_config(
            security_protocol=self.security_protocol, ssl_cafile=self.ssl_cafile,
            ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile,
            sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_plain_username,
            sasl_plain_password=self.sasl_plain_password)


class ConsumerSettings(Section):
    """The input: which topic, how it is decoded, and how it is cut into micro-batches."""

    topic: str = Field(
        "samples", min_length=1,
        description='input topic of labelled samples (created with one partition if missing)')
    group_id: str | None = Field(None, description='Kafka consumer group (default: journal.name)')
    encoding: Literal["binary", "json"] = Field(
        "binary", description='how the input messages are encoded (see Message formats)')
    batch_size: PositiveInt = Field(
        32, description='samples per micro-batch: one journal entry and one train step')
    max_wait_s: PositiveFloat = Field(
        0.5, description='longest wait for a micro-batch to fill before a partial one is trained')
    prefetch: bool = Field(True, description="consume in a child process, one batch ahead")


class JournalSettings(Section):
    """The learner's identity: its journal, its transactional writer id, its announcements."""

    name: str = Field("streamcl", min_length=1, description="journal topic is <name>.journal")
    timeout_s: PositiveFloat = Field(
        30.0,
        description="how long one broker round trip of the journal may take (an append's "
                    "acknowledgement, a read); past it the writer reconnects, so an outage of "
                    "any length is waited out")


class SnapshotSettings(Section):
    """State snapshots: they bound how much of the journal a restart replays."""

    dir: Path = Field(
        Path("snapshots"),
        description='directory of the state snapshots (safetensors + SHA-256 sidecars)')
    every_batches: PositiveInt = Field(100, description='snapshot after this many batches')
    every_s: PositiveFloat | None = Field(
        60.0,
        description="also snapshot this often in seconds, on a quiet stream too (unset: by "
                    "batches only)")
    keep: PositiveInt = Field(3, description='newest snapshots kept; older ones are deleted')
    drain_timeout_s: PositiveFloat = Field(
        25.0,
        description="after SIGTERM, the last batch, snapshot and commit must finish within this;"
                    " past it the process exits (code 1) without them, nothing lost (below "
                    "Kubernetes' 30 s grace period)")


class PublicationSettings(Section):
    """Candidate models: when they are published, and the holdout gate that judges them."""

    registry: str = Field("registry", min_length=1,
                          description="a directory, or an fsspec URL such as s3://bucket/path")
    every_samples: PositiveInt | None = Field(
        5000,
        description="publish a candidate model every this many trained samples (unset: not "
                    "by count)")
    every_s: PositiveFloat | None = Field(
        None, description='publish a candidate model every this many seconds (unset: not by time)')
    at_experience_end: bool = Field(
        True, description='publish a candidate model when an experience ends')
    gate_tolerance: float = Field(0.02, ge=0, le=1, description="accepted accuracy drop")
    holdout_fraction: float = Field(0.05, ge=0, lt=1,
                                    description="share of samples kept out of training")
    holdout_size: PositiveInt = Field(1000, description="class-balanced holdout reservoir")
    keep_versions: PositiveInt | None = Field(
        None,
        description="retention after each publication: keep the newest this many versions "
                    "plus every version an alias points at or pointed at before (see "
                    "keep_alias_history); unset: keep every version")
    keep_alias_history: int | None = Field(
        None, ge=0,
        description="with keep_versions: per alias, keep only the last this many versions it "
                    "pointed at before (the publisher moves production to every version it "
                    "publishes, so unset keeps all of those); unset: all of them")

    @property
    def enabled(self) -> bool:
        """Whether any trigger can publish (else the service needs no publisher)."""
        return bool(self.every_samples or self.every_s or self.at_experience_end)


class MetricsSettings(Section):
    """The /metrics, /healthz and /readyz HTTP endpoint and the windowed metrics."""

    host: str = Field(
        "0.0.0.0", description='address of the /metrics, /healthz and /readyz HTTP server')
    port: int = Field(9100, ge=0, le=65535, description="0: no HTTP endpoint")
    window: PositiveInt = Field(1000, description="samples in windowed accuracy/loss")


class Settings(BaseSettings):
    """The whole tree. ``learner`` has no default (``input_shape`` must be given); every other
    section may be left out."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER,
                                      env_parse_none_str="null", extra="forbid")

    learner: LearnerSettings = Field(description="the model and the continual-learning method")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings,
                                 description="the brokers and client security")
    consumer: ConsumerSettings = Field(default_factory=ConsumerSettings,
                                       description="the input topic and its micro-batches")
    journal: JournalSettings = Field(default_factory=JournalSettings,
                                     description="the learner's name and journal")
    snapshots: SnapshotSettings = Field(default_factory=SnapshotSettings,
                                        description="state snapshots")
    publication: PublicationSettings = Field(
        default_factory=PublicationSettings,
        description="the model registry, publication triggers and the quality gate")
    metrics: MetricsSettings = Field(default_factory=MetricsSettings,
                                     description="the metrics and health endpoint")

    @model_validator(mode="before")
    @classmethod
    def _learner_section(cls, data: Any) -> Any:
        """A missing ``learner`` section is reported as its missing ``input_shape``, the one
        setting without a default, rather than as a missing section."""
        if isinstance(data, dict) and "learner" not in data:
            return {**data, "learner": {}}
        return data

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return env_settings, init_settings  # the environment overrides the file

    def group_id(self) -> str:
        """The consumer group: ``consumer.group_id``, else the learner's name."""
        return self.consumer.group_id or self.journal.name


def sections() -> dict[str, type[Section]]:
    """Section name -> its model, in the tree's order."""
    return {name: field.annotation for name, field in Settings.model_fields.items()}


def env_name(*path: str) -> str:
    """The environment variable of a setting: ``env_name("consumer", "batch_size")`` is
    ``STREAMCL_CONSUMER__BATCH_SIZE``."""
    return ENV_PREFIX + ENV_DELIMITER.join(path).upper()


#: The flat settings of earlier versions -> their place in the tree. A flat key in the file or a
#: flat ``STREAMCL_<NAME>`` variable is refused with this hint: ignored, it would silently fall
#: back to a default (a snapshot directory off the volume).
FLAT_NAMES = {
    **{name: f"learner.{name}" for name in LearnerSettings.model_fields},
    **{name: f"kafka.{name}" for name in KafkaSettings.model_fields},
    **{name: f"consumer.{name}" for name in ("topic", "group_id", "encoding", "batch_size",
                                             "max_wait_s", "prefetch")},
    "name": "journal.name",
    "snapshot_dir": "snapshots.dir", "snapshot_every_batches": "snapshots.every_batches",
    "snapshot_every_s": "snapshots.every_s", "keep_snapshots": "snapshots.keep",
    **{name: f"publication.{name}" for name in ("registry", "gate_tolerance",
                                                "holdout_fraction", "holdout_size")},
    "publish_every_samples": "publication.every_samples",
    "publish_every_s": "publication.every_s",
    "publish_at_experience_end": "publication.at_experience_end",
    "metrics_host": "metrics.host", "metrics_port": "metrics.port",
    "metrics_window": "metrics.window",
}


def moved(key: str) -> str | None:
    """Where a top-level key belongs in the tree: a flat setting of earlier versions
    (``batch_size`` -> ``consumer.batch_size``), or a field of exactly one section."""
    if key in FLAT_NAMES:
        return FLAT_NAMES[key]
    homes = [f"{name}.{key}" for name, model in sections().items() if key in model.model_fields]
    return homes[0] if len(homes) == 1 else None


def _flat_environment(environ: Mapping[str, str]) -> list[str]:
    """The ``STREAMCL_<NAME>`` variables of flat settings, which the tree no longer reads."""
    return sorted(key for key in environ if key.upper().startswith(ENV_PREFIX)
                  and key[len(ENV_PREFIX):].lower() in FLAT_NAMES)


def _error_line(err: Mapping[str, Any]) -> str:
    """One line for pydantic's first error: the setting's dotted path, its environment
    variable, and what is wrong with it."""
    loc = [str(p) for p in err["loc"]]
    tree = sections()
    if not loc:
        return f"settings: {err['msg']}"
    if err["type"] == "extra_forbidden" and len(loc) == 1:
        home = moved(loc[0])
        hint = (f"it belongs in section {home.split('.')[0]} ({home}, environment "
                f"{env_name(*home.split('.'))})" if home else
                f"the sections are {', '.join(tree)}")
        return f"setting {loc[0]} in the config file: not a setting; {hint}"
    path = ".".join(loc[:2])
    where = f"{env_name(*loc[:2])} or {path} in the config file"
    section = tree.get(loc[0])
    if err["type"] == "extra_forbidden" and section is not None:
        home = moved(loc[1])
        hint = (f"did you mean {home}?" if home and home != path else
                f"{loc[0]} has {', '.join(section.model_fields)}")
        return f"setting {path} ({where}): not a setting; {hint}"
    if len(loc) == 1 and section is not None and err["type"] in ("model_type", "dict_type"):
        first = next(iter(section.model_fields))
        return (f"setting {path} ({env_name(path)}__<NAME> or {path} in the config file): must "
                f"be a mapping of {path} settings, e.g. {path}: {{{first}: ...}}")
    item = f"item {'.'.join(loc[2:])}: " if loc[2:] else ""
    return f"setting {path} ({where}): {item}{err['msg']}"


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Settings from a YAML file (optional), the environment, and explicit overrides (sections
    as mappings: ``load_settings(consumer={"topic": "t"})``)."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        # every failure is one line naming the file (found by tests/test_settings_fuzz.py:
        # binary junk, a directory and a non-string key escaped as tracebacks)
        shown = str(path) if str(path).isprintable() else ascii(str(path))
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"--config {shown}: no such file") from None
        except OSError as exc:
            raise SettingsError(f"--config {shown}: cannot be read ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise SettingsError(f"--config {shown}: not UTF-8 text (byte {exc.start})") from None
        except yaml.YAMLError as exc:
            raise SettingsError(" ".join(f"--config {shown}: not valid YAML ({exc})".split())
                                ) from None
        except RecursionError:
            raise SettingsError(f"--config {shown}: not valid YAML (nested too deeply)") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise SettingsError(f"--config {shown}: must be a mapping of section: settings")
        odd = [k for k in (loaded or {}) if not isinstance(k, str)]
        if odd:
            raise SettingsError(f"--config {shown}: section names are text, got {odd[0]!r}")
        values.update(loaded or {})
    values.update(overrides)
    flat = _flat_environment(os.environ)
    if flat:
        key = flat[0]
        home = FLAT_NAMES[key[len(ENV_PREFIX):].lower()]
        raise SettingsError(f"environment variable {key} is no longer read: settings are grouped "
                            f"in sections, set {env_name(*home.split('.'))} instead")
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsError(" ".join(_error_line(exc.errors()[0]).split())) from None
    except SourceError as exc:  # pydantic-settings names the section only: find the variable
        raise SettingsError(_not_json(os.environ) or " ".join(str(exc).split())) from None


def _not_json(environ: Mapping[str, str]) -> str | None:
    """The line for the first environment variable whose value must be JSON (a section, a
    list or a dict) and is not."""
    import json

    tree = sections()
    for key in sorted(environ):
        if not key.upper().startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX):].lower().split(ENV_DELIMITER)
        if path[0] not in tree or len(path) > 2:
            continue
        if len(path) == 2:  # a setting: JSON only when it is a list or a dict
            field = tree[path[0]].model_fields.get(path[1])
            if field is None or not _is_json_field(field.annotation):
                continue
        try:
            json.loads(environ[key])
        except ValueError:
            setting = ".".join(path)
            return (f"setting {setting} ({key}): not valid JSON ({environ[key]!r}); lists and "
                    "dicts in the environment are JSON, e.g. '[256, 256]' or "
                    "'{\"mem_size\": 500}'")
    return None


def _is_json_field(annotation: Any) -> bool:
    """Whether pydantic-settings decodes the field's environment value as JSON."""
    import typing

    origin = typing.get_origin(annotation)
    if origin in (list, dict, tuple, set):
        return True
    return any(_is_json_field(a) for a in typing.get_args(annotation))
