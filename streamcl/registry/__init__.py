"""The model registry: the trainer publishes versions, inference services hot-swap them.

Layout, in a directory or any fsspec URL (``s3://bucket/registry``, ``memory://x``)::

    versions/000001/weights.safetensors   inference weights (safetensors: no pickle anywhere)
    versions/000001/manifest.json         JSON: format, version, parent, created_at, sha256,
                                          size_bytes, model (how to rebuild it), and what the
                                          publisher adds (strategy, position, metrics, ...)
    aliases/production.json               {"alias", "version", "updated_at", "history", ...}

Guarantees:

* **atomic objects** — every file is replaced or created in one step
  (:mod:`~streamcl.registry.store`), so a reader never sees half a file;
* **commit by manifest** — a version exists once its manifest does, and the manifest is written
  last and only if absent, so versions are immutable and a crashed publication is invisible;
* **verified loads** — weights are checked against the manifest's SHA-256 before use
  (:class:`CorruptVersionError`); a watcher refuses a bad version and keeps serving the old one;
* **no escaping names** — store paths are validated (no ``..``, absolute paths, backslashes);
* **publishing leaves the trainer untouched** — :func:`export_model` restores the state IL2M's
  inference preparation writes into.

Changes are announced on ``<name>.models`` (:class:`Announcer`) and followed by
:class:`ModelWatcher`, which polls the alias instead when there is no broker.

>>> import tempfile, torch
>>> from streamcl.trainer import OnlineTrainer, TrainerConfig
>>> trainer = OnlineTrainer(TrainerConfig(input_shape=(4,), hidden=(8,), strategy="naive",
...                                        boundaries="new-class"))
>>> _ = trainer.step(torch.rand(8, 4), torch.tensor([5, 9] * 4))
>>> registry = ModelRegistry(tempfile.mkdtemp())
>>> tensors, section = export_model(trainer)
>>> registry.publish(tensors, {"model": section}, aliases=["production"])["version"]
1
>>> model = registry.load_model(registry.alias("production"))
>>> model.version, model.labels, model.predict(torch.rand(3, 4)).shape
(1, [5, 9], torch.Size([3]))
>>> import shutil; shutil.rmtree(registry.url)
"""

from streamcl.registry.announce import Announcer, announcement, models_topic
from streamcl.registry.model import InferenceModel, export_model
from streamcl.registry.registry import (
    PRODUCTION,
    CorruptVersionError,
    ModelRegistry,
    RegistryError,
    UnknownVersionError,
    VersionConflictError,
    format_version,
    parse_version,
)
from streamcl.registry.store import FsspecStore, LocalStore, Store, check_path, open_store
from streamcl.registry.watcher import ModelWatcher, NoModelError

__all__ = [
    "PRODUCTION",
    "Announcer",
    "CorruptVersionError",
    "FsspecStore",
    "InferenceModel",
    "LocalStore",
    "ModelRegistry",
    "ModelWatcher",
    "NoModelError",
    "RegistryError",
    "Store",
    "UnknownVersionError",
    "VersionConflictError",
    "announcement",
    "check_path",
    "export_model",
    "format_version",
    "models_topic",
    "open_store",
    "parse_version",
]
