"""Telemetry pipeline benchmark. Prints one JSON line.

- pipeline_docs_per_s: documents through the pipeline (submit, queue, batch,
  insert_many in a worker thread) into a FerretDB started here (SQLite backend);
- raw_docs_per_s: the same documents, raw pymongo insert_many (same batch size,
  ordered=False) into the same FerretDB, in the same run: the limit;
- pipeline_vs_raw = pipeline / raw (target >= 0.8);
- sqlite_docs_per_s: the pipeline into the embedded SQLite store;
- stream: `stream_vms` simulated guests sampled every `stream_interval_s` by the
  guest sampler (their CPU time and RSS given by the source, as the libvirt
  driver gives them) through the pipeline into FerretDB for `stream_s` seconds:
  latency_p95_s (sample taken -> stored; target <= 2) and cpu_fraction (this
  process's CPU time over wall time, all threads, of one core; target <= 0.25).

Each round measures raw and pipeline back to back (alternating which goes first),
each on a fresh database; pipeline_vs_raw is the median of the rounds' ratios (a
paired comparison: the machine is shared, and contention drifts between rounds),
the rates are medians. pipeline_overhead_us_per_doc is the pipeline's own CPU
cost per document (a store that takes documents and does nothing), the part of
the ratio that does not depend on the server. The stream runs a second time
into the embedded SQLite store (sqlite_latency_p95_s, sqlite_cpu_fraction: there
the store's work is in this process).

    .venv/bin/python bench/telemetry.py [--docs 50000] [--rounds 2] [--stream-s 60]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from megafleet.collect import docs as D  # noqa: E402
from megafleet.collect.pipeline import Pipeline  # noqa: E402
from megafleet.collect.queries import percentile  # noqa: E402
from megafleet.collect.samplers import GuestInfo, GuestSampler  # noqa: E402
from megafleet.collect.spool import Spool  # noqa: E402
from megafleet.collect.stores import MongoStore, SqliteStore  # noqa: E402
from megafleet.ledger import Ledger  # noqa: E402
from megafleet.proc import RecordedProcess  # noqa: E402

FERRETDB = Path(os.environ.get("MEGAFLEET_FERRETDB", "/opt/megafleet/bin/ferretdb"))
BATCH = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.ledger = Ledger()
        self.key = f"mfc-bench-ferretdb-{self.port}"
        argv = [str(FERRETDB), "--handler=sqlite", f"--sqlite-url=file:{workdir}/",
                f"--listen-addr=127.0.0.1:{self.port}", f"--state-dir={workdir}",
                "--debug-addr=-", "--telemetry=disable", "--log-level=error"]
        self.ledger.record("collect-bench", "process", self.key, argv=argv)
        # PR_SET_PDEATHSIG: the server goes when this benchmark dies, however it dies.
        self.popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      preexec_fn=lambda: ctypes.CDLL(None).prctl(
                                          1, signal.SIGTERM, 0, 0, 0))
        self.process = RecordedProcess.of(self.popen.pid)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.popen.poll() is not None:
                    raise RuntimeError("ferretdb did not start")
                time.sleep(0.05)

    def uri(self, db: str) -> str:
        return f"mongodb://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self.process.stop(grace=10)
        self.popen.wait(timeout=10)
        self.ledger.forget("collect-bench", "process", self.key)


def make_docs(n: int, tag: str) -> list[dict]:
    base = D.now_ms()
    return [D.sample(D.GUEST, "mfc-bench", {"state": "running", "cpu_s": i * 0.01,
                                            "cpu_pct": 12.5, "rss_kb": 60_000 + i % 1000,
                                            "pid": 10_000 + i % 1000},
                     time_ms=base + i // 1000, guest=f"mfc-{tag}-{i % 1000}", image="tiny")
            for i in range(n)]


def raw_insert(uri: str, docs: list[dict]) -> float:
    store = MongoStore(uri)
    store.ping()  # set up collections and indexes as the pipeline's store does
    coll = store.db[D.SAMPLES]
    started = time.perf_counter()
    for i in range(0, len(docs), BATCH):
        coll.insert_many(docs[i:i + BATCH], ordered=False)
    elapsed = time.perf_counter() - started
    assert coll.count_documents({}) == len(docs)
    store.client.drop_database(store.db.name)
    store.close()
    return len(docs) / elapsed


def pipeline_insert(store, docs: list[dict], spool_dir: Path) -> float:
    pipeline = Pipeline(store, Spool(spool_dir), host="mfc-bench", batch_size=BATCH,
                        capacity=len(docs) + 10, stats_interval=3600)
    store.ping()

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            for i, doc in enumerate(docs):
                pipeline.submit(doc)
                if i % BATCH == BATCH - 1:
                    await trio.lowlevel.checkpoint()  # producers yield as samplers do
            pipeline.close()

    started = time.perf_counter()
    trio.run(main)
    elapsed = time.perf_counter() - started
    assert pipeline.counters.dropped == 0 and pipeline.counters.spooled == 0
    return len(docs) / elapsed


class NullStore:
    """Takes documents and does nothing: the pipeline's own cost."""

    features: dict = {}

    def insert(self, collection, docs, replay=False):
        return len(docs)

    def ping(self):
        return None


def pipeline_overhead_us(n: int) -> float:
    docs = make_docs(n, "null")
    with tempfile.TemporaryDirectory(prefix="mfc-null-") as spool:
        gc.collect()
        cpu = time.process_time()
        pipeline_insert(NullStore(), docs, Path(spool))
        return round((time.process_time() - cpu) / n * 1e6, 2)


def stream(store, vms: int, interval: float, duration: float, spool_dir: Path) -> dict:
    latencies: list[float] = []

    def on_stored(collection: str, batch: list[dict]) -> None:
        now = D.now_ms()
        if collection == D.SAMPLES:
            latencies.extend((now - D.datetime_to_ms(d["time"])) / 1000 for d in batch
                             if d["meta"]["kind"] == D.GUEST)

    ticks = {"n": 0}

    def guests() -> list[GuestInfo]:
        ticks["n"] += 1
        t = ticks["n"]
        return [GuestInfo(f"mfc-vm{i}", "running", None, "tiny", cpu_s=t * 0.5 + i * 1e-4,
                          rss_kb=50_000 + i % 4096) for i in range(vms)]

    sampler = GuestSampler("mfc-bench", guests, interval)
    insert_time = {"s": 0.0, "docs": 0}
    real_insert = store.insert

    def timed_insert(collection, docs, replay=False):
        t = time.perf_counter()
        n = real_insert(collection, docs, replay)
        insert_time["s"] += time.perf_counter() - t
        insert_time["docs"] += len(docs)
        return n

    store.insert = timed_insert
    pipeline = Pipeline(store, Spool(spool_dir), host="mfc-bench", batch_size=BATCH,
                        flush_interval=0.5, on_stored=on_stored)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            with trio.move_on_after(duration):
                await sampler.run(pipeline.submit, limiter=trio.CapacityLimiter(1))
            pipeline.close()

    store.ping()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    trio.run(main)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    c = pipeline.counters
    return {"latency_p95_s": round(percentile(latencies, 95) or 0.0, 3),
            "latency_p50_s": round(percentile(latencies, 50) or 0.0, 3),
            "cpu_fraction": round(cpu / wall, 4), "stream_docs": len(latencies),
            "stream_dropped": c.dropped, "stream_spooled": c.spooled,
            # How fast the store took the stream's batches: when latency misses its
            # target, this says whether the server was the bottleneck.
            "stream_store_docs_per_s": round(insert_time["docs"] / insert_time["s"])
            if insert_time["s"] else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stream-vms", type=int, default=10_000)
    ap.add_argument("--stream-interval", type=float, default=10.0)
    ap.add_argument("--stream-s", type=float, default=60.0)
    ap.add_argument("--no-stream-sqlite", dest="stream_sqlite", action="store_false",
                    help="Skip the second stream into the embedded SQLite store.")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mfc-bench-"))
    os.environ.setdefault("MEGAFLEET_STATE", str(workdir / "state"))
    server = Server(workdir)
    # The machine is shared: the load says how much CPU the figures had to share.
    result: dict = {"docs": args.docs, "batch": BATCH, "rounds": args.rounds,
                    "load1_at_start": float(open("/proc/loadavg").read().split()[0])}
    try:
        raw, piped, sqlite = [], [], []
        for r in range(args.rounds):
            docs = make_docs(args.docs, f"r{r}")

            def run_raw() -> None:
                gc.collect()
                raw.append(raw_insert(server.uri(f"mfcraw{r}"), docs))

            def run_pipeline() -> None:
                gc.collect()
                store = MongoStore(server.uri(f"mfcpipe{r}"))
                piped.append(pipeline_insert(store, docs, workdir / f"spool{r}"))
                store.client.drop_database(store.db.name)
                store.close()

            # Alternate which goes first: neither profits from a warmer server.
            for step in ((run_raw, run_pipeline) if r % 2 == 0 else (run_pipeline, run_raw)):
                step()
            gc.collect()
            lite = SqliteStore(workdir / f"bench{r}.sqlite")
            sqlite.append(pipeline_insert(lite, docs, workdir / f"lspool{r}"))
            lite.close()
        ratios = [p / r for p, r in zip(piped, raw)]
        result.update(raw_docs_per_s=round(statistics.median(raw)),
                      pipeline_docs_per_s=round(statistics.median(piped)),
                      pipeline_vs_raw=round(statistics.median(ratios), 3),
                      pipeline_vs_raw_rounds=[round(x, 3) for x in ratios],
                      pipeline_overhead_us_per_doc=pipeline_overhead_us(args.docs),
                      sqlite_docs_per_s=round(max(sqlite)),
                      raw_rounds=[round(x) for x in raw], pipeline_rounds=[round(x) for x in piped])
        result.update(stream_vms=args.stream_vms, stream_interval_s=args.stream_interval,
                      stream_s=args.stream_s)
        store = MongoStore(server.uri("mfcstream"))
        result.update(stream(store, args.stream_vms, args.stream_interval, args.stream_s,
                             workdir / "sspool"))
        store.client.drop_database(store.db.name)
        store.close()
        if args.stream_sqlite:
            lite = SqliteStore(workdir / "stream.sqlite")
            embedded = stream(lite, args.stream_vms, args.stream_interval, args.stream_s,
                              workdir / "slspool")
            lite.close()
            result.update({f"sqlite_{k}": v for k, v in embedded.items()
                           if k in ("latency_p95_s", "cpu_fraction", "stream_dropped")})
        result["targets_met"] = (result["pipeline_vs_raw"] >= 0.8
                                 and result["latency_p95_s"] <= 2
                                 and result["cpu_fraction"] <= 0.25
                                 and result["stream_dropped"] == 0)
        result["load1_at_end"] = float(open("/proc/loadavg").read().split()[0])
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
