"""The gateway's own Prometheus metrics: requests, errors, latency and time to first byte (histograms), in
flight — by endpoint and server; requests and tokens by key and model; the request log's rows written, waiting
and dropped; the event loop's lag (a histogram, from a timer that notes how late it runs). Plain counters (no
global registry), rendered on /metrics."""

from __future__ import annotations

import asyncio
import bisect
from collections import defaultdict
from collections.abc import Callable

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
LAG_EVERY = 0.05  # seconds between the loop-lag monitor's timers


class Histogram:
    __slots__ = ("buckets", "counts", "sum", "n", "max")

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.n = 0
        self.max = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.n += 1
        self.max = max(self.max, value)

    def lines(self, name: str, labels: str) -> list[str]:
        """Prometheus lines; LABELS: 'a="x",' or ''."""
        out, acc = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            acc += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels}le="{le}"}} {acc}')
        plain = labels.rstrip(",")
        return [*out, f"{name}_sum{{{plain}}} {self.sum:.6f}", f"{name}_count{{{plain}}} {self.n}"]

    def quantile(self, q: float) -> float:
        """An upper bound on the Q quantile (the bucket it falls in); inf past the last bucket."""
        wanted, acc = q * self.n, 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            acc += count
            if acc >= wanted:
                return bound
        return float("inf")


async def watch_loop(histogram: Histogram, stop: asyncio.Event, every: float = LAG_EVERY) -> None:
    """Measure the event loop's lag until STOP: how much later than asked each timer ran."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        asked = loop.time() + every
        await asyncio.sleep(every)
        histogram.observe(max(0.0, loop.time() - asked))


class Metrics:
    def __init__(self, log_state: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)) -> None:
        """LOG_STATE: the request log's rows written, waiting and dropped."""
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)  # endpoint, server, status
        self.errors: dict[tuple[str, str, str], int] = defaultdict(int)  # endpoint, server, kind
        self.latency: dict[tuple[str, str], Histogram] = defaultdict(Histogram)
        self.ttfb: dict[tuple[str, str], Histogram] = defaultdict(Histogram)
        self.in_flight: dict[tuple[str, str], int] = defaultdict(int)
        self.by_key: dict[tuple[str, str], int] = defaultdict(int)  # key name, model → requests
        self.tokens: dict[tuple[str, str, str], int] = defaultdict(int)  # key name, model, prompt|completion
        self.log_state = log_state
        self.loop_lag = Histogram(LAG_BUCKETS)

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

    def render(self, servers: set[str] | None = None, models: set[str] | None = None, key: str | None = None) -> str:
        """The metrics; with SERVERS, MODELS and KEY (what a scoped key may see), only the series of those servers
        and models, and the usage of that key."""
        def mine(k: str, m: str) -> bool:
            return (key is None or k == key) and (models is None or m in models)

        out = [
            "# HELP podllama_requests_total Requests through the gateway.",
            "# TYPE podllama_requests_total counter",
            *(f'podllama_requests_total{{endpoint="{e}",server="{s}",status="{c}"}} {n}'
              for (e, s, c), n in sorted(self.requests.items()) if servers is None or s in servers),
            "# HELP podllama_errors_total Failed requests (upstream down, broken off, timed out, refused).",
            "# TYPE podllama_errors_total counter",
            *(f'podllama_errors_total{{endpoint="{e}",server="{s}",kind="{k}"}} {n}'
              for (e, s, k), n in sorted(self.errors.items()) if servers is None or s in servers),
            "# HELP podllama_requests_in_flight Requests being answered now.",
            "# TYPE podllama_requests_in_flight gauge",
            *(f'podllama_requests_in_flight{{endpoint="{e}",server="{s}"}} {n}'
              for (e, s), n in sorted(self.in_flight.items()) if servers is None or s in servers),
            "# HELP podllama_key_requests_total Requests forwarded, by key name and model (none: no key needed).",
            "# TYPE podllama_key_requests_total counter",
            *(f'podllama_key_requests_total{{key="{_label(k)}",model="{_label(m)}"}} {n}'
              for (k, m), n in sorted(self.by_key.items()) if mine(k, m)),
            "# HELP podllama_tokens_total Tokens the servers reported, by key name, model and type.",
            "# TYPE podllama_tokens_total counter",
            *(f'podllama_tokens_total{{key="{_label(k)}",model="{_label(m)}",type="{t}"}} {n}'
              for (k, m, t), n in sorted(self.tokens.items()) if mine(k, m)),
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
                if servers is None or s in servers:
                    out += h.lines(name, f'endpoint="{e}",server="{s}",')
        out += ["# HELP podllama_event_loop_lag_seconds How late the gateway's event loop ran a timer (a stall "
                "delays every request).", "# TYPE podllama_event_loop_lag_seconds histogram",
                *self.loop_lag.lines("podllama_event_loop_lag_seconds", ""),
                "# HELP podllama_event_loop_lag_max_seconds The longest event-loop stall since the gateway started.",
                "# TYPE podllama_event_loop_lag_max_seconds gauge",
                f"podllama_event_loop_lag_max_seconds {self.loop_lag.max:.6f}"]
        return "\n".join(out) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
