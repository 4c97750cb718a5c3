"""Run a TrainerService in its own process (for the crash and SIGTERM tests).

Prints ``RECOVERED <json>`` after recovery and ``DONE <json>`` (with ``sha256``) on exit. With
``--until N`` it stops by itself once the input offset of partition 0 reaches N; otherwise it
runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time

import torch

from streamcl.service import TrainerService, install_sigterm
from streamcl.stream.journal import JournalFenced
from streamcl.trainer import TrainerConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    for opt in ("bootstrap", "topic", "group", "name", "snapshot-dir", "config"):
        ap.add_argument(f"--{opt}", required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-wait", type=float, default=2.0)
    ap.add_argument("--snapshot-every", type=int, default=5)
    ap.add_argument("--session-timeout-ms", type=int, default=6000)
    ap.add_argument("--until", type=int, default=None)
    ap.add_argument("--pace", type=float, default=0.0, help="seconds to sleep after each step")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (results are bit-exact at one thread count only)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    stop = threading.Event()
    install_sigterm(stop)
    service = TrainerService(
        TrainerConfig.from_json(json.loads(args.config)), bootstrap=args.bootstrap,
        topic=args.topic, group_id=args.group, name=args.name, snapshot_dir=args.snapshot_dir,
        batch_size=args.batch_size, max_wait_s=args.max_wait,
        snapshot_every_batches=args.snapshot_every, session_timeout_ms=args.session_timeout_ms)
    original = service.recover

    def recover() -> dict:
        summary = original()
        print("RECOVERED", json.dumps(summary), flush=True)
        return summary

    service.recover = recover  # type: ignore[method-assign]
    if args.pace > 0:  # a slower learner, so that kills land in the middle of the stream
        step = service.step_once

        def step_once() -> bool:
            done = step()
            time.sleep(args.pace)
            return done

        service.step_once = step_once  # type: ignore[method-assign]
    until = None if args.until is None else (lambda s: s.offsets.get(0, 0) >= args.until)
    try:
        summary = service.run(stop, until=until)
    except JournalFenced as exc:  # as `streamcl run` does: one line, its own exit code
        print(f"streamcl: stopped: {exc}", file=sys.stderr, flush=True)
        return 3
    print("DONE", json.dumps({**summary, "sha256": service.state_sha256(),
                              "position": service.trainer.position}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
