"""The service's settings: one pydantic-settings model, from a YAML file and the environment.

Every setting can come from ``streamcl run --config FILE.yaml`` or from an environment variable
``STREAMCL_<NAME>`` (``STREAMCL_BATCH_SIZE=64``; dicts and lists as JSON,
``STREAMCL_PARAMS='{"mem_size": 500}'``); the environment wins, so a container can override a
baked-in file. An invalid setting fails at start with one line naming it.

>>> s = Settings(input_shape=[784], strategy="er", params={"mem_size": 200})
>>> s.trainer_config().strategy, s.group_id or s.name
('er', 'streamcl')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from streamcl import DEFAULT_STRATEGY
from streamcl.trainer import TrainerConfig


class SettingsError(ValueError):
    """An invalid setting: the message names it, where it came from, and what is wrong."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STREAMCL_", extra="forbid")

    # Kafka: no bootstrap servers means "start the embedded broker"
    bootstrap_servers: str | None = Field(
        None,
        description="Kafka bootstrap servers (host:port[,host:port...]); unset: start the "
                    "embedded broker on a free loopback port")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_SSL"] = Field(
        "PLAINTEXT", description='PLAINTEXT, SSL (TLS) or SASL_SSL (SASL over TLS)')
    ssl_cafile: str | None = Field(
        None, description="CA bundle (PEM) that signed the brokers' certificates")
    ssl_certfile: str | None = Field(
        None, description='client certificate (PEM) for mutual TLS; with ssl_keyfile')
    ssl_keyfile: str | None = Field(
        None, description='client private key (PEM) for mutual TLS; with ssl_certfile')
    sasl_mechanism: str | None = Field(
        None, description='with SASL_SSL: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512')
    sasl_plain_username: str | None = Field(None, description='with SASL_SSL: the user name')
    sasl_plain_password: str | None = Field(
        None,
        description="with SASL_SSL: the password (give it as an environment variable from a "
                    "secret, not in the file)")
    topic: str = Field(
        "samples", min_length=1,
        description='input topic of labelled samples (created with one partition if missing)')
    name: str = Field("streamcl", min_length=1, description="journal topic is <name>.journal")
    group_id: str | None = Field(None, description='Kafka consumer group (default: name)')
    encoding: Literal["binary", "json"] = Field(
        "binary", description='how the input messages are encoded (see Message formats)')
    # micro-batches and snapshots
    batch_size: PositiveInt = Field(
        32, description='samples per micro-batch: one journal entry and one train step')
    max_wait_s: PositiveFloat = Field(
        0.5, description='longest wait for a micro-batch to fill before a partial one is trained')
    snapshot_dir: Path = Field(
        Path("snapshots"),
        description='directory of the state snapshots (safetensors + SHA-256 sidecars)')
    snapshot_every_batches: PositiveInt = Field(100, description='snapshot after this many batches')
    snapshot_every_s: PositiveFloat | None = Field(
        60.0,
        description="also snapshot this often in seconds, on a quiet stream too (unset: by "
                    "batches only)")
    keep_snapshots: PositiveInt = Field(
        3, description='newest snapshots kept; older ones are deleted')
    prefetch: bool = Field(True, description="consume in a child process, one batch ahead")
    torch_threads: PositiveInt | None = Field(
        None, description="torch intra-op threads (default: torch's choice)")
    # model registry and publication (issue 4)
    registry: str = Field("registry", min_length=1,
                          description="a directory, or an fsspec URL such as s3://bucket/path")
    publish_every_samples: PositiveInt | None = Field(
        5000,
        description="publish a candidate model every this many trained samples (unset: not "
                    "by count)")
    publish_every_s: PositiveFloat | None = Field(
        None, description='publish a candidate model every this many seconds (unset: not by time)')
    publish_at_experience_end: bool = Field(
        True, description='publish a candidate model when an experience ends')
    gate_tolerance: float = Field(0.02, ge=0, le=1, description="accepted accuracy drop")
    holdout_fraction: float = Field(0.05, ge=0, lt=1,
                                    description="share of samples kept out of training")
    holdout_size: PositiveInt = Field(1000, description="class-balanced holdout reservoir")
    # metrics and health endpoints
    metrics_host: str = Field(
        "0.0.0.0", description='address of the /metrics, /healthz and /readyz HTTP server')
    metrics_port: int = Field(9100, ge=0, le=65535, description="0: no HTTP endpoint")
    metrics_window: PositiveInt = Field(1000, description="samples in windowed accuracy/loss")
    # the learner (see `streamcl simulate --help` for the meaning of each)
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

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return env_settings, init_settings  # the environment overrides the file

    def trainer_config(self) -> TrainerConfig:
        return TrainerConfig(
            input_shape=tuple(self.input_shape), model=self.model, hidden=tuple(self.hidden),
            strategy=self.strategy, params=dict(self.params), lr=self.lr,
            momentum=self.momentum, boundaries=self.boundaries, detector=self.detector,
            detector_params=dict(self.detector_params), min_length=self.min_length,
            cooldown=self.cooldown, monitor=self.monitor, seed=self.seed)

    def kafka_client_config(self) -> dict[str, Any]:
        from streamcl.stream.broker import kafka_config

        return kafka_config(
            security_protocol=self.security_protocol, ssl_cafile=self.ssl_cafile,
            ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile,
            sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_plain_username,
            sasl_plain_password=self.sasl_plain_password)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Settings from a YAML file (optional), the environment, and explicit overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise SettingsError(f"--config {path}: no such file") from None
        except yaml.YAMLError as exc:
            raise SettingsError(f"--config {path}: not valid YAML ({exc})".replace("\n", " ")
                                ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise SettingsError(f"--config {path}: must be a mapping of setting: value")
        values.update(loaded or {})
    values.update(overrides)
    try:
        return Settings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "?"
        where = f"STREAMCL_{field.split('.')[0].upper()} or {field!r} in the config file"
        raise SettingsError(f"setting {field} ({where}): {err['msg']}") from None
