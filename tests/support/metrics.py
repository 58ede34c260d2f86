"""What a process's Prometheus endpoint says, read as an operator's scraper would."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


async def metric(port: int | None, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of the samples of `name` with `labels` that the process serving /metrics on
    `port` exposes (0 when absent)."""
    assert port is not None
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    wanted = (labels or {}).items()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in wanted)
    )
