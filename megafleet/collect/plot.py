"""PNG plots of query results: the boot-time CDF and KSM saving over time.

matplotlib is optional (the `plot` extra): it is imported only here, only when a
plot is asked for, with the non-interactive Agg backend.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path


class PlotUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable("plots need matplotlib: pip install 'megafleet[plot]'") from exc
    return plt


def boot_cdf(durations: dict[str, list[float]], path: Path | str) -> Path:
    """One step curve per image: fraction of guests booted within x seconds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for image, values in durations.items():
        if not values:
            continue
        n = len(values)
        ax.step(values, [(i + 1) / n for i in range(n)], where="post",
                label=f"{image} (n={n})")
    ax.set_xlabel("boot time (s)")
    ax.set_ylabel("fraction of guests ready")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title("Boot time CDF")
    if durations:
        ax.legend(loc="lower right")
    return _save(fig, plt, path)


def ksm_saving(rows: list[dict], path: Path | str) -> Path:
    """One line per host: MiB saved by KSM over time."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_host: dict[str, tuple[list[datetime], list[float]]] = {}
    for r in rows:
        times, values = by_host.setdefault(r["host"], ([], []))
        times.append(r["time"])
        values.append(r["saving_bytes"] / 2**20)
    for host, (times, values) in sorted(by_host.items()):
        ax.plot(times, values, marker=".", label=host)
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("KSM saving (MiB)")
    ax.grid(True, alpha=0.3)
    ax.set_title("KSM saving over time")
    if by_host:
        ax.legend(loc="upper left")
    fig.autofmt_xdate()
    return _save(fig, plt, path)


def _save(fig, plt, path: Path | str) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        plt.close(fig)
        raise ValueError(f"--plot {path}: the file name must end in .png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
