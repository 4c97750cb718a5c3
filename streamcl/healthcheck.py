"""The container's HEALTHCHECK: probe the liveness endpoint of whichever command the container
runs, so one image serves ``streamcl run`` and ``streamcl serve`` with no override.

The container's first process (``/proc/1/cmdline``: the image's entrypoint and its arguments)
says which: ``serve`` answers ``/v2/health/live`` on its ``--port`` (default 8000), anything
else is the trainer, whose ``/healthz`` is on ``STREAMCL_METRICS__PORT`` (default 9100). An
HTTP error or a refused connection exits non-zero. Standard library only: it runs every 15 s
and must not import torch.

>>> target([b"/opt/venv/bin/streamcl", b"serve", b"--port", b"8080"], {})
'http://127.0.0.1:8080/v2/health/live'
>>> target([b"/opt/venv/bin/streamcl", b"run"], {"STREAMCL_METRICS__PORT": "9200"})
'http://127.0.0.1:9200/healthz'
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping, Sequence


def target(argv: Sequence[bytes], env: Mapping[str, str]) -> str:
    """The URL to probe for a container whose first process is ``argv``."""
    args = [a.decode(errors="replace") for a in argv]
    if "serve" in args:
        port = "8000"
        for i, arg in enumerate(args):
            if arg == "--port" and i + 1 < len(args):
                port = args[i + 1]
            elif arg.startswith("--port="):
                port = arg.split("=", 1)[1]
        return f"http://127.0.0.1:{port}/v2/health/live"
    return f"http://127.0.0.1:{env.get('STREAMCL_METRICS__PORT', '9100')}/healthz"


def main() -> int:
    with open("/proc/1/cmdline", "rb") as f:
        argv = [a for a in f.read().split(b"\0") if a]
    with urllib.request.urlopen(target(argv, os.environ), timeout=4):
        return 0


if __name__ == "__main__":
    sys.exit(main())
