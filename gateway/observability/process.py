"""What /metrics says about the process rather than its requests: the process_* metrics every
Prometheus client library exports, and gateway_build_info.

The process values are read from the kernel (/proc, through prometheus_client's
ProcessCollector, which reports nothing where there is no /proc) when /metrics is rendered and
each time a worker publishes its metrics for the others — never per request.  How several
workers' values add up is declared with the metrics (metrics.py).
"""

from __future__ import annotations

import platform
from collections.abc import Callable

from prometheus_client.process_collector import ProcessCollector

from gateway._compiled import compiled_modules
from gateway.observability.metrics import GatewayMetrics


def build_labels(version: str) -> tuple[str, str, str]:
    """gateway_build_info's labels: the version, the Python version ("3.11.7"), and "true"
    when the hot path runs compiled (mypyc extensions beside the sources), else "false"."""
    return version, platform.python_version(), "true" if compiled_modules() else "false"


class ProcessSampler:
    """Copies this process's CPU time, resident memory, open descriptors and start time into
    the gateway's process_* metrics."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        # registry=None: read on demand here, never registered with prometheus_client's own
        self._collector = ProcessCollector(registry=None)
        #: ProcessCollector's sample name -> where its value goes (the rest is left out)
        self._setters: dict[str, Callable[[float], None]] = {
            "process_cpu_seconds_total": metrics.process_cpu_seconds_total.set_total,
            "process_resident_memory_bytes": metrics.process_resident_memory_bytes.set,
            "process_open_fds": metrics.process_open_fds.set,
            "process_start_time_seconds": metrics.process_start_time_seconds.set,
        }

    def sample(self) -> None:
        for family in self._collector.collect():
            for s in family.samples:
                setter = self._setters.get(s.name)
                if setter is not None:
                    setter(s.value)
