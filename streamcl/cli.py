"""Command line: `simulate`, `produce`, `run`, `demo`, `replay`, `datasets` and `registry`.

Every user error — a bad option, an unknown strategy parameter, a malformed data file — ends
in one line naming the problem and the fix, and exit code 2. Tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from streamcl import __version__

if TYPE_CHECKING:
    from pydantic import BaseModel

    from streamcl.parallel import ReplicaGroup

    Model = TypeVar("Model", bound=BaseModel)

EXIT_USAGE = 2
#: another instance of the same learner took over its journal (see streamcl.stream.journal)
EXIT_FENCED = 3


class UsageError(Exception):
    """A user error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage dump
        raise UsageError(message)


def parse_value(text: str) -> Any:
    """``--param`` values: JSON literals (3, 0.5, true, null) or else plain strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_params(items: list[str], option: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} {item!r}: write it as name=value")
        params[key.strip()] = parse_value(value.strip())
    return params


#: Flags of settings that are not ``--<name-with-dashes>``.
SETTING_OPTIONS = {"params": "--param", "detector_params": "--detector-param",
                   "torch_threads": "--threads"}


def _option(name: str) -> str:
    return SETTING_OPTIONS.get(name, "--" + name.replace("_", "-"))


def _kind(annotation: Any) -> str:
    """How a setting is written on the command line: ``list`` (comma-separated), ``dict``
    (repeated name=value), ``choice`` (a Literal) or ``plain``."""
    import typing

    origin = typing.get_origin(annotation)
    if origin is list:
        return "list"
    if origin is dict:
        return "dict"
    if origin is typing.Literal:
        return "choice"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return _kind(args[0]) if len(args) == 1 else "plain"


def add_setting_flag(parser: argparse.ArgumentParser, model: type[BaseModel], name: str
                     ) -> None:
    """A flag for one field of a settings model, with the model's default written as the flag
    would be: the model keeps the one copy of defaults, and :func:`settings_from_args`
    validates what the flag gives with the model's own rules."""
    field = model.model_fields[name]
    option, kind = _option(name), _kind(field.annotation)
    default = field.get_default(call_default_factory=True)
    text = field.description or ""
    kwargs: dict[str, Any] = {"dest": name}
    if kind == "dict":
        kwargs |= {"action": "append", "metavar": "K=V",
                   "default": [f"{k}={json.dumps(v)}" for k, v in default.items()]}
        text += f"; one {option} name=value each (repeatable)"
    elif kind == "list":
        kwargs["default"] = ",".join(map(str, default))
        text += " (comma-separated)"
    else:
        kwargs["default"] = default
        if kind == "choice":  # argparse shows the choices instead of a metavar
            kwargs["choices"] = _choices(field.annotation)
        else:
            kwargs["metavar"] = option.lstrip("-").upper().replace("-", "_")
    parser.add_argument(option, help=text, **kwargs)


def _choices(annotation: Any) -> tuple[Any, ...]:
    """The values of the Literal in a field type (``Literal[...] | None`` too)."""
    import typing

    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return next((c for a in typing.get_args(annotation) if (c := _choices(a))), ())


class _DefaultsHelp(argparse.HelpFormatter):
    """``--help`` shows an option's default when it has one (the README's reference has its
    own column for it, so the help text itself does not repeat it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.option_strings and not action.required and action.nargs != 0
                and action.default not in (None, [], argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def settings_from_args(model: type[Model], args: argparse.Namespace, **fixed: Any) -> Model:
    """``model`` from the flags :func:`add_setting_flag` made (and ``fixed`` values): a value
    the model refuses is a usage error naming the flag."""
    from pydantic import ValidationError

    values = dict(fixed)
    for name, field in model.model_fields.items():
        if name in fixed or not hasattr(args, name):
            continue
        given, kind = getattr(args, name), _kind(field.annotation)
        if kind == "dict":
            given = parse_params(given, _option(name))
        elif kind == "list" and isinstance(given, str):
            given = [v.strip() for v in given.split(",") if v.strip()]
        values[name] = given
    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "?"
        item = f"item {err['loc'][1]}: " if len(err["loc"]) > 1 else ""  # --hidden 8,x: item 1
        given = getattr(args, name, fixed.get(name))
        shown = " ".join(given) if isinstance(given, list) else given
        raise UsageError(f"{_option(name)} {shown!r}: {item}{err['msg']}") from None


def build_parser() -> argparse.ArgumentParser:
    from streamcl.settings import ConsumerSettings, JournalSettings, LearnerSettings

    parser = _Parser(prog="streamcl", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"streamcl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sim = sub.add_parser("simulate", help="evaluate a strategy on a stored stream",
                         formatter_class=_DefaultsHelp)
    sim.add_argument("--data", required=True, type=Path,
                     help="training stream (.npz: x, y[, task])")
    sim.add_argument("--test-data", type=Path, help="test set (.npz) for accuracy and forgetting")
    for name in LearnerSettings.model_fields:  # the service's learner settings, as flags
        if name != "input_shape":  # from --data
            add_setting_flag(sim, LearnerSettings, name)
    add_setting_flag(sim, ConsumerSettings, "batch_size")
    sim.add_argument("--json", action="store_true", help="print one JSON object")

    prod = sub.add_parser("produce", help="load a data set into a Kafka topic")
    prod.add_argument("--data", required=True, type=Path, help="stream to send (.npz)")
    prod.add_argument("--topic", required=True)
    prod.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers (host:port)")
    prod.add_argument("--rate", type=float, default=None, help="messages per second (default: max)")
    prod.add_argument("--encoding", choices=["binary", "json"], default="binary")

    run = sub.add_parser("run", help="run the streaming trainer service")
    run.add_argument("--config", type=Path, help="settings file (YAML); STREAMCL_* env wins")
    run.add_argument("--replicas", type=int, default=None, metavar="N",
                     help="train one model with N data-parallel processes on this host "
                          "(launches the same command under torchrun)")
    run.add_argument("--max-restarts", type=int, default=3,
                     help="with --replicas: times torchrun restarts the whole group after a "
                          "replica fails")

    demo = sub.add_parser("demo", help="the whole pipeline on an embedded broker, in minutes",
                          formatter_class=_DefaultsHelp)
    demo.add_argument("--data", choices=["auto", "fmnist", "digits"], default="auto",
                      help="split Fashion-MNIST when installed (auto), or split digits")
    add_setting_flag(demo, LearnerSettings, "strategy")
    add_setting_flag(demo, LearnerSettings, "torch_threads")

    rep = sub.add_parser("replay", help="rebuild the trainer's state from the journal")
    rep.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers (host:port)")
    add_setting_flag(rep, JournalSettings, "name")
    rep.add_argument("--topic", required=True, help="the input topic the journal refers to")
    rep.add_argument("--to-seq", type=int, default=None, help="last journal entry to apply")
    rep.add_argument("--snapshot-dir", type=Path, help="start from the newest usable snapshot")

    ds = sub.add_parser("datasets", help="write the ready-made NPZ streams")
    ds.add_argument("--out", type=Path, default=Path("data"), help="directory (default ./data)")
    ds.add_argument("--seed", type=int, default=0)

    reg = sub.add_parser("registry", help="list, show, promote, roll back, diff and prune "
                         "models")
    reg.add_argument("--registry", dest="registry_location", metavar="LOCATION",
                     help="registry directory or URL (default: the config's registry setting, "
                          "else ./registry)")
    reg.add_argument("--config", type=Path, help="service settings (YAML): registry, Kafka, name")
    reg.add_argument("--bootstrap-servers", help="Kafka bootstrap servers: announce promotions "
                     "and rollbacks on <name>.models so watchers swap at once")
    reg.add_argument("--name", help="service name (default: the config's, else streamcl)")
    rsub = reg.add_subparsers(dest="registry_command", required=True, parser_class=_Parser,
                              metavar="{list,show,promote,rollback,diff,gc}")
    rsub.add_parser("list", help="every version, with its aliases; broken ones and damaged "
                    "alias files are reported (exit 0, a warning on stderr)")
    show = rsub.add_parser("show", help="a version's manifest as JSON")
    show.add_argument("version", help="7 or v7")
    promote = rsub.add_parser("promote", help="point an alias at a version")
    promote.add_argument("version", help="7 or v7")
    promote.add_argument("--alias", default="production")
    back = rsub.add_parser("rollback", help="move an alias back to its previous version")
    back.add_argument("--to", help="this version instead of the previous one")
    back.add_argument("--alias", default="production")
    diff = rsub.add_parser("diff", help="how version B differs from version A")
    diff.add_argument("a", help="7 or v7")
    diff.add_argument("b", help="7 or v7")
    diff.add_argument("--json", action="store_true", help="print one JSON object")
    gc = rsub.add_parser("gc", help="delete old versions: all but the newest N and those an "
                         "alias points at or pointed at before")
    gc.add_argument("--keep", type=int, required=True, metavar="N",
                    help="newest versions kept (1 or more)")
    gc.add_argument("--keep-history", type=int, default=None, metavar="M",
                    help="per alias, keep only the last M versions it pointed at before "
                         "(default: all of them)")
    gc.add_argument("--dry-run", action="store_true", help="only print what would be removed")

    srv = sub.add_parser("serve", help="serve the registry's model over the Open Inference "
                         "Protocol (KServe v2 REST), hot-swapping each new version",
                         formatter_class=_DefaultsHelp)
    srv.add_argument("--registry", dest="registry_location", metavar="LOCATION",
                     help="registry directory or URL (default: the config's registry setting, "
                          "else ./registry)")
    srv.add_argument("--name", help="the model's name: its URL path and the <name>.models "
                     "topic followed (default: the config's, else streamcl)")
    srv.add_argument("--alias", default="production", help="the alias whose version is served")
    srv.add_argument("--bootstrap", help="Kafka bootstrap servers: follow <name>.models "
                     "announcements (default: the settings' kafka.bootstrap_servers; without "
                     "Kafka the alias is polled)")
    srv.add_argument("--config", type=Path, help="the trainer's settings file (YAML): "
                     "registry, name, Kafka and its security settings; STREAMCL_* variables "
                     "are read with or without it")
    srv.add_argument("--host", default="0.0.0.0", help="address to listen on")
    srv.add_argument("--port", type=int, default=8000, help="HTTP port")
    srv.add_argument("--max-batch", type=int, default=64,
                     help="most samples one model call takes from queued requests")
    srv.add_argument("--max-wait-ms", type=float, default=0.0,
                     help="how long the oldest queued request may wait for a batch to fill "
                          "(0: run what has queued at once)")
    srv.add_argument("--keep-versions", type=int, default=3,
                     help="models kept loaded for requests that name a version")
    srv.add_argument("--max-body-mb", type=float, default=16.0,
                     help="largest request body accepted (413 above)")
    srv.add_argument("--poll-s", type=float, default=1.0,
                     help="without Kafka: seconds between reads of the alias")
    srv.add_argument("--threads", type=int, default=1, help="torch threads for the model")

    rpt = sub.add_parser("report", help="write an HTML report: accuracy over time, boundaries, "
                         "model versions and quality-gate decisions")
    rpt.add_argument("--config", type=Path, help="service settings (YAML): name, Kafka, registry")
    rpt.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (default: the config's)")
    rpt.add_argument("--name", help="learner name: reads <name>.journal (default: the config's)")
    rpt.add_argument("--registry", dest="registry_location", metavar="LOCATION",
                     help="registry directory or URL (default: the config's registry setting)")
    rpt.add_argument("--out", type=Path, default=Path("report"),
                     help="output directory for report.html and the PNGs (default: ./report)")
    return parser


def cmd_simulate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from streamcl.data import load_stream
    from streamcl.settings import ConsumerSettings, LearnerSettings
    from streamcl.simulate import simulate
    from streamcl.threads import configure_threads
    from streamcl.trainer import OnlineTrainer

    batch_size = settings_from_args(ConsumerSettings, args).batch_size
    train = load_stream(args.data)
    test = load_stream(args.test_data) if args.test_data else None
    if test is not None and test.input_shape != train.input_shape:
        raise UsageError(f"--test-data {args.test_data}: samples have shape {test.input_shape}, "
                         f"the training stream {train.input_shape}")
    learner = settings_from_args(LearnerSettings, args, input_shape=list(train.input_shape))
    config = learner.trainer_config()
    trainer = OnlineTrainer(config)  # configuration errors surface here, before any output
    configure_threads(learner.torch_threads, trainer.model, config.input_shape, batch_size)
    bar = None if args.json else tqdm(total=len(train), unit="samples", file=sys.stderr,
                                      desc=args.strategy, dynamic_ncols=True)
    try:
        result = simulate(train, trainer, batch_size=batch_size, test=test,
                          progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    if args.json:
        print(json.dumps(_json_safe(result)))
    else:
        print(render_table(result))
    return 0


def _json_safe(value: Any) -> Any:
    """NaN (an undefined metric) becomes null, so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _pct(v: float | None) -> str:
    return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f}%"


def render_table(r: dict[str, Any]) -> str:
    lines = [
        f"strategy            {r['strategy']}  {json.dumps(r['params'])}",
        f"samples             {r['samples']} in {r['batches']} batches, "
        f"{r['seconds']:.2f} s training, {r['samples_per_s']:,.0f} samples/s",
        f"prequential acc.    {_pct(r['prequential_accuracy'])}",
        f"experiences         {r['experiences']}",
    ]
    found = ", ".join(f"{b['index']} ({b['trigger']})" for b in r["boundaries"]) or "none"
    lines.append(f"boundaries          {found}")
    if r["true_switches"]:
        lines.append(f"true switches       {', '.join(map(str, r['true_switches']))}")
    lines.append(f"state sha256        {r['state_sha256']}")
    t = r["test"]
    if t:
        lines += [
            "",
            f"test accuracy       {_pct(t['accuracy'])} on {t['samples']} samples",
            f"average accuracy    {_pct(t['average_accuracy'])}",
            f"forgetting          {_pct(t['forgetting'])}",
            f"backward transfer   {_pct(t['backward_transfer'])}",
            "per class           " + "  ".join(f"{c}:{_pct(a).strip()}"
                                              for c, a in t["per_class"].items()),
            "",
            "accuracy matrix (row: after experience i; column: experience j's classes)",
            "      " + "".join(f"  exp{j:<3d}" for j in range(len(t["accuracy_matrix"]))),
        ]
        for i, row in enumerate(t["accuracy_matrix"]):
            lines.append(f"exp{i:<3d}" + "".join(f"  {_pct(v)}" for v in row))
    return "\n".join(lines)


def cmd_produce(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from streamcl.data import load_stream
    from streamcl.stream.broker import check_connection
    from streamcl.stream.producer import produce_stream

    if args.rate is not None and not args.rate > 0:
        raise UsageError(f"--rate {args.rate}: must be > 0 messages per second")
    stream = load_stream(args.data)
    check_connection(args.bootstrap, {})  # a wrong address fails in seconds, in one line
    with tqdm(total=len(stream), unit="msg", file=sys.stderr, desc=args.topic) as bar:
        sent = produce_stream(stream, args.bootstrap, args.topic, encoding=args.encoding,
                              rate=args.rate, progress=bar.update)
    print(f"{sent} messages sent to {args.topic}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import contextlib
    import threading

    from streamcl.service import install_sigterm, service_from_settings
    from streamcl.settings import load_settings
    from streamcl.stream.broker import EmbeddedBroker, check_connection, ensure_topics

    settings = load_settings(args.config)
    if args.replicas is not None:
        return _launch_replicas(args)
    group = _replica_group()
    stop = threading.Event()
    # SIGTERM drains: finish the batch, snapshot, commit, exit 0 (or 1 past the drain timeout)
    install_sigterm(stop, settings.snapshots.drain_timeout_s)
    with contextlib.ExitStack() as stack:
        bootstrap, client = settings.kafka.bootstrap_servers, settings.kafka.client_config()
        if bootstrap is None:  # an in-memory broker would lose the journal at every restart
            storage = settings.kafka.embedded_storage
            if storage is None:
                raise UsageError("kafka.bootstrap_servers is not set: point it at a Kafka "
                                 "cluster, or set kafka.embedded_storage to a durable store "
                                 "(s3://BUCKET/ with AWS_ENDPOINT and keys) for an embedded "
                                 "broker (`streamcl demo` runs in memory)")
            from streamcl.stream.broker import BrokerError, check_storage, redact_url

            try:
                check_storage(storage)
            except BrokerError as exc:
                raise UsageError(f"kafka.embedded_storage: {exc}") from None
            bootstrap = stack.enter_context(EmbeddedBroker(storage=storage)).bootstrap
            print(f"streamcl: embedded broker at {bootstrap} on {redact_url(storage)}",
                  file=sys.stderr, flush=True)
        else:  # one line within a deadline (TLS to a plaintext port, a wrong password, ...)
            check_connection(bootstrap, client)
        if group is not None:
            stack.callback(group.stop)
        if group is None or group.rank == 0:  # a partition per replica at least
            ensure_topics(bootstrap, [settings.consumer.topic],
                          partitions=1 if group is None else group.world_size,
                          client_config=client)
        service, server = service_from_settings(settings, bootstrap, group)
        if server is not None:
            stack.callback(server.stop)
            print(f"streamcl: metrics at {server.url}/metrics", file=sys.stderr, flush=True)
        summary = service.run(stop)
        summary["state_sha256"] = service.state_sha256()
        if group is not None:
            summary["replica"] = {"rank": group.rank, "of": group.world_size,
                                  "sha256": service.learner.sha256() if service.learner
                                  else None, "collective_s": group.collective_s}
    print(json.dumps(_json_safe(summary), default=str))
    return 0


def _replica_group() -> ReplicaGroup | None:
    """The replica group torchrun (or an orchestrator) describes in the environment:
    ``WORLD_SIZE`` > 1 with ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; else ``None``."""
    world = os.environ.get("WORLD_SIZE")
    if world is None or world == "1":
        return None
    if not world.isdigit():
        raise UsageError(f"WORLD_SIZE={world!r} is not a number of replicas: set it to the "
                         "replicas' count (torchrun sets it)")
    from streamcl.parallel import ReplicaGroup

    return ReplicaGroup.start()


def _launch_replicas(args: argparse.Namespace) -> int:
    """``streamcl run --replicas N``: the same command under ``torchrun --standalone`` with N
    processes on this host (torchrun restarts the whole group when one fails, up to
    ``--max-restarts`` times)."""
    if args.replicas < 1:
        raise UsageError(f"--replicas must be >= 1, got {args.replicas}")
    if "WORLD_SIZE" in os.environ:
        raise UsageError("--replicas inside a replica group (WORLD_SIZE is set): drop "
                         "--replicas, or unset WORLD_SIZE")
    run = ["run"] if args.config is None else ["run", "--config", str(args.config)]
    return _torchrun(args.replicas, run, max_restarts=args.max_restarts)


def _torchrun(replicas: int, command: list[str], max_restarts: int = 0) -> int:
    """Run ``streamcl COMMAND`` as ``replicas`` processes under ``torchrun --standalone``
    (one host); its exit code. SIGTERM and SIGINT are passed on to torchrun, which passes
    them to the replicas (they drain together), and this process waits for it: stopping the
    launcher must not orphan the group."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", str(replicas), "--max-restarts",
                             str(max_restarts), "-m", "streamcl", *command])
    signals = (signal.SIGTERM, signal.SIGINT)
    before = [signal.signal(s, lambda signum, _frame: proc.send_signal(signum))
              for s in signals]
    try:
        return proc.wait()
    finally:
        for s, handler in zip(signals, before, strict=True):
            signal.signal(s, handler)


def cmd_demo(args: argparse.Namespace) -> int:
    """Produce a split data set with task switches into a topic on an embedded broker, train
    on it through the real service (journal, snapshots, drift-detected boundaries), report."""
    import tempfile
    import threading
    import time
    import uuid

    import numpy as np
    import torch
    from tqdm import tqdm

    from streamcl.data import DataError, digits, fashion_mnist, split_stream
    from streamcl.models import build_model
    from streamcl.service import TrainerService, install_sigterm
    from streamcl.settings import LearnerSettings
    from streamcl.stream.broker import EmbeddedBroker
    from streamcl.stream.producer import produce_stream
    from streamcl.threads import configure_threads

    source = None
    if args.data in ("auto", "fmnist"):
        try:
            raw_train, raw_test = fashion_mnist()
            source, train = "split Fashion-MNIST", split_stream(raw_train)
        except DataError:
            if args.data == "fmnist":
                raise
    if source is None:
        raw_train, raw_test = digits()
        source, train = "split digits", split_stream(raw_train, passes=5)
    test = split_stream(raw_test, shuffle=False)
    switches = (np.flatnonzero(np.diff(train.task)) + 1).tolist()
    learner = settings_from_args(LearnerSettings, args, input_shape=list(train.input_shape),
                                 boundaries="drift")
    config = learner.trainer_config()
    # the service consumes in a child process: leave it a core
    configure_threads(learner.torch_threads,
                      build_model(config.model, config.input_shape, config.hidden),
                      config.input_shape, 32, reserve=1)
    stop = threading.Event()
    install_sigterm(stop)
    topic, name = "demo.samples", f"demo-{uuid.uuid4().hex[:8]}"
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as snapdir:
        print(f"embedded broker at {broker.bootstrap} (in memory: gone when the demo ends); "
              f"streaming {source}: {len(train)} samples, "
              f"true task switches at {switches}", file=sys.stderr)
        with tqdm(total=len(train), unit="msg", file=sys.stderr, desc="produce") as bar:
            produce_stream(train, broker.bootstrap, topic, progress=bar.update)
        service = TrainerService(config, bootstrap=broker.bootstrap, topic=topic, name=name,
                                 group_id=name, snapshot_dir=snapdir, batch_size=32,
                                 max_wait_s=0.5, snapshot_every_batches=200)
        bar = tqdm(total=len(train), unit="samples", file=sys.stderr, desc=f"train {args.strategy}")
        deadline = time.monotonic() + 600

        def done(svc: TrainerService) -> bool:
            trained = svc.trainer.position if svc.trainer is not None else 0
            bar.update(trained - bar.n)
            return trained >= len(train) or time.monotonic() > deadline

        t0 = time.perf_counter()
        summary = service.run(stop, until=done)
        seconds = time.perf_counter() - t0
        bar.close()
    trainer = service.trainer
    assert trainer is not None
    trainer.prepare_inference()
    accuracy = float((trainer.predict(torch.from_numpy(test.x)).numpy() == test.y).mean())
    found = [b.index for b in trainer.boundaries]
    print(f"data               {source}, {trainer.position} samples trained "
          f"({summary['rejected']} rejected)")
    print(f"throughput         {trainer.position / seconds:,.0f} samples/s end to end "
          f"(Kafka -> journal -> {args.strategy}), {seconds:.1f} s incl. group join")
    print(f"true switches      {switches}")
    print(f"drift boundaries   {found}  ({len(found)} found by ADWIN)")
    print(f"prequential acc.   {100 * trainer.prequential_accuracy:.1f}%")
    print(f"test accuracy      {100 * accuracy:.1f}% on {len(test)} samples, all classes")
    print(f"state sha256       {service.state_sha256()}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from streamcl.replay import replay, replicas_of
    from streamcl.stream.broker import check_connection

    check_connection(args.bootstrap, {})  # a wrong address fails in seconds, in one line
    group = _replica_group()
    if group is None:
        replicas = replicas_of(args.bootstrap, args.name, args.to_seq)
        if replicas > 1:  # each replica's shard is part of the state: replay with as many
            cmd = ["replay", "--bootstrap", args.bootstrap, "--name", args.name,
                   "--topic", args.topic]
            cmd += [] if args.to_seq is None else ["--to-seq", str(args.to_seq)]
            cmd += [] if args.snapshot_dir is None else ["--snapshot-dir", str(args.snapshot_dir)]
            return _torchrun(replicas, cmd)
    try:
        with tqdm(unit="batches", file=sys.stderr, desc="replay",
                  disable=group is not None and group.rank != 0) as bar:
            sha, batches = replay(args.bootstrap, args.name, args.topic, to_seq=args.to_seq,
                                  snapshot_dir=str(args.snapshot_dir) if args.snapshot_dir
                                  else None, progress=lambda _seq: bar.update(1), group=group)
    finally:
        if group is not None:
            group.stop()
    if group is None or group.rank == 0:
        suffix = "" if group is None else f", {group.world_size} replicas"
        print(f"{sha}  ({batches} batches replayed{suffix})", flush=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from streamcl.registry.registry import ModelRegistry
    from streamcl.report import load_report_data, write_report
    from streamcl.settings import JournalSettings, KafkaSettings, PublicationSettings, load_settings
    from streamcl.stream.journal import Journal, JournalError, journal_topic

    # without --config, the settings' defaults (the environment is read only with --config)
    settings = load_settings(args.config) if args.config else None
    kafka = settings.kafka if settings else KafkaSettings()
    bootstrap = args.bootstrap_servers or kafka.bootstrap_servers
    name = args.name or (settings.journal if settings else JournalSettings()).name
    location = args.registry_location or (settings.publication if settings
                                          else PublicationSettings()).registry
    if not bootstrap:
        raise UsageError("report: --bootstrap-servers (or kafka.bootstrap_servers in --config) "
                         "is needed to read the journal")
    client = kafka.client_config()
    try:
        with Journal(bootstrap, journal_topic(name), client, create=False) as journal:
            entries = list(journal.read())
    except JournalError as exc:
        raise UsageError(f"report: cannot read {journal_topic(name)}: {exc}") from None
    registry = ModelRegistry(location)
    path = write_report(load_report_data(entries, registry), args.out,
                        title=f"streamcl report: {name}")
    print(path)
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from streamcl.data import FMNIST_DIR, write_datasets

    written = write_datasets(args.out, seed=args.seed)
    for path in written:
        print(path)
    if not any("fmnist" in p.name for p in written):
        print(f"note: Fashion-MNIST not found in {FMNIST_DIR}; install the Debian package "
              "dataset-fashion-mnist for the split-fmnist and permuted-fmnist streams",
              file=sys.stderr)
    return 0


def _registry_version(text: str) -> int:
    from streamcl.registry import parse_version

    try:
        return parse_version(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _version_ranges(versions: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"v1..v3, v7"``: gc of a thousand versions stays one line."""
    from streamcl.registry import format_version

    runs: list[list[int]] = []
    for v in sorted(versions):
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(format_version(r[0]) if len(r) == 1 else
                     f"{format_version(r[0])}..{format_version(r[-1])}" for r in runs)


def serve_settings(args: argparse.Namespace
                   ) -> tuple[str, str, str | None, dict[str, Any]]:
    """Where ``streamcl serve`` finds the registry, the model's name and Kafka (with its
    security settings): its flags, else the trainer's settings, from ``--config`` and the
    STREAMCL_* environment as ``streamcl run`` reads them, so a container given the trainer's
    environment serves the trainer's model with no flag. The learner section, which serving
    does not use, may be left out. No Kafka configured: the alias is polled."""
    from streamcl.settings import load_settings

    settings = load_settings(args.config, learner={"input_shape": [1]})
    return (args.registry_location or settings.publication.registry,
            args.name or settings.journal.name,
            args.bootstrap or settings.kafka.bootstrap_servers,
            settings.kafka.client_config())


def cmd_serve(args: argparse.Namespace) -> int:
    """``streamcl serve``: the inference server (:mod:`streamcl.serve`) in the foreground;
    SIGTERM drains the requests in flight and exits 0."""
    import logging

    from streamcl.registry import ModelRegistry
    from streamcl.serve import InferenceServer

    for flag, value in (("--max-batch", args.max_batch), ("--keep-versions", args.keep_versions),
                        ("--threads", args.threads)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be 1 or more")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be 0 or more and at most 65535")
    for flag, value in (("--poll-s", args.poll_s), ("--max-body-mb", args.max_body_mb)):
        if not value > 0:
            raise UsageError(f"{flag} {value}: must be a positive number")
    if not args.max_wait_ms >= 0:
        raise UsageError(f"--max-wait-ms {args.max_wait_ms}: must be a positive number")
    location, name, bootstrap, client = serve_settings(args)
    server = InferenceServer(ModelRegistry(location), name, alias=args.alias,
                             bootstrap=bootstrap, client_config=client,
                             host=args.host, port=args.port, max_batch=args.max_batch,
                             max_wait_ms=args.max_wait_ms, keep_versions=args.keep_versions,
                             max_body_bytes=int(args.max_body_mb * (1 << 20)),
                             poll_s=args.poll_s, threads=args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    try:
        server.run()
    except OSError as exc:
        raise UsageError(f"--host {args.host} --port {args.port}: cannot listen there "
                         f"({exc.strerror or exc}); pick a free port") from None
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    """``streamcl registry``: the operator's view of the model registry. Promote and rollback
    move an alias and, when Kafka is known, announce it so watching services swap at once.

    The views degrade instead of failing: a broken version or a damaged alias file is a line
    in ``list`` (and a warning on stderr), not a traceback hiding everything else, because the
    operator looking is usually the one who has to repair it."""
    from datetime import UTC, datetime

    from streamcl.registry import ModelRegistry, format_version
    from streamcl.settings import JournalSettings, KafkaSettings, PublicationSettings, load_settings

    # without --config, the settings' defaults (the environment is read only with --config)
    settings = load_settings(args.config) if args.config is not None else None
    kafka = settings.kafka if settings else KafkaSettings()
    location = args.registry_location or (settings.publication if settings
                                          else PublicationSettings()).registry
    bootstrap = args.bootstrap_servers or kafka.bootstrap_servers
    name = args.name or (settings.journal if settings else JournalSettings()).name
    client = kafka.client_config()
    registry = ModelRegistry(location)
    versions = registry.versions()
    if not versions:
        raise UsageError(f"--registry {location}: no registry there (no published versions)")
    records, damaged = registry.scan_aliases()
    aliases = {alias: int(r["version"]) for alias, r in records.items()}
    command = args.registry_command

    if command == "list":
        by_version: dict[int, list[str]] = {}
        for alias, v in aliases.items():
            by_version.setdefault(v, []).append(alias)
        rows = [("version", "created (UTC)", "position", "holdout acc.", "aliases", "parent")]
        checks = registry.check()
        broken = {c.version: c.problem for c in checks if c.problem is not None}
        for c in checks:
            m = c.manifest or {}
            if c.problem is not None:  # one row saying why, the others still listed
                on = ",".join(by_version.get(c.version, []))
                rows.append((format_version(c.version), f"BROKEN: {c.problem}"
                             + (f" (aliases: {on})" if on else "")))
                continue
            created = (datetime.fromtimestamp(m["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
                       if isinstance(m.get("created_at"), int | float) else "-")
            position = f"{m['position']:,}" if isinstance(m.get("position"), int) else "-"
            metrics = m.get("metrics") if isinstance(m.get("metrics"), dict) else {}
            holdout = metrics.get("holdout_accuracy")
            parent = m.get("parent")
            rows.append((format_version(c.version), created, position,
                         _pct(holdout).strip() if isinstance(holdout, int | float) else "-",
                         ",".join(by_version.get(c.version, [])) or "-",
                         format_version(parent) if isinstance(parent, int) else "-"))
        widths = [max(len(r[i]) for r in rows if len(r) == len(rows[0]))
                  for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())
        for why in damaged.values():
            print(f"streamcl: warning: {why}", file=sys.stderr)
        for alias, v in aliases.items():
            if v not in versions:
                print(f"streamcl: warning: alias {alias!r} points at {format_version(v)}, which "
                      "is not in the registry: promote a listed version", file=sys.stderr)
            elif v in broken:
                print(f"streamcl: warning: alias {alias!r} points at broken "
                      f"{format_version(v)}: services cannot load it; promote a usable version",
                      file=sys.stderr)
        if broken:
            print(f"streamcl: warning: {len(broken)} broken version(s): "
                  f"{_version_ranges(list(broken))}", file=sys.stderr)
        return 0
    if command == "show":
        version = _registry_version(args.version)
        print(json.dumps(registry.manifest(version), indent=2, sort_keys=True))
        registry.verify(version)  # a readable manifest with bad weights: shown, then exit 2
        return 0
    if command == "gc":
        result = registry.gc(args.keep, keep_history=args.keep_history, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(result.removed)} version(s)"
              + (f": {_version_ranges(result.removed)}" if result.removed else ""))
        print(f"kept {len(result.kept)}: {_version_ranges(result.kept)}")
        for v, why in result.refused.items():
            print(f"streamcl: warning: not removed {format_version(v)}: {why}", file=sys.stderr)
        return 0
    if command == "diff":
        d = registry.diff(_registry_version(args.a), _registry_version(args.b))
        print(json.dumps(_json_safe(d), indent=2) if args.json else _render_diff(d))
        return 0

    # promote / rollback: move the alias, then announce it
    before = aliases.get(args.alias)
    if command == "promote":
        event, target = "promote", _registry_version(args.version)
        registry.promote(target, alias=args.alias)
    else:
        event = "rollback"
        skipped: list[str] = []  # printed once it worked: an error stays one line
        target = registry.rollback(args.alias, to=_registry_version(args.to) if args.to else None,
                                   on_skip=lambda v, why: skipped.append(
                                       f"skipped {format_version(v)}: {why}"))
        for line in skipped:
            print(line, file=sys.stderr)
    was = f" (was {format_version(before)})" if before is not None else ""
    if args.alias in damaged:
        was = " (its damaged alias file was rewritten; the history in it is lost)"
    print(f"{args.alias} -> {format_version(target)}{was}")
    if bootstrap is None:
        print("not announced (no --bootstrap-servers): polling watchers see it at their next "
              "poll", file=sys.stderr)
        return 0
    from kafka.errors import KafkaError

    from streamcl.registry import Announcer, announcement

    try:
        with Announcer(bootstrap, name, client, timeout_s=10.0) as announcer:
            announcer.announce(announcement(event, target, alias=args.alias,
                                            registry=registry.url))
    except (KafkaError, OSError) as exc:
        print(f"streamcl: error: {args.alias} moved to {format_version(target)}, but the "
              f"announcement on {name}.models failed ({exc}); watchers see it at "
              "their next resync", file=sys.stderr)
        return 1
    print(f"announced on {name}.models", file=sys.stderr)
    return 0


def _render_diff(d: dict[str, Any]) -> str:
    def short(v: Any) -> str:
        text = json.dumps(_json_safe(v), sort_keys=True)
        return text if len(text) <= 70 else text[:67] + "..."

    lines = [f"v{d['a']} -> v{d['b']}"]
    if d["fields"]:
        lines.append("fields")
        width = max(map(len, d["fields"]))
        lines += [f"  {k.ljust(width)}  {short(v['a'])} -> {short(v['b'])}"
                  for k, v in d["fields"].items()]
    if d["metrics"]:
        lines.append("metrics")
        width = max(map(len, d["metrics"]))
        for k, v in d["metrics"].items():
            delta = f"  ({v['delta']:+.4g})" if v["delta"] is not None else ""
            lines.append(f"  {k.ljust(width)}  {short(v['a'])}  {short(v['b'])}{delta}")
    lines.append("weights (L2 distance b - a; common rows where the head grew)")
    width = max(map(len, d["tensors"]), default=0)
    for k, v in d["tensors"].items():
        shape = (f"{v['shape_a']}" if not v["shape_changed"] else
                 f"{v['shape_a']} -> {v['shape_b']}")
        l2 = "-" if v["l2"] is None else f"{v['l2']:.6g}"
        lines.append(f"  {k.ljust(width)}  {shape}  {l2}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from streamcl.data import DataError

    try:
        args = build_parser().parse_args(argv)
        commands = {"simulate": cmd_simulate, "produce": cmd_produce, "run": cmd_run,
                    "demo": cmd_demo, "replay": cmd_replay, "datasets": cmd_datasets,
                    "registry": cmd_registry, "report": cmd_report,
                    "serve": cmd_serve}
        return commands[args.command](args)
    except (UsageError, DataError, ValueError) as exc:
        print(f"streamcl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        # a broker that cannot be reached or started is a user's setting, not a bug (looked up
        # only if loaded: importing it costs every command the Kafka client's import time)
        broker = sys.modules.get("streamcl.stream.broker")
        if broker is not None and isinstance(exc, broker.BrokerError):
            print(f"streamcl: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        from streamcl.stream.journal import JournalError, JournalFenced

        if isinstance(exc, JournalFenced):
            print(f"streamcl: stopped: {exc}", file=sys.stderr)
            return EXIT_FENCED
        if isinstance(exc, JournalError):  # the journal lost, unreadable, not a journal topic
            print(f"streamcl: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        parallel = sys.modules.get("streamcl.parallel")
        if parallel is not None and isinstance(exc, parallel.ReplicaDivergence):
            print(f"streamcl: stopped: {exc}", file=sys.stderr)
            return 1
        dist = sys.modules.get("torch.distributed")
        if dist is not None and isinstance(exc, dist.DistError):  # a peer died or hung
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"streamcl: stopped: a replica of the group failed ({first}); the whole group "
                  "must restart (torchrun --max-restarts, or the orchestrator) and recovers "
                  "from the journal", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
