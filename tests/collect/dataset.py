"""A small fleet's telemetry, deterministic, for the conformance tests."""

from __future__ import annotations

from megafleet.collect import docs as D

T0 = 1_780_000_000_000  # ms; a fixed instant so answers never depend on the clock
HOSTS = ("mfc-h1", "mfc-h2")


def samples() -> list[dict]:
    out = []
    for step in range(3):
        t = T0 + step * 10_000
        for h, host in enumerate(HOSTS):
            for g in range(6):
                name = f"mfc-g{h}{g}"
                state = "running" if g < 4 else ("failed" if g == 4 else "booting")
                if step == 2 and g == 3:
                    state = "stopped"
                fields = {"state": state, "pid": 1000 + g, "cpu_s": 1.5 * step + g,
                          "rss_kb": 50_000 + 1_000 * g + 100 * h}
                if step:
                    fields["cpu_pct"] = 10.0 * g + h + step / 4
                out.append(D.sample(D.GUEST, host, fields, time_ms=t + g, guest=name,
                                    image="tiny" if g % 2 == 0 else "big"))
            out.append(D.sample(D.HOST, host, {
                "load1": 0.5 * step, "load5": 0.2, "load15": 0.1,
                "mem_total_kb": 24_000_000, "mem_available_kb": 20_000_000 - step * 1000,
                "ksm": {"pages_shared": 100 * step, "pages_sharing": 900 * step + h},
                "ksm_saving_bytes": (900 * step + h) * 4096}, time_ms=t))
            for i, iface in enumerate(("mfcbr0", "mfctap0", "mfctap1")):
                fields = {"rx_bytes": 1000 * step * (i + 1) + h, "tx_bytes": 500 * step * (i + 1),
                          "rx_packets": 10 * step, "tx_packets": 5 * step,
                          "rx_dropped": step if i == 2 else 0, "tx_dropped": 0,
                          "rx_errors": 0, "tx_errors": 0}
                if step:
                    fields.update(rx_bps=100.0 * (i + 1) + h, tx_bps=50.0 * (i + 1))
                out.append(D.sample(D.IFACE, host, fields, time_ms=t, iface=iface,
                                    type="bridge" if i == 0 else "tap"))
            out.append(D.sample(D.SNIFF, host, {
                "interval_s": 10.0, "packets": 30, "bytes": 3000, "kernel_drops": 0,
                "protocols": {"ipv4_icmp": {"packets": 20, "bytes": 1960},
                              "arp": {"packets": 10, "bytes": 1040 - h}}},
                time_ms=t, switch="mfcbr0"))
    # Odd documents for the filter semantics: a string where others have numbers,
    # a null, a boolean, a missing field.
    out.append(D.sample(D.PIPELINE, "mfc-h1", {"dropped": "n/a", "store_up": True, "note": None},
                        time_ms=T0 + 1))
    out.append(D.sample(D.PIPELINE, "mfc-h2", {"dropped": 7, "store_up": False},
                        time_ms=T0 + 2))
    return out


def events() -> list[dict]:
    out = []
    durations = [3.2, 4.1, 2.9, 5.5, 4.4, 3.3, 6.1, 3.9]
    for i, d in enumerate(durations):
        host = HOSTS[i % 2]
        out.append(D.event("boot", host, time_ms=T0 - 60_000 + i * 100, guest=f"mfc-g{i % 2}{i // 2}",
                           image="tiny" if i < 6 else "big", ok=True, duration_s=d))
    out.append(D.event("boot", "mfc-h1", level="error", time_ms=T0 - 30_000, guest="mfc-g14",
                       image="tiny", ok=False, duration_s=60.0, reason="no readiness line in 60 s"))
    out.append(D.event("teardown", "mfc-h2", time_ms=T0 + 25_000, guest="mfc-g13", ok=True,
                       duration_s=0.4))
    out.append(D.event("drops", "mfc-h1", level="warning", time_ms=T0 + 26_000, dropped=12))
    out.append(D.event("sampler-error", "mfc-h2", level="error", time_ms=T0 + 27_000,
                       message="interfaces: permission denied"))
    return out


def load(store) -> None:
    store.insert(D.SAMPLES, samples())
    store.insert(D.EVENTS, events())
