"""Prefix-cache hit rate: token counters (queries, hits) read before and after a run, from wherever a target has
them (the in-process engine's step statistics, a server's Prometheus counters)."""

from __future__ import annotations

from runtime.bench import http

QUERIES = "tgis_prefix_cache_queries_total"
HITS = "tgis_prefix_cache_hits_total"

Counters = tuple[int, int] | None  # (prompt tokens looked up, tokens found); None: the target does not say


def hit_rate(before: Counters, after: Counters) -> float | None:
    """Hits per queried token during the run; None when the counters are missing or nothing was queried."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return (after[1] - before[1]) / (after[0] - before[0])


def parse_counters(text: str) -> Counters:
    """(queries, hits) summed over label sets from Prometheus text exposition; None unless both are exposed."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0].strip()
        if name in (QUERIES, HITS):
            totals[name] = totals.get(name, 0.0) + float(value)
    if QUERIES not in totals or HITS not in totals:
        return None
    return int(totals[QUERIES]), int(totals[HITS])


async def scrape(url: str | None) -> Counters:
    """The counters at a /metrics URL; None when there is no URL, it does not answer or lacks them."""
    if not url:
        return None
    try:
        status, body = await http.get(url)
        return parse_counters(body.decode("utf-8", errors="replace")) if status == 200 else None
    except (OSError, ValueError, TimeoutError):  # ValueError: not a URL, or not Prometheus text
        return None
