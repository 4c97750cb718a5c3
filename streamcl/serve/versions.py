"""Which models the server holds: the version an alias names, and a few others by number.

:class:`ServedModels` wraps a :class:`~streamcl.registry.watcher.ModelWatcher`, which loads and
verifies (SHA-256) each new version of the alias on its own thread and swaps it in with one
reference assignment; a request reads :attr:`ServedModels.current` once and keeps that model
to its answer, so a swap never fails or stalls a request. A corrupt version is refused by the
watcher and the old one keeps serving.

A request may also name a version (``/v2/models/{name}/versions/{v}/infer``, for comparing a
candidate with production or pinning a client during a rollout). Such versions are loaded on
first use, verified like the alias's, and kept in a small least-recently-used set of ``keep``
models together with the versions recently served, so a client pinned to the previous version
keeps working across a swap without a load. The version being served is never evicted.

The watcher is started on a thread of its own, retried until it starts: a server whose
registry or broker is not reachable yet is alive (its HTTP side answers) and not ready, which
is what an orchestrator should see, rather than a crash loop.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from streamcl.metrics.serving import ServingMetrics
from streamcl.registry.model import InferenceModel
from streamcl.registry.registry import PRODUCTION, ModelRegistry, format_version
from streamcl.registry.watcher import ModelWatcher

log = logging.getLogger(__name__)

#: seconds between attempts to start following the registry when it cannot be reached
RETRY_S = 2.0


class VersionUnavailable(LookupError):
    """A requested version is not in the registry (``missing``) or cannot be served."""

    def __init__(self, message: str, *, missing: bool) -> None:
        super().__init__(message)
        self.missing = missing


class ServedModels:
    """The served model of ``alias`` (hot-swapped) and up to ``keep`` models by version."""

    def __init__(self, registry: ModelRegistry, *, alias: str = PRODUCTION,
                 bootstrap: str | None = None, name: str | None = None,
                 client_config: dict[str, Any] | None = None, poll_s: float = 1.0,
                 keep: int = 3, metrics: ServingMetrics | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.registry = registry
        self.alias = alias
        self.keep = keep
        self.metrics = metrics or ServingMetrics()
        self.watcher = ModelWatcher(registry, alias=alias, bootstrap=bootstrap, name=name,
                                    client_config=client_config, poll_s=poll_s,
                                    on_swap=self._swapped, on_refuse=self._refuse)
        self._loaded: OrderedDict[int, InferenceModel] = OrderedDict()
        self._lock = threading.Lock()   # guards _loaded
        self._load_lock = threading.Lock()  # one load by version number at a time
        self._swap_latencies = 0
        #: versions found unservable, and why: versions are immutable, so a refusal stands
        #: (a request pinned to one is answered from here, not by reloading it every time)
        self._refused: dict[int, str] = {}
        self._stop = threading.Event()
        self._starter: threading.Thread | None = None
        #: why the server is not ready yet (None once a version is served)
        self.waiting_for: str | None = f"no version of alias {alias!r} loaded yet"

    # -- lifetime -----------------------------------------------------------------------------
    def start(self) -> ServedModels:
        self._starter = threading.Thread(target=self._start_watcher, daemon=True,
                                         name="streamcl-serve-watcher-start")
        self._starter.start()
        return self

    def _start_watcher(self) -> None:
        while not self._stop.is_set():
            try:
                self.watcher.start()
                return
            except Exception as exc:
                self.waiting_for = f"cannot follow the registry yet: {exc}"
                log.warning("serve: %s; retrying in %.0f s", self.waiting_for, RETRY_S)
                self._stop.wait(RETRY_S)

    def stop(self) -> None:
        self._stop.set()
        if self._starter is not None:
            self._starter.join(30)
        self.watcher.stop()

    # -- models ---------------------------------------------------------------------------------
    @property
    def current(self) -> InferenceModel | None:
        """The model the alias names (read once per request: a swap replaces it whole)."""
        return self.watcher.model

    def loaded_versions(self) -> list[int]:
        with self._lock:
            return sorted(self._loaded)

    def peek(self, version: int) -> InferenceModel | None:
        """The model of ``version`` if it is loaded already (never loads)."""
        current = self.current
        if current is not None and current.version == version:
            return current
        with self._lock:
            return self._loaded.get(version)

    def get(self, version: int) -> InferenceModel:
        """The model of ``version``: kept, or loaded and verified now (call off the event loop).

        Raises :class:`VersionUnavailable`."""
        current = self.current
        if current is not None and current.version == version:
            return current
        with self._lock:
            model = self._loaded.get(version)
            if model is not None:
                self._loaded.move_to_end(version)
                return model
        with self._load_lock:
            with self._lock:  # loaded by the request that held the load lock before us
                if version in self._loaded:
                    return self._loaded[version]
            if version in self._refused:
                raise VersionUnavailable(self._refused[version], missing=False)
            if not self.registry.exists(version):
                raise VersionUnavailable(f"no {format_version(version)} in the registry "
                                         f"{self.registry.url}", missing=True)
            try:
                model = self.registry.load_model(version)
            except Exception as exc:
                raise VersionUnavailable(self._refuse(version, exc), missing=False) from None
            self._keep(model)
            return model

    def _keep(self, model: InferenceModel) -> None:
        if model.version is None:
            return
        with self._lock:
            self._loaded[model.version] = model
            self._loaded.move_to_end(model.version)
            serving = self.current.version if self.current is not None else None
            for v in list(self._loaded):
                if len(self._loaded) <= self.keep:
                    break
                if v != serving and v != model.version:
                    del self._loaded[v]

    # -- the watcher's callbacks ------------------------------------------------------------------
    def _swapped(self, model: InferenceModel) -> None:
        self._keep(model)
        self._refused.pop(int(model.version or 0), None)  # served after all: not refused
        latencies = self.watcher.swap_latency_s
        latency = latencies[-1] if len(latencies) > self._swap_latencies else None
        self._swap_latencies = len(latencies)
        created = model.manifest.get("created_at")
        self.metrics.served(int(model.version or 0),
                            float(created) if isinstance(created, int | float) else None,
                            swap_latency_s=latency)
        self.waiting_for = None

    def _refuse(self, version: int, exc: Exception) -> str:
        """Count a version that cannot be served, once whoever found it (the watcher for the
        alias, or a request naming it), and remember why unless the storage was to blame (an
        OSError: the next request tries again). Returns the reason."""
        message = f"{format_version(version)} cannot be served: {exc}"
        if version not in self._refused:
            self.metrics.refused()
        if not isinstance(exc, OSError):  # a property of the immutable version: it stands
            self._refused[version] = message
        return message
