"""What the Redis store adds to each HTTP request, against the memory store.

    python -m relay.testing.store_bench [--requests 5000]

Starts a throwaway redis-server and two `relay serve` processes on this
machine, one per backend, and sends them the same sequence of ``GET /healthz``
(every one goes through the per-IP bucket), alternating so both see the same
machine load. Prints the median and p99 latency of each and the difference of
the medians: the added cost per request.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
import trio

from relay.testing.daemon import running_daemon
from relay.testing.redis_server import running_redis

LIMITS = {"http_per_minute": 10**9}


async def bench(requests: int, warmup: int) -> dict[str, list[float]]:
    async with (
        running_redis() as redis,
        running_daemon({"limits": LIMITS}) as memory,
        running_daemon(
            {"limits": LIMITS, "store": {"backend": "redis", "redis_url": redis.url}}
        ) as shared,
        httpx.AsyncClient(base_url=memory.http_url) as to_memory,
        httpx.AsyncClient(base_url=shared.http_url) as to_redis,
    ):
        clients = {"memory": to_memory, "redis": to_redis}
        samples: dict[str, list[float]] = {name: [] for name in clients}
        for i in range(warmup + requests):
            for name, client in clients.items():
                start = time.perf_counter()
                response = await client.get("/healthz")
                elapsed = time.perf_counter() - start
                assert response.status_code == 200, response.status_code
                if i >= warmup:
                    samples[name].append(elapsed)
        return samples


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m relay.testing.store_bench")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    args = parser.parse_args()
    samples = trio.run(bench, args.requests, args.warmup)
    medians = {}
    for name, values in samples.items():
        values.sort()
        medians[name] = statistics.median(values)
        p99 = values[int(len(values) * 0.99)]
        print(f"{name:6} median {medians[name] * 1e6:7.0f} µs   p99 {p99 * 1e6:7.0f} µs")
    added = medians["redis"] - medians["memory"]
    print(f"added by the redis store: {added * 1e6:.0f} µs per request (median, n={args.requests})")


if __name__ == "__main__":
    main()
