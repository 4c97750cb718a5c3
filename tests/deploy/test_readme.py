"""README.md agrees with the code and with CI: its generated reference sections are fresh and
its quick start's test command is the one .ci/run runs."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest

from streamcl.settings import env_name, sections

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"


def _readme_commands() -> list[str]:
    """The quick start's fenced ``sh`` blocks, in order."""
    quick = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", quick, re.S)]


def test_readme_quick_start_test_command_is_what_ci_runs() -> None:
    demo, tests = _readme_commands()
    assert demo.endswith("streamcl demo"), demo
    assert tests.endswith("-m pytest"), tests
    ci_lines = [line.strip() for line in CI.read_text().splitlines()]
    assert tests in ci_lines, f".ci/run must run the README's test command verbatim:\n{tests}"


def test_readme_reference_sections_are_up_to_date(gen_reference: ModuleType) -> None:
    current = README.read_text()
    assert current == gen_reference.splice(current), (
        "README.md's generated sections are stale: run `python docs/gen_reference.py` "
        "(a setting, CLI option, metric, strategy parameter or benchmark changed)")


def test_generator_check_mode_flags_a_stale_readme(tmp_path: Path, gen_reference: ModuleType,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "README.md"
    text = gen_reference.splice(README.read_text())  # fresh, whatever the checkout's state
    stale.write_text(text.replace("| `consumer.batch_size` |", "| `batch_size` |", 1))
    assert gen_reference.main(["--check", "--readme", str(stale)]) == 1
    assert "-| `batch_size` |" in capsys.readouterr().out  # the diff names the stale row
    assert gen_reference.main(["--readme", str(stale)]) == 0
    assert stale.read_text() == text


def test_every_setting_is_in_the_reference_with_a_description(gen_reference: ModuleType
                                                              ) -> None:
    table = gen_reference.render_config()
    for section, model in sections().items():
        assert f"**`{section}`**" in table, section  # one table per section
        for name, field in model.model_fields.items():
            assert f"| `{section}.{name}` | `{env_name(section, name)}` |" in table, name
            assert gen_reference.setting_description(name, field), (
                f"setting {section}.{name} has no description: give it "
                "Field(description=...)")
