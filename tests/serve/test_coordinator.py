"""The replicas' coordinator (plain asyncio; Ray runs it as an actor) and the sum of Prometheus texts."""

from __future__ import annotations

import asyncio

from xlora.serve.coordinator import Coordinator, merge_metrics


def test_metrics_of_replicas_add_up_family_by_family():
    a = ('# HELP x_total X.\n# TYPE x_total counter\nx_total{e="a"} 2\n# HELP h Hist.\n# TYPE h histogram\n'
         'h_bucket{le="1"} 1\nh_sum 0.500000\nh_count 1\n')
    b = ('# HELP x_total X.\n# TYPE x_total counter\nx_total{e="a"} 3\nx_total{e="b"} 1\n'
         '# HELP h Hist.\n# TYPE h histogram\nh_sum 0.25\n')
    assert merge_metrics([a, b]) == ('# HELP x_total X.\n# TYPE x_total counter\nx_total{e="a"} 5\nx_total{e="b"} 1\n'
                                     '# HELP h Hist.\n# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 0.750000\n'
                                     'h_count 1\n')


async def _replica(coord: Coordinator, name: str, log: list, counter: list[int]) -> None:
    """What a replica's follow loop does: answer each change with its text; note shutdown orders."""
    seen = (0, None)
    while True:
        scrape, grace = await coord.poll(name, seen)
        if grace != seen[1]:
            log.append((name, grace))
        seen = (scrape, grace)
        await coord.report(name, scrape, f"# TYPE n counter\nn {counter[0]}\n", idle=grace is not None)


def test_a_scrape_waits_for_every_live_replica_and_orders_reach_all():
    async def main():
        coord, log, counts = Coordinator(), [], {"r1": [3], "r2": [4]}
        tasks = [asyncio.create_task(_replica(coord, r, log, counts[r])) for r in counts]
        await asyncio.sleep(0.01)
        texts, live = await coord.collect(5.0)
        assert live == 2 and merge_metrics(texts) == "# TYPE n counter\nn 7\n"
        counts["r1"][0] = 10  # fresh numbers on every scrape
        assert merge_metrics((await coord.collect(5.0))[0]) == "# TYPE n counter\nn 14\n"
        assert not await coord.drained()
        await coord.begin_shutdown(30.0)
        await asyncio.sleep(0.01)
        assert sorted(log) == [("r1", 30.0), ("r2", 30.0)] and await coord.drained()
        await coord.begin_shutdown(60.0)  # a later order only ever brings the deadline closer
        await coord.begin_shutdown(0.0)  # (the second signal)
        await asyncio.sleep(0.01)
        assert sorted(log) == [("r1", 0.0), ("r1", 30.0), ("r2", 0.0), ("r2", 30.0)]
        tasks[1].cancel()
        await coord.report("r2", coord.scrape, "# TYPE n counter\nn 5\n", idle=True, leaving=True)
        texts, live = await coord.collect(0.5)  # a departed replica's last counters stay in the sum
        assert live == 1 and merge_metrics(texts) == "# TYPE n counter\nn 15\n"
        tasks[0].cancel()

    asyncio.run(main())


def test_a_silent_replica_delays_a_scrape_by_the_timeout_only():
    async def main():
        coord = Coordinator()
        poll = asyncio.create_task(coord.poll("mute", (0, None)))  # registers, then never reports
        await asyncio.sleep(0.01)
        texts, live = await asyncio.wait_for(coord.collect(0.2), 2.0)
        assert (texts, live) == ([], 1)
        poll.cancel()

    asyncio.run(main())
