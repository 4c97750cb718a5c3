"""Run by ``test_trainer.py`` in a fresh interpreter: resume saved trainers and finish a stream.

``python tests/resume_worker.py STREAM.npz STATE_DIR START BATCH_SIZE THREADS`` loads every
``*.safetensors`` in STATE_DIR with :func:`streamcl.state.load_state`, rebuilds the trainer with
:meth:`OnlineTrainer.from_state`, feeds it the stream's batches from sample START on, and prints
one JSON object ``{name: {"loaded": sha, "final": sha, "boundaries": [...]}}``.

Unpickling is made impossible first (``torch.load`` and ``pickle`` loads raise), so a resume
that needed pickle would fail here.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path


def _refuse(*_args, **_kwargs):
    raise AssertionError("a streamcl state must load without unpickling anything")


def main(argv: list[str]) -> None:
    import torch

    torch.load = _refuse
    pickle.load = pickle.loads = _refuse

    from streamcl.data import load_stream
    from streamcl.state import load_state, state_sha256
    from streamcl.trainer import OnlineTrainer

    data, state_dir, start, batch_size, threads = argv
    torch.set_num_threads(int(threads))
    stream = load_stream(data)
    x_all, y_all = torch.from_numpy(stream.x), torch.from_numpy(stream.y)
    out = {}
    for path in sorted(Path(state_dir).glob("*.safetensors")):
        trainer = OnlineTrainer.from_state(load_state(path))
        loaded = state_sha256(trainer.state_dict())
        for s in range(int(start), len(stream), int(batch_size)):
            e = min(s + int(batch_size), len(stream))
            trainer.step(x_all[s:e], y_all[s:e])
        out[path.stem] = {"loaded": loaded, "final": state_sha256(trainer.state_dict()),
                          "boundaries": [b.to_json() for b in trainer.boundaries]}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
