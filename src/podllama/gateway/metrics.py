"""The gateway's own Prometheus metrics: requests, errors, latency and time to first byte (histograms), in
flight — by endpoint and server; requests and tokens by key and model; the request log's rows written, waiting
and dropped. Plain counters (no global registry), rendered on /metrics."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    __slots__ = ("counts", "sum", "n")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value
        self.n += 1


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)  # endpoint, server, status
        self.errors: dict[tuple[str, str, str], int] = defaultdict(int)  # endpoint, server, kind
        self.latency: dict[tuple[str, str], Histogram] = defaultdict(Histogram)
        self.ttfb: dict[tuple[str, str], Histogram] = defaultdict(Histogram)
        self.in_flight: dict[tuple[str, str], int] = defaultdict(int)
        self.by_key: dict[tuple[str, str], int] = defaultdict(int)  # key name, model → requests
        self.tokens: dict[tuple[str, str, str], int] = defaultdict(int)  # key name, model, prompt|completion
        self.log_state: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)  # written, waiting, dropped

    def done(self, endpoint: str, server: str, status: int, seconds: float, ttfb: float | None) -> None:
        self.requests[(endpoint, server, str(status))] += 1
        self.latency[(endpoint, server)].observe(seconds)
        if ttfb is not None:
            self.ttfb[(endpoint, server)].observe(ttfb)
        if status >= 500:
            self.errors[(endpoint, server, "upstream" if status != 503 else "unavailable")] += 1

    def usage(self, key: str, model: str, prompt: int | None, completion: int | None) -> None:
        self.by_key[(key or "none", model)] += 1
        if prompt:
            self.tokens[(key or "none", model, "prompt")] += prompt
        if completion:
            self.tokens[(key or "none", model, "completion")] += completion

    def error(self, endpoint: str, server: str, kind: str) -> None:
        self.errors[(endpoint, server, kind)] += 1

    def render(self) -> str:
        out = [
            "# HELP podllama_requests_total Requests through the gateway.",
            "# TYPE podllama_requests_total counter",
            *(f'podllama_requests_total{{endpoint="{e}",server="{s}",status="{c}"}} {n}'
              for (e, s, c), n in sorted(self.requests.items())),
            "# HELP podllama_errors_total Failed requests (upstream down, broken off, timed out, refused).",
            "# TYPE podllama_errors_total counter",
            *(f'podllama_errors_total{{endpoint="{e}",server="{s}",kind="{k}"}} {n}'
              for (e, s, k), n in sorted(self.errors.items())),
            "# HELP podllama_requests_in_flight Requests being answered now.",
            "# TYPE podllama_requests_in_flight gauge",
            *(f'podllama_requests_in_flight{{endpoint="{e}",server="{s}"}} {n}'
              for (e, s), n in sorted(self.in_flight.items())),
            "# HELP podllama_key_requests_total Requests forwarded, by key name and model (none: no key needed).",
            "# TYPE podllama_key_requests_total counter",
            *(f'podllama_key_requests_total{{key="{_label(k)}",model="{_label(m)}"}} {n}'
              for (k, m), n in sorted(self.by_key.items())),
            "# HELP podllama_tokens_total Tokens the servers reported, by key name, model and type.",
            "# TYPE podllama_tokens_total counter",
            *(f'podllama_tokens_total{{key="{_label(k)}",model="{_label(m)}",type="{t}"}} {n}'
              for (k, m, t), n in sorted(self.tokens.items())),
        ]
        written, waiting, dropped = self.log_state()
        out += ["# HELP podllama_request_log_rows_total Rows of the request log: written, waiting, dropped (queue full).",
                "# TYPE podllama_request_log_rows_total gauge",
                f'podllama_request_log_rows_total{{state="written"}} {written}',
                f'podllama_request_log_rows_total{{state="waiting"}} {waiting}',
                f'podllama_request_log_rows_total{{state="dropped"}} {dropped}']
        for name, help_, hists in (
            ("podllama_request_duration_seconds", "Time from request to the end of the response.", self.latency),
            ("podllama_time_to_first_byte_seconds", "Time from request to the response's first byte.", self.ttfb),
        ):
            out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
            for (e, s), h in sorted(hists.items()):
                labels = f'endpoint="{e}",server="{s}"'
                acc = 0
                for bound, count in zip((*BUCKETS, float("inf")), h.counts, strict=True):
                    acc += count
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    out.append(f'{name}_bucket{{{labels},le="{le}"}} {acc}')
                out += [f"{name}_sum{{{labels}}} {h.sum:.6f}", f"{name}_count{{{labels}}} {h.n}"]
        return "\n".join(out) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
