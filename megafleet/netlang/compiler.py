"""From statements to a compiled `Net`: expansion, addressing, validation, graph.

Passes, each over the whole description so every error is found in one run:

1. declarations: images, pools, switches, node groups (names expanded, duplicates
   found), links and assertions remembered;
2. wiring: switch-to-switch links merge layer-2 domains, attachments (`on`, `iface`,
   `link`) become interfaces on domains;
3. addressing: explicit subnets and addresses, overlap checks, pool allocation,
   automatic addresses (routers first, so gateways get the low addresses);
4. routing and validation: static routes, MTU, `reachable` assertions;
5. the networkx graph.
"""

from __future__ import annotations

import bisect
import fnmatch
import gc
import re
import shlex
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, Callable

from megafleet.names import NAME_RE
from megafleet.netlang import ipam, limits, ospftimers, values
from megafleet.netlang.errors import CompileError, Diagnostics, Loc
from megafleet.netlang.model import (Domain, Iface, LinkProps, Net, NodeGroup, Switch,
                                     SwitchLink)
from megafleet.netlang.parser import Stmt, Word, parse_file

NODE_KINDS = ("vm", "host", "router")
_DECL_RE = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*?)\[(\d+)\.\.(\d+)\]([A-Za-z0-9_.-]*)")
_GLOB_CHARS = set("*?")

# Which properties each kind of node accepts (a group's defaults apply where they fit).
NODE_PROPS = {
    "vm": {"image", "mem", "vcpus", "driver", "on", "iface", "route"},
    "host": {"on", "iface", "route", "exec"},
    "router": {"image", "mem", "vcpus", "driver", "on", "iface", "route", "ospf", "bgp", "exec"},
}
LINK_PROPS = {"rate", "delay", "jitter", "loss", "mtu"}
# props dict key -> the property word that sets it
_PROP_OF_KEY = {"image": "image", "mem_mib": "mem", "vcpus": "vcpus", "driver": "driver",
                "ospf": "ospf", "bgp": "bgp", "routes_static": "route", "exec": "exec"}


# ---------------------------------------------------------------------------
# Reading words
# ---------------------------------------------------------------------------

class Cursor:
    def __init__(self, words: list[Word], start: int = 0):
        self.words = words
        self.i = start

    def more(self) -> bool:
        return self.i < len(self.words)

    def peek(self) -> Word:
        """The next word; only after `more()` said there is one."""
        return self.words[self.i]

    def take(self) -> Word:
        w = self.words[self.i]
        self.i += 1
        return w

    def value(self, after: Word, what: str) -> Word:
        if not self.more():
            raise PropError(after.loc, f"missing {what} after {after.text!r}")
        return self.take()


class PropError(Exception):
    def __init__(self, loc: Loc, message: str):
        self.loc = loc
        self.message = message


def _value(word: Word, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(word.text)
    except ValueError as err:
        raise PropError(word.loc, str(err)) from None


def _link_prop(key: Word, cur: Cursor, props: LinkProps) -> None:
    k = key.text
    w = cur.value(key, f"a value for {k}")
    if k == "rate":
        props.rate_bit = _value(w, values.rate_bit)
    elif k == "delay":
        props.delay_us = _value(w, values.duration_us)
    elif k == "jitter":
        props.jitter_us = _value(w, values.duration_us)
    elif k == "loss":
        props.loss_pct = _value(w, values.percent)
    elif k == "mtu":
        props.mtu = _value(w, lambda t: values.integer(t, 68, 65535, "mtu"))


@dataclass
class Attach:
    """`on REF [ADDR|auto|none]... [vlan N] [link properties]` before resolution."""

    ref: Word
    addrs: list[Word] = field(default_factory=list)
    vlan: int | None = None
    props: LinkProps = field(default_factory=LinkProps)


def _attach(key: Word, cur: Cursor) -> Attach:
    att = Attach(cur.value(key, "a switch"))
    while cur.more():
        w = cur.peek()
        if w.text in ("auto", "none") or ipam.looks_like_address(w.text):
            att.addrs.append(cur.take())
        elif w.text == "vlan":
            cur.take()
            att.vlan = _value(cur.value(w, "a VLAN id"), lambda t: values.integer(t, 1, 4094, "VLAN id"))
        elif w.text in LINK_PROPS:
            _link_prop(cur.take(), cur, att.props)
        else:
            break
    return att


OSPF_WORDS = ("area", "cost", "hello", "dead", "spf", "lsa", "daemon")
OSPF_DAEMONS = ("frr", "bird", "auto")


def _seconds(text: str, what: str) -> int:
    """Whole seconds: `10` or `10s`."""
    return values.integer(text[:-1] if text.endswith("s") and not text.endswith("ms") else text,
                          1, ospftimers.HELLO_MAX_S, what + " (seconds)")


def _ms(text: str, hi: int, what: str) -> int:
    us = values.duration_us(text)
    if us % 1000 or us > hi * 1000:
        raise ValueError(f"invalid {what} {text!r} (whole milliseconds from 0 to {hi}ms)")
    return us // 1000


def _ospf_option(sub: Word, w: Word, cur: Cursor, ospf: dict) -> None:
    """`hello S`, `dead S`, `spf DELAY HOLD MAX`, `lsa T`, `daemon frr|bird|auto`
    after `ospf` (see ospftimers and the language reference)."""
    k = sub.text
    if k in ("hello", "dead"):
        ospf[k] = _value(w, lambda t: _seconds(t, f"OSPF {k} interval"))
    elif k == "spf":
        words = [w, cur.value(w, "the SPF hold time (spf DELAY HOLD MAX)")]
        words.append(cur.value(words[1], "the SPF maximum hold time (spf DELAY HOLD MAX)"))
        ospf["spf"] = tuple(_value(x, lambda t: _ms(t, ospftimers.SPF_MAX_MS, "OSPF spf time"))
                            for x in words)
    elif k == "lsa":
        ospf["lsa"] = _value(w, lambda t: _ms(t, ospftimers.LSA_MAX_MS, "OSPF lsa interval"))
    elif w.text not in OSPF_DAEMONS:
        raise PropError(w.loc, f"unknown OSPF daemon {w.text!r} (use {', '.join(OSPF_DAEMONS)})")
    elif w.text != "auto":
        ospf["daemon"] = w.text


def _exec_argv(key: Word, cur: Cursor) -> tuple[tuple[str, ...], Loc]:
    """`exec "CMD"`: the command line split into argv as a POSIX shell would split
    words (shlex), never run by a shell. Returns (argv, where it is written)."""
    w = cur.value(key, 'a quoted command line (exec "CMD")')
    if not w.quoted:
        raise PropError(w.loc, f'expected a quoted command line after exec (exec "CMD"), got {w.text!r}')
    try:
        argv = tuple(shlex.split(w.text))
    except ValueError as err:
        raise PropError(w.loc, f"invalid command line {w.text!r}: {err} (it is split like a shell's "
                               f"words: quote with ' inside the \"...\")") from None
    if not argv:
        raise PropError(w.loc, "empty command line after exec")
    return argv, key.loc


def _node_prop(kind: str, key: Word, cur: Cursor, props: dict[str, Any], attaches: list[Attach]) -> None:
    k = key.text
    if k == "exec" and kind == "vm":
        raise PropError(key.loc, "exec is for hosts and routers (a command run in the node's network "
                                 "namespace); a vm runs its image's own services")
    if k not in NODE_PROPS[kind]:
        known = ", ".join(sorted(NODE_PROPS[kind]))
        raise PropError(key.loc, f"unknown property {k!r} for {kind} (known: {known})")
    if k in ("on", "iface"):
        attaches.append(_attach(key, cur))
    elif k == "image":
        props["image"] = (cur.value(key, "an image name").text, key.loc)
    elif k == "mem":
        props["mem_mib"] = _value(cur.value(key, "a size"), values.mem_mib)
    elif k == "vcpus":
        props["vcpus"] = _value(cur.value(key, "a number"), lambda t: values.integer(t, 1, 1024, "vcpus"))
    elif k == "driver":
        w = cur.value(key, "a driver")
        from megafleet.vm.driver import DRIVER_NAMES  # the vm engine's registry (imports trio: late)
        if w.text not in DRIVER_NAMES:
            raise PropError(w.loc, f"unknown driver {w.text!r} (use {', '.join(DRIVER_NAMES)})")
        props["driver"] = w.text
    elif k == "ospf":
        ospf = {"area": "0"}
        while cur.more() and cur.peek().text in OSPF_WORDS:
            sub = cur.take()
            w = cur.value(sub, f"a value for ospf {sub.text}")
            if sub.text == "area":
                if not (w.text.isdigit() or ipam.parse_addr(w.text) is not None):
                    raise PropError(w.loc, f"invalid OSPF area {w.text!r} (a number or A.B.C.D)")
                ospf["area"] = w.text
            elif sub.text == "cost":
                ospf["cost"] = _value(w, lambda t: values.integer(t, 1, 65535, "OSPF cost"))
            else:
                _ospf_option(sub, w, cur, ospf)
        why = ospftimers.check(ospf)
        if why is not None:
            raise PropError(key.loc, why)
        props["ospf"] = ospf
    elif k == "bgp":
        w = cur.value(key, "an AS number")
        if w.text == "as":
            w = cur.value(w, "an AS number")
        props["bgp"] = {"as": _value(w, lambda t: values.integer(t, 1, 4294967295, "AS number"))}
    elif k == "route":
        dest = cur.value(key, "a destination subnet")
        route = ipam.parse_subnet(dest.text) if dest.text != "default" else ipam.Subnet(4, 0, 0)
        if isinstance(route, str):
            raise PropError(dest.loc, route)
        via_kw = cur.value(dest, "'via ADDRESS'")
        if via_kw.text != "via":
            raise PropError(via_kw.loc, f"expected 'via ADDRESS', got {via_kw.text!r}")
        via = cur.value(via_kw, "an address")
        parsed = ipam.parse_addr(via.text)
        if parsed is None or parsed[2] is not None or parsed[0] != route.family:
            raise PropError(via.loc, f"invalid gateway {via.text!r} for route {dest.text} "
                                     f"(an IPv{route.family} address without prefix length)")
        props.setdefault("routes_static", []).append((route, via.text))
    elif k == "exec":
        props.setdefault("exec", []).append(_exec_argv(key, cur))


# ---------------------------------------------------------------------------
# The compiler
# ---------------------------------------------------------------------------

@dataclass
class _PendingNode:
    group: NodeGroup
    attaches: list[Attach]


@dataclass
class _PendingLink:
    loc: Loc
    a: Word
    a_addrs: list[Word]
    b: Word
    b_addrs: list[Word]
    props: LinkProps
    vlans: list[int]
    subnet: list[tuple[str, Any, Loc]]
    # `NODE:IFNAME` endpoints: the interface's name inside that node (None: ethN).
    a_ifname: Word | None = None
    b_ifname: Word | None = None


# A Linux interface name: at most 15 bytes, no '/', ':' or white space.
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def _endpoint(word: Word) -> tuple[Word, Word | None]:
    """`r1:eth3` -> (r1, eth3); `r1` -> (r1, None). Node names never hold ':'."""
    if ":" not in word.text:
        return word, None
    node, _, name = word.text.partition(":")
    ifw = Word(name, Loc(word.loc.file, word.loc.line, word.loc.col + len(node) + 1))
    if not _IFNAME_RE.fullmatch(name) or name in (".", ".."):
        raise PropError(ifw.loc, f"invalid interface name {name!r} in {word.text!r}: at most 15 "
                                 f"letters, digits, '_', '-' or '.'")
    return Word(node, word.loc), ifw


class Compiler:
    def __init__(self, diags: Diagnostics):
        self.d = diags
        self.net = Net(files=[])
        self.pending_nodes: list[_PendingNode] = []
        self.pending_links: list[_PendingLink] = []
        self.reachable_raw: list[tuple[Word, Word, Loc]] = []
        self.faults_raw: list = []           # netlang.faults.Fault, checked after wiring
        self.reachable_resolved: list[tuple[Word, Word, Loc, list[str], list[str]]] = []
        self.groups_by_name: dict[str, list[int]] = {}
        self.group_loc: dict[str, Loc] = {}
        self.first_loc: dict[str, Loc] = {}    # node name -> group loc (for duplicates)
        self._node_names: list[str] | None = None
        self.declared = 0                      # names declared so far (limits.max_names)
        # layer-2 union-find over (switch, vlan)
        self.parent: dict[tuple[str, int | None], tuple[str, int | None]] = {}
        self.domain_by_root: dict[tuple[str, int | None], Domain] = {}
        self.link_subnets: dict[int, list[tuple[str, Any, Loc]]] = {}

    def err(self, loc: Loc | None, message: str) -> None:
        self.d.error(loc, message)

    # -- pass 1: declarations -------------------------------------------------
    def declare(self, statements: list[Stmt]) -> None:
        for stmt in statements:
            if stmt.broken:
                continue
            try:
                self._statement(stmt, None)
            except PropError as e:
                self.err(e.loc, e.message)

    def _statement(self, stmt: Stmt, group: tuple[str, dict, list[Attach]] | None) -> None:
        k = stmt.keyword
        if group is not None and k not in NODE_KINDS:
            raise PropError(stmt.loc, f"only vm, host and router statements belong in a group, not {k!r}")
        if k == "param":
            return
        if k in NODE_KINDS:
            self._node(stmt, group)
        elif k == "switch":
            self._switch(stmt)
        elif k == "image":
            self._image(stmt)
        elif k == "pool":
            self._pool(stmt)
        elif k == "group":
            self._group(stmt)
        elif k == "link":
            self._link(stmt)
        elif k == "reachable":
            if len(stmt.words) != 3:
                raise PropError(stmt.loc, "expected 'reachable A B' (two names or patterns)")
            self.reachable_raw.append((stmt.words[1], stmt.words[2], stmt.loc))
        elif k in ("at", "every"):
            from megafleet.netlang import faults
            try:
                self.faults_raw.append(faults.parse(stmt.words, stmt.loc))
            except faults.FaultError as exc:
                raise PropError(exc.loc, exc.message) from None
        else:
            raise PropError(stmt.loc, f"unknown statement {k!r} (expected vm, host, router, switch, "
                                      f"link, pool, image, group, include, param, reachable, at or every)")
        if stmt.block is not None and k not in NODE_KINDS and k != "group":
            raise PropError(stmt.loc, f"a {k} statement takes no {{ }} block")

    def _names(self, word: Word, what: str) -> list[str] | None:
        """Expand a declared name: `web`, `web[1..1000]`, `r[01..10]x`."""
        m = _DECL_RE.fullmatch(word.text)
        if m is None:
            if not NAME_RE.fullmatch(word.text) or ".." in word.text:
                self.err(word.loc, f"invalid {what} name {word.text!r}: use a letter first, then "
                                   f"letters, digits, '_', '-' or '.' (at most 63), or NAME[1..N]")
                return None
            return [word.text]
        base, lo_t, hi_t, suffix = m.groups()
        lo, hi = int(lo_t), int(hi_t)
        if lo > hi:
            self.err(word.loc, f"invalid range [{lo_t}..{hi_t}]: the first number is larger than the last")
            return None
        # Bounded before anything is built: `-D n=99999999999` must be an error,
        # not a MemoryError after gigabytes (limits.max_names, settable).
        count = hi - lo + 1
        try:
            limit = limits.max_names()
        except ValueError as exc:
            self.err(word.loc, str(exc))
            return None
        if what != "reference":
            self.declared += count
        if count > limit or self.declared > limit:
            self.err(word.loc, f"too many names: {word.text} declares {count:,}"
                               + (f" ({self.declared:,} in all)" if self.declared > count else "")
                               + f", over the limit of {limit:,} names per description "
                                 f"(set {limits.MAX_NAMES_ENV} to raise it)")
            self.declared = min(self.declared, limit)
            return None
        width = len(lo_t) if lo_t.startswith("0") and len(lo_t) > 1 else 0
        last = f"{base}{hi:0{width}d}{suffix}"
        if len(last) > 63:
            self.err(word.loc, f"invalid {what} name {last!r}: longer than 63 characters")
            return None
        if width:
            return [f"{base}{i:0{width}d}{suffix}" for i in range(lo, hi + 1)]
        if suffix:
            return [f"{base}{i}{suffix}" for i in range(lo, hi + 1)]
        return [base + s for s in map(str, range(lo, hi + 1))]

    def _node(self, stmt: Stmt, group: tuple[str, dict, list[Attach]] | None) -> None:
        kind = stmt.keyword
        if len(stmt.words) < 2:
            raise PropError(stmt.loc, f"expected a name after {kind!r}")
        names = self._names(stmt.words[1], kind)
        props: dict[str, Any] = {}
        attaches: list[Attach] = []
        if group is not None:
            gname, gprops, gatt = group
            # Copies: a member's own `route` must not land in its siblings' lists.
            props.update({k: (list(v) if isinstance(v, list) else v) for k, v in gprops.items()
                          if _PROP_OF_KEY[k] in NODE_PROPS[kind]})
            attaches.extend(gatt)
        self._props(kind, Cursor(stmt.words, 2), props, attaches)
        for sub in stmt.block or []:
            if sub.keyword in NODE_KINDS or sub.keyword == "switch":
                self.err(sub.loc, f"a {sub.keyword} cannot be declared inside a {kind}")
                continue
            self._props(kind, Cursor(sub.words, 0), props, attaches)
        if kind == "vm" and "image" not in props:
            self.err(stmt.words[1].loc, f"vm {stmt.words[1].text} needs an image ('image NAME')")
        if kind == "router" and "image" in props and props.get("exec"):
            # A VM router has no namespace on the host to run the command in.
            self.err(props["exec"][0][1], f"router {stmt.words[1].text}: exec runs a command in a namespace "
                                          f"router; this one has an image (a VM router)")
        if props.get("ospf", {}).get("daemon") == "bird" and ("image" in props or "bgp" in props):
            # BIRD runs OSPF only, in namespace routers; VM routers run their image's FRR.
            self.err(stmt.words[1].loc, f"router {stmt.words[1].text}: 'ospf daemon bird' is for namespace "
                                        f"routers without bgp (this one has "
                                        f"{'an image' if 'image' in props else 'bgp'}); use daemon frr")
        if names is None:
            return
        g = NodeGroup(kind, names, stmt.words[1].loc, props, group=group[0] if group else None)
        gi = len(self.net.groups)
        self.net.groups.append(g)
        self._register(g, gi)
        if group is not None:
            self.groups_by_name.setdefault(group[0], []).append(gi)
        self.pending_nodes.append(_PendingNode(g, attaches))

    def _props(self, kind: str, cur: Cursor, props: dict, attaches: list[Attach]) -> None:
        while cur.more():
            try:
                _node_prop(kind, cur.take(), cur, props, attaches)
            except PropError as e:
                self.err(e.loc, e.message)
                return

    def _register(self, g: NodeGroup, gi: int) -> None:
        index, switches = self.net.index, self.net.switches
        # One C-level pass over the names when all is well; per-name work only to
        # report duplicates.
        if not index.keys().isdisjoint(g.names):
            for n in g.names:
                if n in index:
                    first = self.net.groups[index[n][0]].loc
                    self.err(g.loc, f"duplicate name {n!r} (first declared at {first})")
                    break
            keep = {n: index[n] for n in g.names if n in index}
        else:
            keep = {}
        index.update(zip(g.names, zip(repeat(gi), range(len(g.names)))))
        index.update(keep)
        if switches and not switches.keys().isdisjoint(g.names):
            n = next(n for n in g.names if n in switches)
            self.err(g.loc, f"duplicate name {n!r} (first declared as a switch at {switches[n].loc})")

    def _switch(self, stmt: Stmt) -> None:
        if len(stmt.words) < 2:
            raise PropError(stmt.loc, "expected a name after 'switch'")
        names = self._names(stmt.words[1], "switch")
        sw = Switch("", stmt.words[1].loc)
        cur = Cursor(stmt.words, 2)
        while cur.more():
            key = cur.take()
            if key.text == "vde":
                sw.vde = True
            elif key.text == "mtu":
                sw.mtu = _value(cur.value(key, "a value for mtu"), lambda t: values.integer(t, 68, 65535, "mtu"))
            elif key.text == "subnet":
                sw.subnet_spec.append(self._subnet_word(cur.value(key, "a subnet, a pool name, auto or none")))
            else:
                raise PropError(key.loc, f"unknown property {key.text!r} for switch (known: mtu, subnet, vde)")
        for n in names or []:
            if n in self.net.switches:
                self.err(stmt.words[1].loc, f"duplicate name {n!r} (first declared at {self.net.switches[n].loc})")
                continue
            if n in self.net.index:
                first = self.net.groups[self.net.index[n][0]].loc
                self.err(stmt.words[1].loc, f"duplicate name {n!r} (first declared at {first})")
                continue
            self.net.switches[n] = Switch(n, sw.loc, sw.mtu, sw.vde, sw.subnet_spec)

    def _subnet_word(self, w: Word) -> tuple[str, Any, Loc]:
        if w.text in ("auto", "none"):
            return (w.text, None, w.loc)
        if "/" in w.text:
            sub = ipam.parse_subnet(w.text)
            if isinstance(sub, str):
                raise PropError(w.loc, sub)
            return ("cidr", sub, w.loc)
        return ("pool", w.text, w.loc)

    def _image(self, stmt: Stmt) -> None:
        words = [w for w in stmt.words[1:] if not (w.text == "from" and not w.quoted)]
        if len(words) != 2 or not words[1].quoted:
            raise PropError(stmt.loc, 'expected image NAME from "PATH"')
        name = words[0].text
        if not NAME_RE.fullmatch(name):
            raise PropError(words[0].loc, f"invalid image name {name!r}")
        if name in self.net.images:
            raise PropError(words[0].loc, f"duplicate image {name!r} (first declared at {self.net.images[name][1]})")
        path = Path(stmt.loc.file).parent / words[1].text
        self.net.images[name] = (str(path), words[0].loc)

    def _pool(self, stmt: Stmt) -> None:
        w = stmt.words
        if len(w) not in (3, 5) or (len(w) == 5 and w[3].text != "per"):
            raise PropError(stmt.loc, "expected 'pool NAME CIDR [per /LEN]'")
        name = w[1].text
        if not NAME_RE.fullmatch(name):
            raise PropError(w[1].loc, f"invalid pool name {name!r}")
        if name in self.net.pools:
            raise PropError(w[1].loc, f"duplicate pool {name!r} (first declared at {self.net.pools[name].loc})")
        sub = ipam.parse_subnet(w[2].text)
        if isinstance(sub, str):
            raise PropError(w[2].loc, sub)
        per = 24 if sub.family == 4 else 64
        if len(w) == 5:
            per = _value(w[4], lambda t: values.integer(t.lstrip("/"), sub.plen, ipam.BITS[sub.family],
                                                         f"subnet length for pool {name}"))
        for other in self.net.pools.values():
            if other.subnet.family == sub.family and other.subnet.net <= sub.last and sub.net <= other.subnet.last:
                raise PropError(w[2].loc, f"overlapping subnets: pool {name} ({sub}) overlaps pool "
                                          f"{other.name} ({other.subnet}) declared at {other.loc}")
        self.net.pools[name] = ipam.Pool(name, sub, per, w[1].loc)

    def _group(self, stmt: Stmt) -> None:
        if len(stmt.words) < 2 or stmt.block is None:
            raise PropError(stmt.loc, "expected 'group NAME [defaults] { vm/host/router statements }'")
        name = stmt.words[1].text
        if not NAME_RE.fullmatch(name):
            raise PropError(stmt.words[1].loc, f"invalid group name {name!r}")
        if name in self.group_loc:
            raise PropError(stmt.words[1].loc, f"duplicate group {name!r} (first declared at {self.group_loc[name]})")
        self.group_loc[name] = stmt.words[1].loc
        props: dict[str, Any] = {}
        attaches: list[Attach] = []
        # Defaults may be anything a vm or router accepts; each member takes what fits.
        self._group_props(Cursor(stmt.words, 2), props, attaches)
        for sub in stmt.block:
            try:
                self._statement(sub, (name, props, attaches))
            except PropError as e:
                self.err(e.loc, e.message)

    def _group_props(self, cur: Cursor, props: dict, attaches: list[Attach]) -> None:
        allowed = NODE_PROPS["vm"] | NODE_PROPS["router"]
        while cur.more():
            key = cur.take()
            try:
                if key.text not in allowed:
                    raise PropError(key.loc, f"unknown property {key.text!r} for group "
                                             f"(known: {', '.join(sorted(allowed))})")
                _node_prop("vm" if key.text in NODE_PROPS["vm"] else "router", key, cur, props, attaches)
            except PropError as e:
                self.err(e.loc, e.message)
                return

    def _link(self, stmt: Stmt) -> None:
        words = stmt.words
        try:
            dash = next(i for i, w in enumerate(words) if w.text == "--")
        except StopIteration:
            raise PropError(stmt.loc, "expected 'link A -- B [properties]'") from None
        if dash < 2 or dash + 1 >= len(words):
            raise PropError(stmt.loc, "expected 'link A -- B [properties]'")
        (a, a_if), a_addrs = _endpoint(words[1]), words[2:dash]
        for w in a_addrs:
            if not ipam.looks_like_address(w.text):
                raise PropError(w.loc, f"expected an address or '--' after {a.text!r}, got {w.text!r}")
        cur = Cursor(words, dash + 1)
        b, b_if = _endpoint(cur.take())
        b_addrs = []
        while cur.more() and ipam.looks_like_address(cur.peek().text):
            b_addrs.append(cur.take())
        props, vlans, subnet = LinkProps(), [], []
        while cur.more():
            key = cur.take()
            if key.text in LINK_PROPS:
                _link_prop(key, cur, props)
            elif key.text == "vlan":
                w = cur.value(key, "VLAN ids")
                vlans = [_value(Word(t, w.loc), lambda t: values.integer(t, limits.VLAN_MIN, limits.VLAN_MAX,
                                                                         "VLAN id"))
                         for t in w.text.split(",")]
                twice = sorted({v for v in vlans if vlans.count(v) > 1})
                if twice:
                    raise PropError(w.loc, f"VLAN {twice[0]} is listed twice in {w.text!r}")
            elif key.text == "subnet":
                subnet.append(self._subnet_word(cur.value(key, "a subnet, a pool name, auto or none")))
            else:
                raise PropError(key.loc, f"unknown property {key.text!r} for link "
                                         f"(known: {', '.join(sorted(LINK_PROPS | {'vlan', 'subnet'}))})")
        self.pending_links.append(_PendingLink(stmt.loc, a, a_addrs, b, b_addrs, props, vlans, subnet,
                                               a_if, b_if))

    # -- references -------------------------------------------------------------
    def node_names(self) -> list[str]:
        if self._node_names is None:
            self._node_names = list(self.net.index)
        return self._node_names

    def resolve(self, word: Word, want: str) -> list[str]:
        """Names matching a reference: a name, NAME[a..b], a glob (`lan*`) or @group.
        `want` is 'switch', 'node' or 'any'. Errors are reported here."""
        text = word.text
        sw, idx = self.net.switches, self.net.index
        m = _DECL_RE.fullmatch(text)
        if text.startswith("@"):
            gis = self.groups_by_name.get(text[1:])
            if gis is None:
                self.err(word.loc, f"unknown group {text[1:]!r}")
                return []
            names = [n for gi in gis for n in self.net.groups[gi].names]
        elif m is not None:
            names = self._names(word, "reference") or []
            missing = [n for n in names if n not in sw and n not in idx]
            if missing:
                self.err(word.loc, f"unknown reference {missing[0]!r} in {text!r}"
                                   + (f" ({len(missing)} names missing)" if len(missing) > 1 else ""))
                return []
        elif _GLOB_CHARS & set(text):
            pool = (list(sw) if want in ("switch", "any") else []) + \
                   (self.node_names() if want in ("node", "any") else [])
            if text.endswith("*") and not (_GLOB_CHARS & set(text[:-1])):
                prefix = text[:-1]
                names = [n for n in pool if n.startswith(prefix)]
            else:
                names = fnmatch.filter(pool, text)
            if not names:
                self.err(word.loc, f"pattern {text!r} matches no {'node' if want == 'node' else want}")
            return names
        else:
            if text not in sw and text not in idx:
                self.err(word.loc, f"unknown reference {text!r}")
                return []
            names = [text]
        if want == "switch":
            bad = [n for n in names if n not in sw]
            if bad:
                self.err(word.loc, f"{bad[0]!r} is a {self.kind(bad[0])}, not a switch")
                return []
        elif want == "node":
            bad = [n for n in names if n in sw]
            if bad:
                self.err(word.loc, f"{bad[0]!r} is a switch, not a vm, host or router")
                return []
        return names

    def kind(self, name: str) -> str:
        if name in self.net.switches:
            return "switch"
        return self.net.groups[self.net.index[name][0]].kind

    # -- pass 2: wiring -----------------------------------------------------------
    def find(self, key: tuple[str, int | None]) -> tuple[str, int | None]:
        p = self.parent.setdefault(key, key)
        while p != key:
            self.parent[key] = self.parent.setdefault(p, p)
            key, p = p, self.parent[p]
        return key

    def domain_for(self, switch: str, vlan: int | None, loc: Loc) -> Domain:
        root = self.find((switch, vlan))
        dom = self.domain_by_root.get(root)
        if dom is None:
            name = root[0] if root[1] is None else f"{root[0]}.v{root[1]}"
            dom = Domain(len(self.net.domains), name, self.net.switches[root[0]].loc, vlan=root[1])
            dom.mtu = self.net.switches[root[0]].mtu
            self.net.domains.append(dom)
            self.domain_by_root[root] = dom
        if switch not in dom.switches:
            dom.switches.append(switch)
        if vlan is not None:
            self.net.switches[switch].vlans.add(vlan)
        return dom

    def wire(self) -> None:
        for wa, wb, loc in self.reachable_raw:
            a, b = self.resolve(wa, "node"), self.resolve(wb, "node")
            if a and b:
                self.reachable_resolved.append((wa, wb, loc, a, b))
        links_p2p: list[tuple[_PendingLink, list[str], list[str]]] = []
        links_edge: list[tuple[_PendingLink, str, str, list[Word], Word | None]] = []
        # Switch-to-switch links first: they merge layer-2 domains.
        for link in self.pending_links:
            a = self.resolve(link.a, "any")
            b = self.resolve(link.b, "any")
            if not a or not b:
                continue
            a_sw = [n for n in a if n in self.net.switches]
            b_sw = [n for n in b if n in self.net.switches]
            if (a_sw and len(a_sw) != len(a)) or (b_sw and len(b_sw) != len(b)):
                self.err(link.loc, "a link pattern must match only switches or only nodes")
                continue
            if not self._ifnames_fit(link, a, b, a_sw, b_sw):
                continue
            if a_sw and b_sw:
                for x in a:
                    for y in b:
                        if x == y:
                            self.err(link.b.loc, f"link from switch {x!r} to itself")
                            continue
                        self._switch_link(x, y, link)
            elif a_sw or b_sw:
                sws, nodes, addrs, ifw = (a, b, link.b_addrs, link.b_ifname) if a_sw else \
                    (b, a, link.a_addrs, link.a_ifname)
                for s in sws:
                    for n in nodes:
                        links_edge.append((link, n, s, addrs, ifw))
            else:
                links_p2p.append((link, a, b))
        for sw in self.net.switches.values():
            self.domain_for(sw.name, None, sw.loc)
        # Attachments of whole groups.
        for pn in self.pending_nodes:
            for att in pn.attaches:
                for s in self.resolve(att.ref, "switch"):
                    if len(att.addrs) and any(a.text not in ("auto", "none") for a in att.addrs) \
                            and "*" in att.ref.text:
                        self.err(att.addrs[0].loc, f"an explicit address needs one switch, but "
                                                   f"{att.ref.text!r} is a pattern")
                        break
                    self._iface(pn.group, range(len(pn.group)), s, att.vlan, att.props, att.addrs, att.ref.loc)
        # Single nodes linked to a switch, then point-to-point links: their interface
        # numbers come after the group's.
        for link, n, s, addrs, ifw in links_edge:
            gi, k = self.net.index[n]
            self._iface(self.net.groups[gi], range(k, k + 1), s, link.vlans[0] if link.vlans else None,
                        link.props, addrs, link.loc, extra=n, name=ifw)
        for link, a_names, b_names in links_p2p:
            for x in a_names:
                for y in b_names:
                    if x == y:
                        self.err(link.b.loc, f"link from {x!r} to itself")
                        continue
                    dom = Domain(len(self.net.domains), f"{x}--{y}", link.loc)
                    dom.mtu = link.props.mtu or 1500
                    self.net.domains.append(dom)
                    self.link_subnets[dom.id] = link.subnet
                    for me, other, addrs, ifw in ((x, y, link.a_addrs, link.a_ifname),
                                                  (y, x, link.b_addrs, link.b_ifname)):
                        gi, k = self.net.index[me]
                        self._iface(self.net.groups[gi], range(k, k + 1), None, None, link.props,
                                    addrs if len(a_names) == len(b_names) == 1 else [],
                                    link.loc, extra=me, domain=dom, peer=other, name=ifw)
        self._check_ifnames()

    def _ifnames_fit(self, link: _PendingLink, a: list[str], b: list[str], a_sw: list[str],
                     b_sw: list[str]) -> bool:
        """`NODE:IFNAME` names one interface of one host or router."""
        for ifw, names, sws in ((link.a_ifname, a, a_sw), (link.b_ifname, b, b_sw)):
            if ifw is None:
                continue
            if sws:
                self.err(ifw.loc, f"{names[0]!r} is a switch: only a host's or router's interface "
                                  f"takes a name")
                return False
            if len(names) != 1:
                self.err(ifw.loc, f"an interface name needs one node, but the reference matches "
                                  f"{len(names)}")
                return False
            if self.kind(names[0]) == "vm":
                self.err(ifw.loc, f"{names[0]!r} is a vm: its guest names its NICs in order "
                                  f"(eth0, eth1, ...); interface names are for hosts and routers")
                return False
        return True

    def _check_ifnames(self) -> None:
        """Named interfaces must not collide with each other or with ethN ones."""
        for node, extra in self.net.extra_ifaces.items():
            if all(i.name is None for i in extra):
                continue
            gi, _ = self.net.index[node]
            seen: dict[str, Iface] = {}
            for iface in list(self.net.groups[gi].ifaces) + extra:
                first = seen.setdefault(iface.ifname, iface)
                if first is not iface:
                    self.err(iface.loc, f"interface name {iface.ifname!r} used twice on {node} "
                                        f"(first at {first.loc})")

    def _switch_link(self, x: str, y: str, link: _PendingLink) -> None:
        sx, sy = self.net.switches[x], self.net.switches[y]
        mtu_x, mtu_y = link.props.mtu or sx.mtu, link.props.mtu or sy.mtu
        if not (sx.mtu == sy.mtu == mtu_x == mtu_y):
            self.err(link.loc, f"MTU mismatch: switch {x} (mtu {sx.mtu}) and switch {y} (mtu {sy.mtu})"
                               + (f" joined by a link with mtu {link.props.mtu}" if link.props.mtu else ""))
        vlans: list[int | None] = list(link.vlans) or [None]
        for v in vlans:
            ra, rb = self.find((x, v)), self.find((y, v))
            if ra != rb:
                self.parent[rb] = ra
        # A trunk carries its VLANs whether or not a port uses them on either side
        # (an empty VLAN is legitimate): both switches have them.
        sx.vlans.update(link.vlans)
        sy.vlans.update(link.vlans)
        self.net.switch_links.append(SwitchLink(x, y, link.loc, link.vlans, link.props))

    def _iface(self, g: NodeGroup, members: range, switch: str | None, vlan: int | None,
               props: LinkProps, addrs: list[Word], loc: Loc, extra: str | None = None,
               domain: Domain | None = None, peer: str | None = None,
               name: Word | None = None) -> None:
        if domain is None:
            assert switch is not None, "an interface is on a switch or on a point-to-point domain"
            domain = self.domain_for(switch, vlan, loc)
        dom = domain
        if switch is not None:
            sw = self.net.switches[switch]
            if props.mtu is not None and props.mtu != sw.mtu:
                self.err(loc, f"MTU mismatch: mtu {props.mtu} on {g.names[members[0]]}'s interface "
                              f"but switch {switch} has mtu {sw.mtu}")
        if extra is None:
            index = len(g.ifaces)
        else:
            index = len(g.ifaces) + len(self.net.extra_ifaces.get(extra, ()))
        iface = Iface(g, members, index, dom, loc, switch=switch, peer=peer, vlan=vlan, props=props,
                      name=name.text if name is not None else None)
        for w in addrs:
            if w.text in ("auto", "none"):
                iface.want[0] = (w.text, 0, None)
                continue
            parsed = ipam.parse_addr(w.text)
            assert parsed is not None, w.text        # _attach took only words that look like addresses
            fam, value, plen = parsed
            if fam in iface.want:
                self.err(w.loc, f"two IPv{fam} addresses for one interface")
            iface.want[fam] = ("explicit", value, plen)
            # for error messages
            iface.want[-fam] = ("loc", w.loc, None)
        if extra is None:
            g.ifaces.append(iface)
        else:
            self.net.extra_ifaces.setdefault(extra, []).append(iface)
        dom.ifaces.append(iface)

    # -- pass 3: addressing --------------------------------------------------------
    def address(self) -> None:
        pools = self.net.pools
        default_pool: dict[int, ipam.Pool] = {}
        for p in pools.values():
            default_pool.setdefault(p.subnet.family, p)
        taken = {4: ipam.Taken(), 6: ipam.Taken()}
        fixed: list[tuple[ipam.Subnet, Domain, Loc]] = []
        to_allocate: list[tuple[Domain, int, ipam.Pool, Loc, int]] = []
        for dom in self.net.domains:
            if dom.switches:
                specs: list[tuple[str, Any, Loc]] = []
                for s in dom.switches:
                    spec = self.net.switches[s].subnet_spec
                    if spec and specs and spec != specs:
                        self.err(spec[0][2], f"switches {dom.switches[0]} and {s} are one layer-2 "
                                             f"segment but declare different subnets")
                    specs = specs or spec
                if dom.vlan is not None:
                    # A switch's subnet describes its untagged segment; VLANs are automatic.
                    specs = [x for x in specs if x[0] != "cidr"]
                is_p2p = False
            else:
                specs = self.link_subnets.get(dom.id, [])
                is_p2p = True
            if not specs:
                specs = [("auto", None, dom.loc)] if pools else []
            wants_any = any(i.want.get(0, ("auto",))[0] != "none" for i in dom.ifaces)
            explicit_fams = {v.family for k, v, _ in specs if k == "cidr"}
            # Explicit addresses with a prefix length define the subnet of their
            # family unless the switch or link names one.
            for iface in dom.ifaces:
                for fam in (4, 6):
                    w = iface.want.get(fam)
                    if w and w[2] is not None and fam not in dom.subnets and fam not in explicit_fams:
                        size = 1 << (ipam.BITS[fam] - w[2])
                        sub = ipam.Subnet(fam, w[1] // size * size, w[2])
                        dom.subnets[fam] = sub
                        fixed.append((sub, dom, iface.want[-fam][1]))
            for kind, value, loc in specs:
                if kind == "cidr":
                    if value.family in dom.subnets:
                        self.err(loc, f"two IPv{value.family} subnets for {dom.name}")
                        continue
                    dom.subnets[value.family] = value
                    fixed.append((value, dom, loc))
                elif kind == "pool":
                    pool = pools.get(value)
                    if pool is None:
                        self.err(loc, f"unknown pool {value!r}")
                        continue
                    to_allocate.append((dom, pool.subnet.family, pool, loc, 1 if is_p2p else 0))
                elif kind == "auto":
                    if not pools:
                        self.err(loc, f"'subnet auto' for {dom.name} but no pool is declared "
                                      f"(add 'pool NAME CIDR')")
                    for fam, pool in default_pool.items():
                        if fam not in dom.subnets and (wants_any or not is_p2p):
                            to_allocate.append((dom, fam, pool, loc, 1 if is_p2p else 0))
        # Overlaps among fixed subnets: sorted by start, each against the widest so far.
        for fam in (4, 6):
            subs = sorted((s for s in fixed if s[0].family == fam), key=lambda t: (t[0].net, -t[0].size))
            widest: tuple[ipam.Subnet, Domain, Loc] | None = None
            for fs in subs:
                if widest is not None and fs[0].net <= widest[0].last:
                    self.err(fs[2], f"overlapping subnets: {fs[0]} of {fs[1].name} overlaps {widest[0]} "
                                    f"of {widest[1].name} ({widest[2]})")
                if widest is None or fs[0].last > widest[0].last:
                    widest = fs
            for fs in subs:
                taken[fam].add(fs[0].net, fs[0].last)
        # Pool allocation: switches first (in declaration order), then p2p links.
        to_allocate.sort(key=lambda t: t[4])
        for dom, fam, pool, loc, p2p in to_allocate:
            if fam in dom.subnets:
                continue
            plen = ipam.P2P_PLEN[fam] if p2p else pool.per
            got = pool.allocate(plen, taken[fam])
            if got is None:
                self.err(loc, f"pool exhausted: pool {pool.name} ({pool.subnet}) has no /{plen} "
                              f"left for {dom.name}")
                continue
            dom.subnets[fam] = got
        for dom in self.net.domains:
            self._addresses(dom)

    def _addresses(self, dom: Domain) -> None:
        ifaces = sorted(dom.ifaces, key=lambda i: i.group.kind != "router")
        for fam, sub in dom.subnets.items():
            reserved: list[tuple[int, int, Iface]] = []
            auto: list[Iface] = []
            for iface in ifaces:
                w = iface.want.get(fam) or iface.want.get(0) or ("auto", 0, None)
                if w[0] == "none":
                    continue
                if w[0] == "auto":
                    auto.append(iface)
                    continue
                loc = iface.want[-fam][1]
                start, n = w[1], len(iface.members)
                if w[2] is not None and w[2] != sub.plen:
                    self.err(loc, f"address {ipam.fmt(fam, start)}/{w[2]} does not match the subnet "
                                  f"{sub} of {dom.name}")
                    continue
                if not (sub.contains(start) and sub.contains(start + n - 1)):
                    what = f"address {ipam.fmt(fam, start)}" if n == 1 else \
                        f"addresses {ipam.fmt(fam, start)}..{ipam.fmt(fam, start + n - 1)}"
                    self.err(loc, f"{what} outside the subnet {sub} of {dom.name}")
                    continue
                first, last = sub.first_host(), sub.first_host() + sub.capacity() - 1
                if start < first or start + n - 1 > last:
                    self.err(loc, f"address {ipam.fmt(fam, start if start < first else last + 1)} is "
                                  f"the network or broadcast address of {sub}")
                    continue
                iface.addrs[fam] = range(start, start + n)
                reserved.append((start, start + n - 1, iface))
            reserved.sort(key=lambda t: t[0])
            for prev, cur in zip(reserved, reserved[1:]):
                if cur[0] <= prev[1]:
                    owner = prev[2].group.names[prev[2].members[0] + cur[0] - prev[0]]
                    self.err(cur[2].want[-fam][1], f"duplicate address {ipam.fmt(fam, cur[0])} "
                                                   f"(also given to {owner} at {prev[2].want[-fam][1]})")
            need = sum(len(i.members) for i in auto)
            free = sub.capacity() - sum(r[1] - r[0] + 1 for r in reserved)
            if need > free:
                self.err(auto[0].loc if auto else dom.loc,
                         f"pool exhausted: subnet {sub} of {dom.name} has {free} free addresses "
                         f"for {need} interfaces")
                continue
            cursor = sub.first_host()
            starts = [r[0] for r in reserved]
            for iface in auto:
                n = len(iface.members)
                # Fast path: a contiguous run with nothing reserved inside it.
                j = bisect.bisect_left(starts, cursor)
                blocked = (j < len(reserved) and reserved[j][0] < cursor + n) or \
                          (j > 0 and reserved[j - 1][1] >= cursor)
                if not blocked:
                    iface.addrs[fam] = range(cursor, cursor + n)
                    cursor += n
                    continue
                out: list[int] = []
                while len(out) < n:
                    j = bisect.bisect_right(starts, cursor) - 1
                    if j >= 0 and reserved[j][1] >= cursor:
                        cursor = reserved[j][1] + 1
                        continue
                    out.append(cursor)
                    cursor += 1
                iface.addrs[fam] = out
        for iface in ifaces:
            if iface.group.kind != "router":
                break
            for k in iface.members:
                dom.routers.append((iface.group.names[k], {f: seq[k - iface.members.start]
                                                            for f, seq in iface.addrs.items()}))
        for fam in (4, 6):
            for iface in ifaces:
                wanted = iface.want.get(fam)
                if wanted and wanted[0] == "explicit" and fam not in dom.subnets:
                    self.err(iface.want[-fam][1], f"address {ipam.fmt(fam, wanted[1])} needs a prefix length "
                                                  f"(e.g. /24): {dom.name} has no IPv{fam} subnet")
        if any(i.want.get(0, ("",))[0] == "auto" for i in ifaces) and not dom.subnets:
            self.err(next(i.loc for i in ifaces if i.want.get(0, ("",))[0] == "auto"),
                     f"'auto' address on {dom.name}, which has no subnet (declare a pool or 'subnet CIDR')")

    # -- pass 4: images, routes, assertions ----------------------------------------
    def check_images(self) -> None:
        for g in self.net.groups:
            img = g.props.get("image")
            if img is not None:
                if img[0] not in self.net.images:
                    self.err(img[1], f"unknown image {img[0]!r} (declare it with image {img[0]} from \"PATH\")")
                g.props["image"] = img[0]

    def check_faults(self) -> None:
        """Schedule statements: their references resolve, their links exist."""
        from megafleet.netlang import faults
        for f in self.faults_raw:
            want = "node" if f.kind == "node" else "any"
            a = self.resolve(Word(f.a, f.a_loc), want)
            b = self.resolve(Word(f.b, f.b_loc), "any") if f.b is not None else None
            if not a or (f.b is not None and not b):
                continue
            if f.kind == "link" and not faults.linked(self.net, set(a), set(b) if b is not None else None):
                self.err(f.a_loc, f"no link {f.a}" + (f" -- {f.b}" if f.b else "") + " in the description")
                continue
            self.net.faults.append(f)

    def check_reachable(self) -> None:
        from megafleet.netlang.routing import Reach
        reach = Reach(self.net)
        for wa, wb, loc, a, b in self.reachable_resolved:
            self.net.reachable.append((wa.text, wb.text, loc))
            why = reach.check(a, b)
            if why is not None:
                self.err(loc, f"reachable {wa.text} {wb.text} cannot hold: {why}")


def compile_file(path: str | Path, defines: dict[str, str] | None = None, text: str | None = None,
                 graph: bool = True) -> Net:
    """Compile a description. Raises CompileError with every problem found.
    containerlab, GraphML, GML, netlab and GNS3 files are read through their
    importer (megafleet.netlang.importers), recognised by extension or content;
    what such a file had that was not carried over is in `Net.import_warnings`."""
    notes: list[str] = []
    if text is None and not str(path).endswith(".fleet"):
        from megafleet.netlang.importers import ImportFailed, fleet_source
        try:
            imported = fleet_source(path)
        except ImportFailed as err:
            raise CompileError(err.diagnostics()) from None
        if imported is not None:
            path, text, notes = imported.name, imported.text, imported.warnings
    # A big description allocates millions of small objects (names, index
    # entries, graph dicts) that never form cycles; the cyclic collector would
    # rescan them over and over, which costs more than the compile itself at a
    # million nodes. Nothing here needs it: pause it, and restore it after.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        net = _compile(path, defines, text, graph)
        net.import_warnings = notes
        return net
    finally:
        if was_enabled:
            gc.enable()


def _compile(path: str | Path, defines: dict[str, str] | None, text: str | None, graph: bool) -> Net:
    diags = Diagnostics()
    parsed = parse_file(path, diags, defines, text=text)
    c = Compiler(diags)
    # The described file first, then what it includes.
    c.net.files = [str(path)] + sorted({s.loc.file for s in parsed.statements} - {str(path)})
    c.net.params = {k: v[0] for k, v in parsed.params.items()}
    c.declare(parsed.statements)
    c.wire()
    c.check_images()
    from megafleet.vm.driver import check_guest_memory   # each driver's minimum `mem`
    check_guest_memory(c.net, diags)
    c.address()
    if not diags:
        from megafleet.netlang.routing import static_routes
        c.net.static_routes = static_routes(c.net)
        from megafleet.netlang import buildable
        buildable.check(c.net, diags)
        c.check_reachable()
        c.check_faults()
    if diags:
        raise CompileError(diags)
    if graph:
        _ = c.net.graph
    return c.net


def compile_text(text: str, name: str = "<text>.fleet", defines: dict[str, str] | None = None,
                 graph: bool = True) -> Net:
    return compile_file(name, defines, text=text, graph=graph)
