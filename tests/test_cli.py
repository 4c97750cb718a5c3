"""``streamcl simulate`` and ``streamcl datasets`` end to end, on real NPZ files."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamcl.cli import main
from streamcl.data import FMNIST_DIR, Stream, load_stream, split_stream


@pytest.fixture(scope="module")
def npz(tmp_path_factory, digits_data) -> dict[str, Path]:
    """Two experiences of split digits (classes 0-3) as train and test NPZ files."""
    tmp = tmp_path_factory.mktemp("cli")
    train, test = digits_data
    tr = split_stream(train, passes=2, seed=1)
    te = split_stream(test, shuffle=False)
    keep_tr, keep_te = tr.y < 4, te.y < 4
    Stream(tr.x[keep_tr], tr.y[keep_tr], tr.task[keep_tr]).save(tmp / "train.npz")
    Stream(te.x[keep_te], te.y[keep_te], te.task[keep_te]).save(tmp / "test.npz")
    return {"train": tmp / "train.npz", "test": tmp / "test.npz", "dir": tmp}


def simulate_args(npz: dict[str, Path], *extra: str) -> list[str]:
    return ["simulate", "--data", str(npz["train"]), "--test-data", str(npz["test"]),
            "--hidden", "32", "--boundaries", "task", "--strategy", "er", *extra]


def run_json(npz, capsys, *extra: str) -> dict:
    assert main([*simulate_args(npz, *extra), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # --json: no progress bar
    return json.loads(out)


def test_simulate_json_has_every_measurement(npz, capsys) -> None:
    r = run_json(npz, capsys)
    for key in ("samples", "seconds", "samples_per_s", "boundaries", "prequential_accuracy",
                "state_sha256", "test"):
        assert key in r
    train = load_stream(npz["train"])
    assert r["samples"] == len(train)
    assert r["seconds"] > 0 and r["samples_per_s"] == pytest.approx(r["samples"] / r["seconds"])
    switch = int(np.flatnonzero(np.diff(train.task))[0]) + 1
    assert r["boundaries"] == [{"index": switch, "trigger": "task", "statistic": None}]
    assert 0.5 < r["prequential_accuracy"] <= 1
    assert re.fullmatch(r"[0-9a-f]{64}", r["state_sha256"])
    t = r["test"]
    for key in ("accuracy", "per_class", "accuracy_matrix", "average_accuracy", "forgetting"):
        assert key in t
    assert set(t["per_class"]) == {"0", "1", "2", "3"}
    matrix = t["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2]  # row i: experiences 0..i
    assert t["average_accuracy"] == pytest.approx((matrix[1][0] + matrix[1][1]) / 2)
    assert t["forgetting"] == pytest.approx(matrix[0][0] - matrix[1][0])
    test = load_stream(npz["test"])
    counts = {c: int((test.y == c).sum()) for c in range(4)}
    overall = sum(t["per_class"][str(c)] * counts[c] for c in range(4)) / len(test)
    assert t["accuracy"] == pytest.approx(overall)


def test_simulate_is_reproducible_and_seeded(npz, capsys) -> None:
    a = run_json(npz, capsys)["state_sha256"]
    b = run_json(npz, capsys)["state_sha256"]
    c = run_json(npz, capsys, "--seed", "1")["state_sha256"]
    assert a == b != c


def test_simulate_table_shows_the_accuracy_matrix(npz, capsys) -> None:
    r = run_json(npz, capsys)
    assert main(simulate_args(npz)) == 0
    out, _ = capsys.readouterr()
    assert "accuracy matrix" in out
    assert r["state_sha256"] in out
    rows = [line for line in out.splitlines() if re.match(r"exp\d+ ", line)]
    assert len(rows) == len(r["test"]["accuracy_matrix"]) == 2
    for line, row in zip(rows, r["test"]["accuracy_matrix"], strict=True):
        cells = re.findall(r"(\d+\.\d)%|  -  ", line)
        shown = [float(c) if c else None for c in cells]
        expected = [None if v is None else round(100 * v, 1) for v in row]
        assert shown == expected


@pytest.fixture(scope="module")
def bad_files(npz) -> dict[str, Path]:
    tmp = npz["dir"]
    rng = np.random.default_rng(0)
    x = rng.random((40, 10)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    np.savez(tmp / "no_y.npz", x=x)
    x_nan = x.copy()
    x_nan[5, 2] = np.nan
    np.savez(tmp / "nan.npz", x=x_nan, y=y)
    objects = np.empty(40, dtype=object)
    objects[:] = [{"payload": i} for i in range(40)]
    np.savez(tmp / "objects.npz", x=objects, y=y, allow_pickle=True)
    np.savez(tmp / "flat10.npz", x=x, y=y)  # 10 features: not an image
    return {"no_y": tmp / "no_y.npz", "nan": tmp / "nan.npz", "objects": tmp / "objects.npz",
            "flat10": tmp / "flat10.npz", "missing": tmp / "does-not-exist.npz"}


BAD = {
    "unknown strategy": (["--strategy", "nope"], "nope"),
    "unknown param": (["--param", "bogus=1"], "bogus"),
    "malformed param": (["--param", "mem_size"], "name=value"),
    "batch size 0": (["--batch-size", "0"], "--batch-size"),
    "unknown trigger": (["--boundaries", "sometimes"], "sometimes"),
    "unknown detector": (["--detector", "oracle", "--boundaries", "drift"], "oracle"),
    "bad hidden": (["--hidden", "0"], "--hidden"),
    "non-numeric option": (["--lr", "fast"], "--lr"),
}
BAD_FILES = {
    "missing file": ("missing", "no such file"),
    "npz without y": ("no_y", "'y'"),
    "nan in x": ("nan", "NaN"),
    "object dtype": ("objects", "pickle"),
}


def assert_one_line_error(capsys, code: int, needle: str) -> None:
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("streamcl: error: ")
    assert needle in lines[0]
    assert out == ""


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_exit_2_with_one_line(case: str, npz, capsys) -> None:
    extra, needle = BAD[case]
    assert_one_line_error(capsys, main(simulate_args(npz, *extra)), needle)


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("role", ["--data", "--test-data"])
def test_bad_files_exit_2_with_one_line(case: str, role: str, npz, bad_files, capsys,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    name, needle = BAD_FILES[case]
    path = str(bad_files[name])
    args = simulate_args(npz)
    args[args.index(role) + 1] = path
    if case == "object dtype":
        def no_unpickling(*_a, **_k):
            raise AssertionError("an object array was unpickled")

        monkeypatch.setattr(pickle, "loads", no_unpickling)
        monkeypatch.setattr(pickle, "load", no_unpickling)
    assert_one_line_error(capsys, main(args), needle)


def test_cnn_on_non_image_data_is_a_usage_error(bad_files, capsys) -> None:
    code = main(["simulate", "--data", str(bad_files["flat10"]), "--model", "cnn",
                 "--hidden", "4"])
    assert_one_line_error(capsys, code, "not images")


def test_missing_data_option_is_a_usage_error(capsys) -> None:
    assert_one_line_error(capsys, main(["simulate"]), "--data")


@pytest.mark.parametrize("param", ["mem_size=many", "mem_size=2.5"])
def test_wrongly_typed_param_value_is_a_usage_error(param: str, npz, capsys) -> None:
    code = main(simulate_args(npz, "--param", param, "--json"))
    assert_one_line_error(capsys, code, "mem_size")


def test_unknown_rar_feature_layer_is_a_usage_error(npz, capsys) -> None:
    args = simulate_args(npz, "--param", "name_ext_layer=nope", "--json")
    args[args.index("--strategy") + 1] = "rar"
    assert_one_line_error(capsys, main(args), "nope")


def test_accuracy_matrix_does_not_depend_on_the_test_files_largest_label(npz, capsys) -> None:
    test = load_stream(npz["test"])
    keep = test.y < 3  # class 3 (the training stream's largest label) has no test sample
    partial = npz["dir"] / "test-without-class-3.npz"
    Stream(test.x[keep], test.y[keep], test.task[keep]).save(partial)
    args = simulate_args(npz, "--json")
    args[args.index("--test-data") + 1] = str(partial)
    assert main(args) == 0
    t = json.loads(capsys.readouterr()[0])["test"]
    # experience 1 holds classes 2 and 3; its test samples are those of class 2
    assert t["accuracy_matrix"][1][1] == pytest.approx(t["per_class"]["2"])


def test_unknown_detector_is_refused_whatever_the_boundaries(npz, capsys) -> None:
    code = main(simulate_args(npz, "--detector", "oracle", "--json"))  # --boundaries task
    assert_one_line_error(capsys, code, "oracle")


def test_console_script_runs_simulate(npz, capsys) -> None:
    script = shutil.which("streamcl") or str(Path(sys.executable).with_name("streamcl"))
    assert Path(script).exists(), "the streamcl console script is not installed"
    proc = subprocess.run([script, *simulate_args(npz), "--json", "--threads", "1"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    # another process, the same bits
    here = run_json(npz, capsys, "--threads", "1")
    assert r["state_sha256"] == here["state_sha256"]
    assert r["test"] == here["test"]


def test_datasets_writes_the_ready_made_streams(tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "data"
    assert main(["datasets", "--out", str(out_dir)]) == 0
    out, err = capsys.readouterr()
    have_fmnist = (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists()
    names = ["split-digits", "permuted-digits"]
    names += ["split-fmnist", "permuted-fmnist"] if have_fmnist else []
    expected = {f"{n}-{part}.npz" for n in names for part in ("train", "test")}
    assert {p.name for p in out_dir.iterdir()} == expected
    assert {Path(line).name for line in out.splitlines()} == expected
    assert ("Fashion-MNIST not found" in err) == (not have_fmnist)

    split_train = load_stream(out_dir / "split-digits-train.npz")
    split_test = load_stream(out_dir / "split-digits-test.npz")
    assert len(split_train) == 5 * 1347 and len(split_test) == 450
    assert split_train.input_shape == (64,)
    assert (np.diff(split_train.task) >= 0).all() and set(split_train.task) == set(range(5))
    assert (split_train.y // 2 == split_train.task).all()
    perm_train = load_stream(out_dir / "permuted-digits-train.npz")
    perm_test = load_stream(out_dir / "permuted-digits-test.npz")
    assert len(perm_train) == 1347 and len(perm_test) == 5 * 450
    assert set(perm_train.task) == set(range(5)) and set(perm_train.y) == set(range(10))
    if have_fmnist:
        for name, n_train, n_test in (("split-fmnist", 60000, 10000),
                                      ("permuted-fmnist", 60000, 5 * 10000)):
            with np.load(out_dir / f"{name}-train.npz") as f:  # y only: x is 47 MB
                assert f["y"].shape == (n_train,)
                assert set(np.unique(f["task"])) == set(range(5))
            with np.load(out_dir / f"{name}-test.npz") as f:
                assert f["y"].shape == (n_test,)
