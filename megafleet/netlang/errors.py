"""Diagnostics: every problem in a description, with file:line:col, the source line
and a caret under the word that is wrong. The compiler collects all of them before
reporting, so the user fixes a file in one pass."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Loc:
    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class Sources:
    """The text of every file read, to quote lines in messages."""

    def __init__(self) -> None:
        self._lines: dict[str, list[str]] = {}

    def add(self, file: str, text: str) -> None:
        self._lines[file] = text.splitlines()

    def line(self, loc: Loc) -> str | None:
        lines = self._lines.get(loc.file)
        if lines is None or not 0 < loc.line <= len(lines):
            return None
        return lines[loc.line - 1]


@dataclass(frozen=True)
class Diagnostic:
    loc: Loc | None
    message: str

    def render(self, sources: Sources) -> str:
        if self.loc is None:
            return f"error: {self.message}"
        out = f"{self.loc}: error: {self.message}"
        line = sources.line(self.loc)
        if line is not None:
            # Tabs stay tabs so the caret lines up in a terminal.
            pad = "".join(c if c == "\t" else " " for c in line[: self.loc.col - 1])
            out += f"\n    {line}\n    {pad}^"
        return out


@dataclass
class Diagnostics:
    sources: Sources = field(default_factory=Sources)
    items: list[Diagnostic] = field(default_factory=list)

    def error(self, loc: Loc | None, message: str) -> None:
        self.items.append(Diagnostic(loc, message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def render(self) -> str:
        return "\n".join(d.render(self.sources) for d in self.items)


class CompileError(Exception):
    """Raised with every diagnostic of a description that does not compile."""

    def __init__(self, diags: Diagnostics):
        # In reading order, whatever pass found them; problems without a place last.
        diags.items.sort(key=lambda d: (d.loc is None, d.loc.file if d.loc else "",
                                        d.loc.line if d.loc else 0, d.loc.col if d.loc else 0))
        self.diagnostics = diags
        n = len(diags.items)
        super().__init__(diags.render() + f"\n{n} error{'s' if n != 1 else ''}")

    @property
    def messages(self) -> list[str]:
        return [d.message for d in self.diagnostics.items]
