"""One fixture per error: tests/netlang/errors/*.fleet ends with `# expect:` lines
giving every diagnostic (line:col: message) the compiler must report, no more."""

from __future__ import annotations

from pathlib import Path

import pytest

from megafleet.netlang.compiler import compile_file
from megafleet.netlang.errors import CompileError

ERRORS = Path(__file__).parent / "errors"
FIXTURES = sorted(ERRORS.glob("*.fleet"))


def _expected(path: Path) -> list[str]:
    return [line.removeprefix("# expect: ").replace("{dir}", str(ERRORS))
            for line in path.read_text().splitlines() if line.startswith("# expect: ")]


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_error_fixture(path: Path):
    expected = _expected(path)
    assert expected, f"{path} has no '# expect:' line"
    with pytest.raises(CompileError) as info:
        compile_file(str(path))
    got = [f"{d.loc.line}:{d.loc.col}: {d.message}" if d.loc else d.message
           for d in info.value.diagnostics.items]
    assert got == expected


def test_every_error_kind_has_a_fixture():
    names = {p.stem for p in FIXTURES}
    for kind in ("syntax", "duplicate_name", "unknown_reference", "pool_exhausted", "overlapping_subnets",
                 "address_outside", "mtu_mismatch", "unreachable", "several"):
        assert kind in names


def test_rendering_shows_the_line_and_a_caret():
    with pytest.raises(CompileError) as info:
        compile_file(str(ERRORS / "duplicate_name.fleet"))
    text = str(info.value)
    assert text.splitlines()[:3] == [
        f"{ERRORS}/duplicate_name.fleet:3:6: error: duplicate name 'web3' "
        f"(first declared at {ERRORS}/duplicate_name.fleet:2:6)",
        "    host web3 on lan1",
        "         ^",
    ]
    assert text.endswith("1 error")


def test_undeclared_command_line_parameter():
    with pytest.raises(CompileError) as info:
        compile_file("x.fleet", defines={"nope": "1"}, text="switch lan1\n")
    assert info.value.messages == [
        "parameter 'nope' given on the command line is not declared by any 'param' statement"]
    assert str(info.value).startswith("error: parameter 'nope'")
