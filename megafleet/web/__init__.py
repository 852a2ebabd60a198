"""The dashboard and HTTP API (`megafleet web`): an ASGI app on trio that reads the
same state and telemetry as `megafleet status` and `megafleet telemetry`, and
calls the same functions as the CLI for its writes. See `app` for the routes,
`state` for where each answer comes from, `events` for the live stream and `auth`
for tokens and scopes."""
