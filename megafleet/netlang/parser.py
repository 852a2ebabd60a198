"""Parsing *.fleet files into statements.

lark (LALR, contextual lexer) recognises the structure only: statements of words,
one per line (or separated by ';'), with an optional `{ ... }` block of nested
statements. What the words mean is decided by the compiler against its tables of
statements and properties, which gives precise errors ("unknown property 'mme' for
vm") instead of a generic parser complaint. Includes are spliced here and `$name`
parameters substituted, so the compiler sees one flat list of statements whose
every word still knows its file, line and column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from megafleet.netlang.errors import Diagnostics, Loc

GRAMMAR = r"""
start: _NL? (stmt _NL)*
stmt: word arg* block?
block: "{" _NL? (stmt _NL)* stmt? "}"
word: ATOM
arg: ATOM | STRING

ATOM: /(?:[^\s{}"#;\\]|\\(?!\r?\n))+/
STRING: /"[^"\n]*"/
_NL: /([ \t]*(#[^\n]*)?(\r?\n|;))+/
%ignore /[ \t\f]+/
%ignore /\\\r?\n/
%ignore /#[^\n]*/
"""

_OPTIONS: dict = {"parser": "lalr", "lexer": "contextual", "maybe_placeholders": False}
_PARSER: Lark | None = None


def _parser() -> Lark:
    """The LALR parser of GRAMMAR, built once per process.

    Building it takes some 25 ms, paid by every command that reads a
    description (a twentieth of adding ten guests to a running testbed with
    `up`); from lark's cache, kept in megafleet's cache directory, it loads in
    ~2 ms."""
    global _PARSER
    if _PARSER is None:
        _PARSER = _load_or_build()
    return _PARSER


def _load_or_build() -> Lark:
    """GRAMMAR's parser through lark's own `cache`: the file holds a key of the
    grammar, the options and lark's and Python's versions; one that does not
    match or does not load is rebuilt and written again."""
    from megafleet import paths

    try:
        folder = paths.cache_dir() / "netlang"
        folder.mkdir(exist_ok=True)
    except OSError:                 # no cache directory to be had: build every time
        return Lark(GRAMMAR, **_OPTIONS)
    return Lark(GRAMMAR, **_OPTIONS, cache=str(folder / "parser.lark"))


_PARAM_RE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class Word:
    """One word of a statement, with where it was written."""

    text: str
    loc: Loc
    quoted: bool = False

    def __str__(self) -> str:
        return self.text


@dataclass
class Stmt:
    words: list[Word]
    block: list["Stmt"] | None = None
    # Set when a word could not be completed ($unknown): the statement is skipped
    # rather than reported again with a confusing second error.
    broken: bool = False

    @property
    def loc(self) -> Loc:
        return self.words[0].loc

    @property
    def keyword(self) -> str:
        return self.words[0].text


@dataclass
class Parsed:
    statements: list[Stmt] = field(default_factory=list)
    params: dict[str, tuple[str, Loc | None]] = field(default_factory=dict)


def _convert(tree: Tree, file: str) -> Stmt:
    words: list[Word] = []
    block: list[Stmt] | None = None
    for child in tree.children:
        if isinstance(child, Tree) and child.data in ("word", "arg"):
            tok = child.children[0]
            assert isinstance(tok, Token)
            loc = Loc(file, tok.line or 1, tok.column or 1)
            if tok.type == "STRING":
                words.append(Word(tok.value[1:-1], loc, quoted=True))
            else:
                words.append(Word(tok.value, loc))
        elif isinstance(child, Tree) and child.data == "block":
            block = [_convert(s, file) for s in child.children if isinstance(s, Tree)]
    return Stmt(words, block)


def _syntax_error(err: UnexpectedInput, file: str, text: str) -> tuple[Loc, str]:
    loc = Loc(file, err.line if err.line and err.line > 0 else 1, err.column if err.column and err.column > 0 else 1)
    if isinstance(err, UnexpectedCharacters):
        pos = err.pos_in_stream or 0
        ch = text[pos] if pos < len(text) else "end of file"
        return loc, f"syntax error: unexpected {ch!r}"
    if isinstance(err, UnexpectedToken):
        if err.token.type == "$END":
            return loc, "syntax error: unexpected end of file (a '{' block is not closed)"
        return loc, f"syntax error: unexpected {err.token.value!r}"
    return loc, "syntax error"


def parse_text(text: str, file: str, diags: Diagnostics) -> list[Stmt]:
    """Parse one file's text; syntax errors go to diags (lark stops at the first one
    in a file, other files are still read)."""
    diags.sources.add(file, text)
    if not text.endswith("\n"):
        text += "\n"
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as err:
        loc, message = _syntax_error(err, file, text)
        diags.error(loc, message)
        return []
    return [_convert(s, file) for s in tree.children if isinstance(s, Tree)]


def parse_file(path: str | Path, diags: Diagnostics, defines: dict[str, str] | None = None,
               text: str | None = None) -> Parsed:
    """Read `path` and everything it includes, collect `param` declarations and
    substitute `$name` everywhere. `defines` (from `-D name=value`) override the
    defaults a file declares."""
    parsed = Parsed()
    root = Path(path)
    _read(root, diags, parsed, stack=[], text=text, at=None)
    params: dict[str, str] = {}
    for stmt in parsed.statements:
        if stmt.keyword != "param":
            continue
        name, value = _param_parts(stmt, diags)
        if name is None:
            continue
        if name in parsed.params:
            first = parsed.params[name][1]
            diags.error(stmt.words[1].loc, f"duplicate parameter {name!r} (first declared at {first})")
            continue
        parsed.params[name] = (value, stmt.loc)
        params[name] = value
    for name, value in (defines or {}).items():
        if name not in params:
            diags.error(None, f"parameter {name!r} given on the command line is not declared "
                              f"by any 'param' statement")
        params[name] = value
        if name in parsed.params:
            parsed.params[name] = (value, parsed.params[name][1])
    _substitute(parsed.statements, params, diags)
    return parsed


def _param_parts(stmt: Stmt, diags: Diagnostics) -> tuple[str | None, str]:
    """`param n = 10`, `param n=10` or `param n 10`."""
    rest = [w.text for w in stmt.words[1:]]
    joined = " ".join(rest)
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*=?\s*(\S+)", joined)
    if not m:
        at = stmt.words[1].loc if len(stmt.words) > 1 else stmt.loc
        diags.error(at, "expected 'param NAME = VALUE'")
        return None, ""
    return m.group(1), m.group(2)


def _substitute(statements: list[Stmt], params: dict[str, str], diags: Diagnostics) -> None:
    for stmt in statements:
        if stmt.keyword == "param":
            continue
        for i, w in enumerate(stmt.words):
            if "$" not in w.text:
                continue

            def repl(m: re.Match, w=w, stmt=stmt) -> str:
                if m.group(1) not in params:
                    stmt.broken = True
                    diags.error(w.loc, f"unknown parameter ${m.group(1)} (declare it with "
                                       f"'param {m.group(1)} = VALUE' or give -D {m.group(1)}=VALUE)")
                    return m.group(0)
                return params[m.group(1)]

            stmt.words[i] = Word(_PARAM_RE.sub(repl, w.text), w.loc, w.quoted)
        if stmt.block:
            _substitute(stmt.block, params, diags)


def _read(path: Path, diags: Diagnostics, parsed: Parsed, stack: list[Path], text: str | None,
          at: Loc | None) -> None:
    shown = str(path)
    if text is None:
        try:
            text = path.read_text()
        except OSError as err:
            diags.error(at, f"cannot read {shown}: {err.strerror or err}")
            return
    statements = parse_text(text, shown, diags)
    stack = stack + [path.resolve()]
    for stmt in statements:
        if stmt.keyword != "include":
            parsed.statements.append(stmt)
            continue
        if len(stmt.words) != 2 or not stmt.words[1].quoted:
            diags.error(stmt.loc, 'expected include "FILE" (a quoted path)')
            continue
        target = (path.parent / stmt.words[1].text)
        if target.resolve() in stack:
            diags.error(stmt.words[1].loc, f"include cycle: {target} includes itself "
                                           f"(through {' -> '.join(p.name for p in stack)})")
            continue
        _read(target, diags, parsed, stack, None, stmt.words[1].loc)
