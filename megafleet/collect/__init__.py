"""collect: fleet telemetry.

Samplers on each host (guests, interfaces, the host, a sniff per switch) feed a
best-effort pipeline (bounded queue, batching, drop-oldest with counted drops,
events never dropped, a durable spool while the store is away) into a store:
MongoDB through pymongo, or SQLite in the state directory by default. Queries
answer the questions fleet operators ask, identically on both stores.

Modules: `docs` (document shapes and ids), `filters` (MongoDB filters on SQLite),
`stores` (MongoDB and SQLite), `spool`, `pipeline`, `samplers`, `sniff`,
`sources` (the vm engine's guests, agent logs and boot results),
`collector` (wiring on one host), `queries`, `plot`, `cli`.
"""
