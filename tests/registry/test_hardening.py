"""Registry operations verify before they act, degrade instead of failing, prune, and fail
writes whole — each through the real ``streamcl registry`` command on real files.

Read-only and full storage are real: a tmpfs mounted for the test (remounted read-only, or
small and filled up), because the tests run as root, where ``chmod`` does not stop a write.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from streamcl.cli import main
from streamcl.learner import Learner
from streamcl.registry import CorruptVersionError, ModelRegistry, RegistryError
from streamcl.registry.holdout import Holdout
from streamcl.registry.publisher import Publisher, PublishPolicy
from streamcl.registry.registry import RegistryWriteError
from streamcl.stream.entries import Publish

from .conftest import small_trainer, train

PublishFn = Callable[..., dict[str, Any]]


def cli(capsys: pytest.CaptureFixture[str], registry: ModelRegistry,
        *args: str) -> tuple[int, str, str]:
    code = main(["registry", "--registry", registry.url, *args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, prefix: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def one_error_line(err: str) -> str:
    """The single ``streamcl: error: ...`` line an operator error must be."""
    return one_line(err, "streamcl: error: ")


def corrupt(registry: ModelRegistry, version: int) -> None:
    path = Path(registry.url) / f"versions/{version:06d}/weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def reg(tmp_path: Path, publish: PublishFn) -> ModelRegistry:
    """Four versions; production went v1 -> v2 -> v3 (v4 published without an alias)."""
    registry = ModelRegistry(tmp_path / "registry")
    for i in (0, 1, 2):
        publish(registry, i, aliases=["production"])
    publish(registry, 0)
    return registry


# -- verify before acting ------------------------------------------------------------------------
def test_promote_and_rollback_to_refuse_a_version_that_fails_verification(
        reg: ModelRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt(reg, 4)
    before = reg.alias_record("production")
    for args in (("promote", "v4"), ("rollback", "--to", "v4")):
        code, _, err = cli(capsys, reg, *args)
        line = one_error_line(err)
        assert code == 2 and "v4" in line and "SHA-256" in line and "still points at v3" in line
    (Path(reg.url) / "versions/000002/weights.safetensors").unlink()
    code, _, err = cli(capsys, reg, "promote", "2")
    assert code == 2 and "weights file is missing" in one_error_line(err)
    assert reg.alias_record("production") == before  # nothing moved
    # a good one still promotes
    assert cli(capsys, reg, "promote", "v1")[0] == 0 and reg.alias("production") == 1


def test_list_reports_broken_versions_and_still_lists_the_rest(
        reg: ModelRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    (Path(reg.url) / "versions/000002/manifest.json").write_text("{not json")
    corrupt(reg, 3)
    code, out, err = cli(capsys, reg, "list")
    assert code == 0  # a report, not a failure; the warning says what is wrong
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert list(rows) == ["v1", "v2", "v3", "v4"]
    assert "BROKEN: manifest is not JSON" in rows["v2"]
    assert "BROKEN: weights SHA-256" in rows["v3"] and "(aliases: production)" in rows["v3"]
    assert "BROKEN" not in rows["v1"] + rows["v4"] and "50.0%" in rows["v1"]
    assert "2 broken version(s): v2..v3" in err
    assert "alias 'production' points at broken v3" in err
    # show: a broken manifest is one error line; bad weights show the manifest, then exit 2
    code, out, err = cli(capsys, reg, "show", "v2")
    assert code == 2 and out == "" and "manifest is not JSON" in one_error_line(err)
    code, out, err = cli(capsys, reg, "show", "v3")
    assert code == 2 and json.loads(out)["version"] == 3 and "SHA-256" in one_error_line(err)
    assert cli(capsys, reg, "show", "v4")[0] == 0


def test_a_damaged_alias_file_is_reported_and_repaired_by_promote(
        reg: ModelRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    reg.promote(4, alias="canary")
    (Path(reg.url) / "aliases/production.json").write_text("\x00garbage")
    code, out, err = cli(capsys, reg, "list")
    assert code == 0 and len(out.splitlines()) == 5  # header + 4 versions
    assert "alias 'production'" in err and "damaged (not JSON)" in err
    assert "canary" in out.splitlines()[4]  # the readable alias is still shown
    code, _, err = cli(capsys, reg, "rollback")
    line = one_error_line(err)
    assert code == 2 and "production" in line and "--to" in line
    code, out, err = cli(capsys, reg, "promote", "v2")
    assert code == 0 and "damaged alias file was rewritten" in out
    assert reg.alias_record("production")["history"] == []
    # rollback --to repairs too
    (Path(reg.url) / "aliases/production.json").write_text('{"version": "seven"}')
    assert cli(capsys, reg, "rollback", "--to", "v1")[0] == 0 and reg.alias("production") == 1


def test_rollback_skips_missing_and_broken_versions(
        reg: ModelRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    reg.promote(4)  # production: v1 -> v2 -> v3 -> v4
    shutil.rmtree(Path(reg.url) / "versions/000003")
    corrupt(reg, 2)
    code, out, err = cli(capsys, reg, "rollback")
    assert code == 0 and out.startswith("production -> v1 (was v4)")
    assert "skipped v3: no version v3" in err and "skipped v2: weights SHA-256" in err
    # nothing usable left: one line naming what was skipped
    code, _, err = cli(capsys, reg, "rollback")
    line = one_error_line(err)
    assert code == 2 and "nothing to roll back to" in line
    assert "skipped v3 (missing), v2 (fails verification)" in line
    assert reg.alias("production") == 1


def test_symlinks_out_of_the_registry_are_refused(
        reg: ModelRegistry, tmp_path: Path, publish: PublishFn,
        capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "elsewhere"
    shutil.copytree(Path(reg.url) / "versions/000001", outside)
    manifest = json.loads((outside / "manifest.json").read_text())
    (outside / "manifest.json").write_text(json.dumps({**manifest, "version": 5}))
    (Path(reg.url) / "versions/000005").symlink_to(outside, target_is_directory=True)
    # a real version directory whose weights file is a link out
    vdir = Path(reg.url) / "versions/000004"
    (vdir / "weights.safetensors").unlink()
    (vdir / "weights.safetensors").symlink_to(outside / "weights.safetensors")

    code, out, err = cli(capsys, reg, "list")
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert code == 0 and "BROKEN" in rows["v5"] and "resolves outside" in rows["v5"]
    assert "BROKEN" in rows["v4"] and "resolves outside" in rows["v4"]
    for version in ("v5", "v4"):
        code, _, err = cli(capsys, reg, "promote", version)
        assert code == 2 and "resolves outside" in one_error_line(err)
    with pytest.raises(CorruptVersionError, match="outside"):
        reg.load_model(5)
    assert reg.alias("production") == 3
    # the next publication does not reuse the linked-in number, nor write through the link
    assert publish(reg, 1)["version"] == 6
    # retention unlinks a linked file (v4) but leaves a linked directory (v5) alone: what
    # they point at is not the registry's to delete
    code, out, err = cli(capsys, reg, "gc", "--keep", "1", "--keep-history", "0")
    assert code == 0 and out.splitlines()[0] == "removed 3 version(s): v1..v2, v4"
    assert "not removed v5" in one_line(err, "streamcl: warning: ")
    assert sorted(p.name for p in outside.iterdir()) == ["manifest.json", "weights.safetensors"]
    assert reg.versions() == [3, 5, 6]


# -- retention -----------------------------------------------------------------------------------
@pytest.fixture
def many(tmp_path: Path, publish: PublishFn) -> ModelRegistry:
    """Eight versions; production v2 -> v3 -> v5, canary at v1."""
    registry = ModelRegistry(tmp_path / "registry")
    for i in range(8):
        publish(registry, i % 3)
    for v in (2, 3, 5):
        registry.promote(v)
    registry.promote(1, alias="canary")
    return registry


def test_gc_keeps_the_newest_and_every_version_an_alias_pointed_at(
        many: ModelRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, many, "gc", "--keep", "2", "--dry-run")
    assert code == 0 and out.splitlines()[0] == "would remove 2 version(s): v4, v6"
    assert many.versions() == list(range(1, 9))  # a dry run removes nothing
    # kept: the newest two, production's v5 and its history v2, v3, canary's v1
    code, out, _ = cli(capsys, many, "gc", "--keep", "2")
    assert code == 0 and out.splitlines() == ["removed 2 version(s): v4, v6",
                                              "kept 6: v1..v3, v5, v7..v8"]
    assert sorted(os.listdir(Path(many.url) / "versions")) == [
        f"{v:06d}" for v in (1, 2, 3, 5, 7, 8)]
    # only the last version production pointed at before: v2 goes, v3 and canary's v1 stay
    code, out, _ = cli(capsys, many, "gc", "--keep", "1", "--keep-history", "1")
    assert code == 0 and out.splitlines()[0] == "removed 2 version(s): v2, v7"
    assert many.versions() == [1, 3, 5, 8]
    # a rollback then goes to v3 and, the next time, skips the v2 retention removed
    assert many.rollback() == 3
    with pytest.raises(RegistryError, match=r"skipped v2 \(missing\)"):
        many.rollback()


def test_gc_refuses_without_every_alias_history_and_bad_keep(
        many: ModelRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    (Path(many.url) / "aliases/canary.json").write_text("[]")
    code, _, err = cli(capsys, many, "gc", "--keep", "1")
    assert code == 2 and "retention needs every alias's history" in one_error_line(err)
    assert many.versions() == list(range(1, 9))
    many.promote(1, alias="canary")
    for keep in ("0", "-3"):
        code, _, err = cli(capsys, many, "gc", "--keep", keep)
        assert code == 2 and "keep at least" in one_error_line(err)
    code, _, err = cli(capsys, many, "gc", "--keep", "1", "--keep-history", "-1")
    assert code == 2 and "0 or more" in one_error_line(err)
    assert many.versions() == list(range(1, 9))


def test_publisher_applies_retention_after_each_publication(split_digits_once: Any,
                                                            tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    policy = PublishPolicy(every_samples=1, at_experience_end=False, tolerance=1.0,
                           keep_versions=2, keep_alias_history=1)
    publisher = Publisher(registry, policy)
    holdout = Holdout(0.5, 100, seed=0)
    x = torch.from_numpy(split_digits_once.x[-200:])
    y = torch.from_numpy(split_digits_once.y[-200:]).long()
    mask = holdout.split(len(y))
    holdout.add(x[mask], y[mask], 0, len(y))
    learner, pos = Learner(small_trainer(), holdout), 0
    verdicts = []
    for _ in range(5):  # tolerance 1: every candidate passes the gate and is published
        train(learner.trainer, split_digits_once, pos, pos + 64)
        pos += 64
        verdict = publisher.judge(learner, experience_ended=False)
        assert isinstance(verdict, Publish)
        publisher.commit(verdict, learner)
        verdicts.append(verdict)
    # newest two, plus the one production pointed at before (v4, also among the newest)
    assert registry.versions() == [4, 5] and registry.alias("production") == 5
    assert sorted(os.listdir(Path(registry.url) / "versions")) == ["000004", "000005"]
    # a recovery replaying the journal meets v1..v3 again: pruned, not lost, so not re-published
    # (a crash between journal and registry can only lose the newest publication)
    for verdict in verdicts[:3]:
        assert not publisher.republish_if_missing(verdict, learner)
    assert registry.versions() == [4, 5]


# -- writes that fail leave the previous state ---------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs(size)``: a fresh tmpfs of that size mounted under tmp_path, unmounted after."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(target)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem is full (unbuffered: nothing left to flush later)."""
    with open(path, "wb", buffering=0) as fh, pytest.raises(OSError, match="No space"):
        while True:
            fh.write(b"\0" * 4096)


def test_a_read_only_registry_refuses_writes_in_one_line_and_keeps_its_state(
        tmpfs: Callable[[str], Path], publish: PublishFn,
        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmpfs("1m")
    registry = ModelRegistry(root / "registry")
    publish(registry, 0, aliases=["production"])
    publish(registry, 1)
    publish(registry, 2)
    subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
    before = files(root)
    code, _, err = cli(capsys, registry, "promote", "v2")
    line = one_error_line(err)
    assert code == 2 and "aliases/production.json" in line and "Read-only file system" in line
    assert "mount it read-write" in line
    with pytest.raises(RegistryWriteError, match=r"publishing v4: .*versions/000004.*Read-only"):
        publish(registry, 0)
    code, _, err = cli(capsys, registry, "gc", "--keep", "1")  # v2 would go
    line = one_error_line(err)
    assert code == 2 and "removing v2" in line and "Read-only file system" in line
    assert files(root) == before
    assert cli(capsys, registry, "list")[0] == 0  # reading still works


def test_a_full_disk_leaves_no_partial_version_and_recovers_once_freed(
        tmpfs: Callable[[str], Path], publish: PublishFn,
        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmpfs("128k")
    registry = ModelRegistry(root / "registry")
    publish(registry, 0, aliases=["production"])
    filler = root / "filler"
    fill(filler)
    before = files(root / "registry")
    for _ in range(2):  # a service restarting into the same error piles nothing up
        with pytest.raises(RegistryWriteError, match=r"publishing v2: .*No space left.* free "):
            publish(registry, 1, aliases=["production"])
    assert files(root / "registry") == before
    assert sorted(os.listdir(root / "registry/versions")) == ["000001"]
    filler.unlink()
    assert publish(registry, 1, aliases=["production"])["version"] == 2
    assert registry.verify(2)["version"] == 2 and registry.alias("production") == 2


def test_write_errors_name_path_reason_and_fix_for_the_alias(
        tmpfs: Callable[[str], Path], publish: PublishFn,
        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmpfs("64k")
    registry = ModelRegistry(root / "registry")
    publish(registry, 0, aliases=["production"])
    publish(registry, 2)
    fill(root / "filler")
    alias = (root / "registry/aliases/production.json").read_bytes()
    code, _, err = cli(capsys, registry, "promote", "v2")
    line = one_error_line(err)
    assert code == 2 and "moving alias 'production' to v2" in line
    assert "aliases/production.json" in line and "No space left on device" in line
    assert "free space" in line and "nothing was changed" in line
    assert (root / "registry/aliases/production.json").read_bytes() == alias
    assert not [p for p in (root / "registry/aliases").iterdir() if p.name.startswith(".")]



def test_gc_on_every_store_kind(registry: ModelRegistry, publish: PublishFn) -> None:
    for i in range(4):
        publish(registry, i % 3, aliases=["production"] if i == 0 else ())
    assert registry.gc(1, dry_run=True).removed == [2, 3] and registry.versions() == [1, 2, 3, 4]
    result = registry.gc(1)
    assert (result.removed, result.kept, result.refused) == ([2, 3], [1, 4], {})
    assert {p.split("/")[1] for p in registry.store.list("versions")} == {"000001", "000004"}
    assert registry.verify(4)["version"] == 4 and registry.alias("production") == 1
    assert publish(registry, 1)["version"] == 5  # numbering continues past the newest kept


def test_publishing_over_a_damaged_production_alias_rewrites_it(
        reg: ModelRegistry, publish: PublishFn) -> None:
    (Path(reg.url) / "aliases/production.json").write_text("{")
    manifest = publish(reg, 1, aliases=["production"])
    assert manifest["parent"] is None and reg.alias("production") == manifest["version"] == 5
