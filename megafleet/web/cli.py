"""`megafleet web`: the dashboard and the HTTP API."""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import cast

import click
import trio


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); click.BadParameter otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:8470")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("web")
@click.option("--listen", default="127.0.0.1:8470", show_default=True, metavar="HOST:PORT",
              help="Address to serve on. On loopback writes need a token; anywhere else every request "
                   "does (tokens and a login link are printed at start).")
@click.option("--telemetry", "telemetry_uri", metavar="URI", envvar="MEGAFLEET_TELEMETRY",
              help="MongoDB URI of the telemetry store (default: the SQLite store in the state dir).")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), help="TLS certificate (PEM): serve HTTPS.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="TLS private key (PEM) for --cert.")
@click.option("--token", "tokens", multiple=True, metavar="TOKEN=SCOPES",
              help="A bearer token and its scopes (read, control, exec; comma-separated). Repeatable. "
                   "Without any, one token of each level is made and printed.")
@click.option("--poll", "poll_s", type=click.FloatRange(0.2, 60), default=1.0, show_default=True,
              help="Seconds between reads of the fleet's state (the live view's resolution).")
@click.option("--preview", "previews", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE.fleet", help="Also show this description, not up, with its nodes 'planned'. Repeatable.")
@click.option("-D", "--define", "defines", multiple=True, metavar="NAME=VALUE",
              help="Parameter values for --preview files, as for `megafleet up`.")
@click.option("--json", "json_mode", is_flag=True, help="Print the URLs and tokens as one JSON line at start.")
def web(listen, telemetry_uri, cert, key, tokens, poll_s, previews, defines, json_mode):
    """Serve the fleet's dashboard and JSON API (/api/v1/...).

    \b
    Pages: the topology as a live graph (switches, routers, guests coloured by
    state; links with impairments and traffic), hosts (nodes by state, memory,
    KSM saving, telemetry health), plots (boot-time CDF, KSM saving, busiest
    links, guests by CPU), the event stream, and a page per node with its
    addresses, links, console tail, last agent line and an exec form.
    \b
    API: every read the CLI's --json gives, under /api/v1 (OpenAPI document at
    /api/v1/openapi.json); events as Server-Sent Events at
    /api/v1/events/stream; writes for link and node control, verify and exec.
    \b
    Access: on loopback (the default) anyone on this machine may read; every
    write (link and node control, verify, exec) needs a token whose scope
    allows it, and is answered 403 without one. On any other address every
    request needs a token (401 without one). A token is given as the header
    'Authorization: Bearer TOKEN', or by opening the one-time login link
    printed at start: in a browser it sets a session (a cookie) with every
    scope, so the pages' exec form works there. Open it once; a second visit
    is refused, and a new link needs a new start.
    Scopes: read < control (links, nodes, verify) < exec.
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve
    from hypercorn.typing import ASGIFramework

    from megafleet.web.app import create_app
    from megafleet.web.auth import SCOPES, Auth
    from megafleet.web.events import Broker

    from megafleet.up import parse_defines
    from megafleet.web import state

    host, port = parse_listen(listen)
    values = parse_defines(defines)
    for path in previews:
        state.add_preview(path, values)
    if bool(cert) != bool(key):
        raise click.UsageError("--cert and --key go together")
    if telemetry_uri:
        os.environ["MEGAFLEET_TELEMETRY"] = telemetry_uri
    auth = Auth(loopback=is_loopback(host))
    made: dict[str, str] = {}
    try:
        for item in tokens:
            token, sep, scopes = item.partition("=")
            if not sep or not token:
                raise click.BadParameter(f"{item!r}: expected TOKEN=SCOPES", param_hint="--token")
            auth.add_token(_expand(scopes), token)
        if not tokens:
            made = {"read": auth.add_token({"read"}), "control": auth.add_token({"read", "control"}),
                    "exec": auth.add_token(set(SCOPES))}
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--token") from None
    scheme = "https" if cert else "http"
    shown = f"[{host}]" if ":" in host else host
    base = f"{scheme}://{shown}:{port}"
    login = f"{base}/login?once={auth.add_login_link(set(SCOPES))}"
    info = {"url": base + "/", "api": base + "/api/v1/", "login": login, "tokens": made,
            "loopback": auth.loopback}
    if json_mode:
        click.echo(json.dumps(info))
    else:
        click.echo(f"megafleet web: {base}/  (API {base}/api/v1/, OpenAPI {base}/api/v1/openapi.json)")
        if not auth.loopback:
            click.echo("  not loopback: every request needs a token")
        else:
            click.echo("  loopback: reads are open; writes need a token or the login link's session")
        for level, token in made.items():
            click.echo(f"  token ({level}): {token}")
        click.echo(f"  one-time login link (all scopes; open it in the browser): {login}")
    sys.stdout.flush()

    config = Config()
    config.bind = [f"{shown}:{port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.keep_alive_timeout = 75
    if cert:
        config.certfile, config.keyfile = cert, key
    broker = Broker(poll_s)
    app = create_app(auth, broker)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(broker.run)
            # Starlette is an ASGI 3 application; its annotations and hypercorn's
            # spell the ASGI callable differently.
            await serve(cast(ASGIFramework, app), config)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        click.echo("megafleet web: stopped", err=True)


def _expand(scopes: str) -> set[str]:
    """'exec' implies control and read; 'control' implies read."""
    from megafleet.web.auth import SCOPES

    wanted = {s.strip() for s in scopes.split(",") if s.strip()}
    out: set[str] = set()
    for s in wanted:
        if s not in SCOPES:
            raise ValueError(f"unknown scope {s!r}: use {', '.join(SCOPES)}")
        out.update(SCOPES[: SCOPES.index(s) + 1])
    return out
