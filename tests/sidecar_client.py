"""Reading the sidecar of a daemon under test: plain GETs and parsed `/metrics`."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def get(url: str) -> tuple[int, str]:
    """Status and body of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(sidecar: str) -> dict[str, float]:
    """`/metrics` as {sample: value}; a labelled sample reads `name{label="value"}`."""
    status, text = get(sidecar + "/metrics")
    assert status == 200, text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def families(sidecar: str) -> dict[str, set[str]]:
    """`/metrics` as {family name: the sample names it has} (`_total`, `_bucket`, ...)."""
    status, text = get(sidecar + "/metrics")
    assert status == 200, text
    return {f.name: {s.name for s in f.samples} for f in text_string_to_metric_families(text)}
