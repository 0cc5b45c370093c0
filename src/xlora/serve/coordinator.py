"""What the replicas of :mod:`xlora.serve.cluster` share: a coordinator (run as a Ray actor; plain
asyncio here) and the sum of their Prometheus texts.

The driver and the replicas never call each other: replicas long-poll :meth:`Coordinator.poll`, so
one call from the driver (a shutdown order) or from one replica (a ``/metrics`` scrape) reaches all.
"""

from __future__ import annotations

import asyncio
import contextlib


class Coordinator:
    """Replicas long-poll :meth:`poll` with the ``(scrape, grace)`` they have seen and answer each
    change with :meth:`report` (their Prometheus text, and whether they are idle)."""

    def __init__(self) -> None:
        self.cond = asyncio.Condition()
        self.scrape, self.grace = 0, None
        self.live: set[str] = set()
        self.texts: dict[str, str] = {}
        self.seen: dict[str, int] = {}
        self.idle: dict[str, bool] = {}

    async def poll(self, replica: str, seen: tuple[int, float | None]) -> tuple[int, float | None]:
        self.live.add(replica)
        async with self.cond:
            await self.cond.wait_for(lambda: (self.scrape, self.grace) != tuple(seen))
            return self.scrape, self.grace

    async def report(self, replica: str, scrape: int, text: str, idle: bool, leaving: bool = False) -> None:
        self.texts[replica], self.seen[replica], self.idle[replica] = text, scrape, idle
        if leaving:
            self.live.discard(replica)
        async with self.cond:
            self.cond.notify_all()

    async def collect(self, timeout_s: float) -> tuple[list[str], int]:
        """Every replica's text (a departed one's last) after a fresh scrape, and the live count."""
        async with self.cond:
            self.scrape += 1
            want = self.scrape
            self.cond.notify_all()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.cond.wait_for(
                    lambda: all(self.seen.get(r, 0) >= want for r in self.live)), timeout_s)
        return list(self.texts.values()), len(self.live)

    async def begin_shutdown(self, grace_s: float) -> None:
        async with self.cond:
            self.grace = grace_s if self.grace is None else min(self.grace, grace_s)
            self.cond.notify_all()

    async def drained(self) -> bool:
        """Whether every live replica reports idle. A replica is idle only once it has stopped accepting
        requests (``ReplicaApp.idle``), i.e. after it heard the shutdown order: an idle report is never
        one from before the order."""
        return all(self.idle.get(r, False) for r in self.live)


def merge_metrics(texts: list[str]) -> str:
    """Sum Prometheus texts sample by sample (our counters, histograms and gauges all add up)."""
    heads: dict[str, list[str]] = {}  # family -> its HELP and TYPE lines
    sums: dict[str, dict[str, float]] = {}  # family -> sample (name and labels) -> value
    floats: set[str] = set()
    for text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith("# "):
                family = line.split(" ", 3)[2]
                if line not in heads.setdefault(family, []):
                    heads[family].append(line)
            elif line.strip():
                key, value = line.rsplit(" ", 1)
                sums.setdefault(family, {})[key] = sums.get(family, {}).get(key, 0.0) + float(value)
                if not value.lstrip("-").isdigit():
                    floats.add(key)
    out = []
    for family, lines in heads.items():
        out += lines + [f"{k} {v:.6f}" if k in floats else f"{k} {int(v)}" for k, v in sums.get(family, {}).items()]
    return "\n".join(out) + "\n"
