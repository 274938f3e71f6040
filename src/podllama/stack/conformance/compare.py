"""Two answers to one case — the current build's and the candidate's — compared by what the case is (a table of
checks), and a server's whole replay summed up: the differences, the share of equal texts, the embeddings'
cosine, speed and load time."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from ...config import UpdateSection
from .cases import Case


@dataclass
class Answer:
    """What a server said to one case: the status, the JSON body (or the events of a stream), how long it took."""

    status: int
    body: Any = None
    events: list[Any] | None = None  # a streamed answer: each `data:` payload, parsed (the last may be "[DONE]")
    framing: str | None = None  # what is wrong with the stream's framing, if anything
    seconds: float = 0.0

    @property
    def text(self) -> str | None:
        if self.events is not None:
            return "".join(_delta(e) for e in self.events if isinstance(e, dict))
        b = self.body if isinstance(self.body, dict) else {}
        if b.get("choices"):
            c = b["choices"][0]
            return (c.get("message") or {}).get("content") if "message" in c else c.get("text")
        return b.get("content") if isinstance(b.get("content"), str) else None

    @property
    def tokens_per_second(self) -> float | None:
        """llama-server's own measure of generation speed (`timings`), where the answer has one."""
        last = self.events[-2] if self.events and len(self.events) > 1 else None
        for b in (self.body, last):
            t = b.get("timings") if isinstance(b, dict) else None
            if isinstance(t, dict) and isinstance(t.get("predicted_per_second"), (int, float)) \
                    and t.get("predicted_n", 1) > 1:
                return float(t["predicted_per_second"])
        return None


def _delta(event: dict[str, Any]) -> str:
    if event.get("choices"):
        d = event["choices"][0].get("delta") or {}
        return d.get("content") or ""
    return event.get("content") or ""


def parse_stream(raw: bytes) -> tuple[list[Any], str | None]:
    """The `data:` payloads of a server-sent event stream, and what is wrong with its framing (None: nothing):
    every event a `data:` line of JSON, events apart by a blank line, an OpenAI stream ended by [DONE]."""
    events: list[Any] = []
    problem = None
    for block in raw.decode("utf-8", "replace").replace("\r\n", "\n").split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if not lines:
            continue
        data = [ln[5:].lstrip() for ln in lines if ln.startswith("data:")]
        if len(data) != len(lines) - sum(ln.startswith(("event:", "id:", "retry:")) for ln in lines):
            problem = problem or f"a line that is not a field: {lines[0][:60]!r}"
        payload = "\n".join(data)
        if payload == "[DONE]":
            events.append("[DONE]")
            continue
        try:
            events.append(json.loads(payload))
        except ValueError:
            problem = problem or f"an event that is not JSON: {payload[:60]!r}"
    if not events:
        problem = problem or "no events"
    elif any(isinstance(e, dict) and "choices" in e for e in events) and events[-1] != "[DONE]":
        problem = problem or "the stream does not end with [DONE]"
    return events, problem


@dataclass
class Outcome:
    """One case compared."""

    case: str
    check: str
    differences: list[str] = field(default_factory=list)
    text_equal: bool | None = None
    cosine: float | None = None  # the lowest, over the embeddings of the case
    tokens_per_second: tuple[float, float] | None = None  # (current, candidate)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _tool_calls(a: Answer) -> tuple[list[str] | None, str | None]:
    """The names of the functions an answer calls, or why its tool calls do not parse."""
    try:
        msg = a.body["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return None, "no message"
    names = []
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "")
        except ValueError:
            return None, f"the arguments of {fn.get('name')!r} are not JSON"
        if not isinstance(args, dict):
            return None, f"the arguments of {fn.get('name')!r} are not an object"
        names.append(str(fn.get("name")))
    return names, None


def _check_tools(case: Case, base: Answer, cand: Answer, out: Outcome, policy: UpdateSection) -> None:
    was, _ = _tool_calls(base)
    now, why = _tool_calls(cand)
    if was and why:
        out.differences.append(f"tool calls no longer parse: {why}")
    elif was and now != was:
        out.differences.append(f"tool calls named {was} now name {now or 'nothing'}")


def _json_schema(case: Case) -> dict[str, Any] | None:
    rf = case.body.get("response_format") or {}
    return (rf.get("json_schema") or {}).get("schema") if rf.get("type") == "json_schema" else {"type": "object"}


def _json_ok(text: str | None, schema: dict[str, Any] | None) -> str | None:
    """Why TEXT is not JSON valid against SCHEMA (None: it is)."""
    try:
        value = json.loads(text or "")
    except ValueError:
        return "not JSON"
    try:
        jsonschema.validate(value, schema or {})
    except jsonschema.ValidationError as e:
        return f"not valid against its schema ({e.message[:80]})"
    except jsonschema.SchemaError:
        return None  # a schema the validator does not take: only JSON-ness is checked
    return None


def _check_json(case: Case, base: Answer, cand: Answer, out: Outcome, policy: UpdateSection) -> None:
    schema = _json_schema(case)
    if _json_ok(base.text, schema) is None and (why := _json_ok(cand.text, schema)):
        out.differences.append(f"the answer is {why}, where the current build's was valid")


def _check_stream(case: Case, base: Answer, cand: Answer, out: Outcome, policy: UpdateSection) -> None:
    if base.framing is None and cand.framing is not None:
        out.differences.append(f"the event stream is broken: {cand.framing}")


def _vectors(a: Answer) -> list[list[float]]:
    b = a.body
    if isinstance(b, dict) and isinstance(b.get("data"), list):  # OpenAI
        return [d.get("embedding") or [] for d in b["data"]]
    if isinstance(b, list):  # llama-server's own /embedding
        return [d.get("embedding") or [] for d in b if isinstance(d, dict)]
    return []


def cosine(u: list[float], v: list[float]) -> float:
    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
    return sum(x * y for x, y in zip(u, v, strict=True)) / (nu * nv) if nu and nv else (1.0 if nu == nv else 0.0)


def _check_embedding(case: Case, base: Answer, cand: Answer, out: Outcome, policy: UpdateSection) -> None:
    was, now = _vectors(base), _vectors(cand)
    if [len(v) for v in was] != [len(v) for v in now]:
        out.differences.append(f"embeddings changed shape: {[len(v) for v in was]} → {[len(v) for v in now]}")
        return
    if was:
        out.cosine = min(cosine(u, v) for u, v in zip(was, now, strict=True))
        if out.cosine < policy.min_cosine:
            out.differences.append(f"embeddings moved: cosine {out.cosine:.4f} to the current build's "
                                   f"(min_cosine {policy.min_cosine})")


def _order(a: Answer) -> list[int]:
    b = a.body if isinstance(a.body, dict) else {}
    rows = b.get("results") or b.get("data") or (a.body if isinstance(a.body, list) else [])
    rows = [r for r in rows if isinstance(r, dict)]
    return [r.get("index", -1) for r in sorted(rows, key=lambda r: -float(r.get("relevance_score", r.get("score", 0))))]


def _check_rerank(case: Case, base: Answer, cand: Answer, out: Outcome, policy: UpdateSection) -> None:
    if _order(base) != _order(cand):
        out.differences.append(f"rerank order {_order(base)} → {_order(cand)}")


def _check_text(case: Case, base: Answer, cand: Answer, out: Outcome, policy: UpdateSection) -> None:
    pass  # text equality is counted for every case with text; it differs only by share (min_text_equal)


CHECKS: dict[str, Callable[[Case, Answer, Answer, Outcome, UpdateSection], None]] = {
    "text": _check_text, "stream": _check_stream, "tools": _check_tools, "json": _check_json,
    "embedding": _check_embedding, "rerank": _check_rerank,
}


def compare(case: Case, base: Answer, cand: Answer, policy: UpdateSection) -> Outcome:
    out = Outcome(case.name, case.check)
    if base.status != cand.status:
        unanswered = "" if cand.status else f" (no answer: {str(cand.body)[:120]})"  # what the transport said
        out.differences.append(f"status {base.status} → {cand.status}{unanswered}")
        return out
    if base.status != 200:
        return out  # both refused it alike (a model without tools, say): nothing more to compare
    CHECKS[case.check](case, base, cand, out, policy)
    if case.check not in ("embedding", "rerank") and base.text is not None:
        out.text_equal = base.text == cand.text
    b, c = base.tokens_per_second, cand.tokens_per_second
    if b and c:
        out.tokens_per_second = (b, c)
    return out


@dataclass
class ServerResult:
    """One server's replay, summed up."""

    server: str
    outcomes: list[Outcome] = field(default_factory=list)
    load_seconds: tuple[float, float] | None = None  # (current, candidate)
    skipped: str | None = None  # why it was not checked
    differences: list[str] = field(default_factory=list)  # the server's own (speed, load, text share)

    @property
    def text_equal(self) -> float | None:
        seen = [o.text_equal for o in self.outcomes if o.text_equal is not None]
        return sum(seen) / len(seen) if seen else None

    @property
    def speed(self) -> float | None:
        """The candidate's tokens/s over the current build's, the median over the cases that measured both."""
        ratios = [c / b for b, c in (o.tokens_per_second for o in self.outcomes if o.tokens_per_second)]
        return statistics.median(ratios) if ratios else None

    @property
    def all_differences(self) -> list[str]:
        return [f"{o.case}: {d}" for o in self.outcomes for d in o.differences] + self.differences

    def sum_up(self, policy: UpdateSection) -> None:
        equal, speed = self.text_equal, self.speed
        if equal is not None and equal < policy.min_text_equal:
            self.differences.append(f"{equal:.0%} of answers are the same text (min_text_equal "
                                    f"{policy.min_text_equal:.0%})")
        if speed is not None and speed < 1 - policy.max_slowdown:
            self.differences.append(f"generates at {speed:.0%} of the current build's tokens/s "
                                    f"(max_slowdown {policy.max_slowdown:.0%})")
        if self.load_seconds:
            was, now = self.load_seconds
            if now > was * (1 + policy.max_slowdown) and now - was > 2:  # a second or two is noise on a busy host
                self.differences.append(f"loads in {now:.1f}s, the current build in {was:.1f}s "
                                        f"(max_slowdown {policy.max_slowdown:.0%})")

    def to_dict(self) -> dict[str, Any]:
        return {"server": self.server, "skipped": self.skipped, "load_seconds": self.load_seconds,
                "text_equal": self.text_equal, "speed": self.speed, "differences": self.all_differences,
                "cases": [o.to_dict() for o in self.outcomes]}
