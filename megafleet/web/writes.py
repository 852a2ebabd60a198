"""The API's writes: the same functions `megafleet link`, `megafleet node` and
`megafleet verify` call (megafleet.experiment), with their errors turned into
the API's (a bad reference or value is a 400 naming the field)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megafleet.web.state import NotFound

if TYPE_CHECKING:
    from megafleet.experiment.hostside import ChangedLink


class WriteError(ValueError):
    """Bad input to a write: `field` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


def _testbed(name: str):
    from megafleet.experiment import control

    try:
        return control.testbed(name)
    except control.ControlError:
        raise NotFound("testbed", name) from None


async def link_action(testbed: str, action: str, a: str, b: str, props: dict[str, Any]) -> list[dict]:
    """`megafleet link set|down|up A -- B [props]`: rows of {link, host, ...}.
    props: delay, jitter, loss, rate as the language writes them ("50ms", "5%")."""
    from megafleet.experiment import control
    from megafleet.experiment import refs as R

    tb = _testbed(testbed)
    settings = None
    if action == "set":
        words: list[str] = []
        for key, value in props.items():
            words += [key, str(value)]
        try:
            settings = R.parse_settings(words)
        except R.RefError as exc:
            field = next((k for k in props if k in str(exc)), "props")
            raise WriteError(field, str(exc)) from None
    elif props:
        raise WriteError(next(iter(props)), f"link {action} takes no settings")
    try:
        return await control.link(tb, action, a, b, settings, source="web")
    except control.ControlError as exc:
        raise WriteError("link", str(exc)) from None


async def node_action(testbed: str, action: str, pattern: str) -> list[dict]:
    """`megafleet node ACTION PATTERN`: rows of {node, host, ...}."""
    from megafleet.experiment import control

    tb = _testbed(testbed)
    try:
        return await control.node(tb, action, pattern, source="web")
    except control.ControlError as exc:
        raise WriteError("node", str(exc)) from None


async def verify(testbed: str) -> dict[str, Any]:
    """`megafleet verify TESTBED --json`, checked once with a short wait."""
    from megafleet.experiment import control
    from megafleet.experiment.verify import converge

    tb = _testbed(testbed)
    try:
        result = await converge(tb, within=10.0)
    except control.ControlError as exc:
        raise WriteError("testbed", str(exc)) from None
    return result.to_json()


def runtime_links(testbed: str) -> dict[tuple[str, str], ChangedLink]:
    """Links changed at run time on this machine's hosts, by sorted ends: the
    records `megafleet link show` reads (a record's settings are what the link
    runs with now, set or cleared; links without one run as declared). Read
    from the ledger: no process per link."""
    from megafleet.experiment.hostside import changed_links
    from megafleet.ledger import Ledger

    try:
        changed = changed_links(testbed, Ledger())
    except Exception:        # no manifest here (a remote testbed): nothing changed that we can see
        return {}
    return {c.ends: c for c in changed}
