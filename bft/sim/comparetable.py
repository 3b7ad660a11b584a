"""The comparison's table, its summary of the learned Delta against the best fixed Delta in
hindsight, and its chart (matplotlib, the ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path

from bft.sim.compare import Row

HEADER = (
    f"{'protocol':<15} {'delays':<9} {'skews':<7} {'delta':>7} {'Delta ms':>8} {'latency ms':>10} {'p99 ms':>7} "
    f"{'violations':>10} {'msgs/op':>7}  failed seeds"
)


def line(r: Row) -> str:
    link = "-" if r.protocol == "pbft" else ("learned" if r.link_us is None else f"{r.link_us / 1000:g} ms")
    delta = "-" if r.delta_ms is None else f"{r.delta_ms:.1f}"
    failed = " ".join(map(str, r.failed_seeds[:8])) + (" ..." if len(r.failed_seeds) > 8 else "")
    return (
        f"{r.protocol:<15} {r.delays:<9} {r.skews:<7} {link:>7} {delta:>8} {r.latency_ms:>10.2f} {r.p99_ms:>7.1f} "
        f"{100 * r.violation_rate:>9.1f}% {r.messages_per_op:>7.1f}  {failed or '-'}"
    )


def hindsight(rows: list[Row]) -> list[tuple[Row, Row]]:
    """(learned, best fixed) for each CASD variant and distribution: the best fixed Delta in
    hindsight is the fastest of the swept ones that broke nothing (or, if all broke something,
    the one that broke the least)."""
    out = []
    for learned in (r for r in rows if r.protocol != "pbft" and r.link_us is None):
        same = (learned.protocol, learned.delays, learned.skews)
        fixed = [r for r in rows if r.link_us is not None and (r.protocol, r.delays, r.skews) == same]
        out.append((learned, min(fixed, key=lambda r: (r.violation_rate, r.latency_ms))))
    return out


def hindsight_table(pairs: list[tuple[Row, Row]]) -> str:
    lines = [
        f"{'protocol':<15} {'delays':<9} {'skews':<7} | {'learned Delta':>13} {'latency':>8} {'violations':>10} | "
        f"{'best fixed':>10} {'Delta':>6} {'latency':>8} {'violations':>10}"
    ]
    for learned, best in pairs:
        lines.append(
            f"{learned.protocol:<15} {learned.delays:<9} {learned.skews:<7} | {learned.delta_ms:>10.1f} ms "
            f"{learned.latency_ms:>8.2f} {100 * learned.violation_rate:>9.1f}% | {best.link_us / 1000:>7g} ms "
            f"{best.delta_ms:>6.1f} {best.latency_ms:>8.2f} {100 * best.violation_rate:>9.1f}%"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> bool:
    """Latency and violations against Delta, one row of panels per delay distribution; False
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    delays = list(dict.fromkeys(r.delays for r in rows))
    fig, axes = plt.subplots(len(delays), 2, figsize=(11, 3.2 * len(delays)), squeeze=False)
    for (lat, bad), d in zip(axes, delays, strict=True):
        for r in (r for r in rows if r.delays == d and r.protocol == "pbft"):
            failed = f"{100 * r.violation_rate:.0f}% of seeds failed"
            lat.axhline(r.latency_ms, color="black", linestyle="--", label=f"PBFT ({failed})")
        series = dict.fromkeys((r.protocol, r.skews) for r in rows if r.delays == d and r.protocol != "pbft")
        for protocol, skews in series:
            mine = [r for r in rows if (r.protocol, r.delays, r.skews) == (protocol, d, skews)]
            fixed = sorted((r for r in mine if r.link_us is not None), key=lambda r: r.delta_ms or 0)
            label = f"{protocol.removeprefix('casd ')}, skews {skews}"
            (handle,) = lat.plot([r.delta_ms for r in fixed], [r.latency_ms for r in fixed], marker="o", label=label)
            bad.plot([r.delta_ms for r in fixed], [100 * r.violation_rate for r in fixed], marker="o",
                     color=handle.get_color(), label=label)
            for r in (r for r in mine if r.link_us is None):
                lat.plot([r.delta_ms], [r.latency_ms], marker="*", markersize=12, color=handle.get_color())
                bad.plot([r.delta_ms], [100 * r.violation_rate], marker="*", markersize=12, color=handle.get_color())
        lat.set(xscale="log", yscale="log", xlabel="Delta (ms; star: learned)", ylabel="delivery latency (ms)",
                title=f"{d} delays: latency")
        bad.set(xscale="log", xlabel="Delta (ms; star: learned)", ylabel="broadcasts with a violation (%)",
                title=f"{d} delays: CASD violations (PBFT: none)")
        for ax in (lat, bad):
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        lat.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        lat.legend(fontsize=7)
        bad.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
