"""The verdict of a conformance check: what changed between the current build and the candidate, per server, as
JSON and as markdown, kept in the stack's state directory (`checks/`) beside the images' flags; the newest is
`checks/latest.json`, which `podllama status` and the dashboard show."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...atomic import atomic_write
from .compare import ServerResult

LATEST = "latest.json"


@dataclass
class Verdict:
    current: str  # the builds compared: commits (or image ids, where the commit is the same)
    candidate: str
    gate: str
    servers: list[ServerResult] = field(default_factory=list)
    seconds: float = 0.0
    at: float = field(default_factory=time.time)
    report: str | None = None  # where the markdown was written

    @property
    def differences(self) -> list[str]:
        return [f"{s.server}: {d}" for s in self.servers for d in s.all_differences] + \
            [f"{s.server}: not checked: {s.skipped}" for s in self.servers if s.skipped]

    @property
    def passed(self) -> bool:
        return not self.differences

    @property
    def summary(self) -> str:
        checked = [s for s in self.servers if not s.skipped]
        cases = sum(len(s.outcomes) for s in checked)
        if self.passed:
            return f"the candidate answers as the current build: {cases} cases on {len(checked)} servers alike"
        n = len(self.differences)
        return f"{n} difference{'s' if n > 1 else ''}: " + "; ".join(self.differences[:3]) + \
            (" …" if len(self.differences) > 3 else "")

    def to_dict(self) -> dict[str, Any]:
        return {"current": self.current, "candidate": self.candidate, "gate": self.gate, "passed": self.passed,
                "summary": self.summary, "differences": self.differences, "seconds": round(self.seconds, 1),
                "at": self.at, "report": self.report, "servers": [s.to_dict() for s in self.servers]}

    def to_markdown(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.at))
        lines = [f"# Conformance: {self.current[:12]} → {self.candidate[:12]}", "",
                 f"{when}, gate `{self.gate}`, {self.seconds:.0f} s. "
                 f"**{'No differences' if self.passed else 'Differences found'}**: {self.summary}.", ""]
        for s in self.servers:
            lines.append(f"## {s.server}")
            if s.skipped:
                lines += ["", f"Not checked: {s.skipped}.", ""]
                continue
            facts = []
            if s.load_seconds:
                facts.append(f"load {s.load_seconds[0]:.1f} s → {s.load_seconds[1]:.1f} s")
            if s.speed is not None:
                facts.append(f"tokens/s ×{s.speed:.2f}")
            if s.text_equal is not None:
                facts.append(f"{s.text_equal:.0%} of texts equal")
            lines += ["", ", ".join(facts) + "." if facts else "", "", "| case | check | result |", "|---|---|---|"]
            for o in s.outcomes:
                detail = "; ".join(o.differences) or "same" + (
                    f" (cosine {o.cosine:.4f})" if o.cosine is not None else
                    "" if o.text_equal is None else " text" if o.text_equal else ", other text")
                lines.append(f"| {o.case} | {o.check} | {detail} |")
            lines += [f"\n{d}" for d in s.differences] + [""]
        return "\n".join(lines) + "\n"

    def save(self, directory: Path) -> Path:
        """Written as checks/<time>-<current>-<candidate>.md and .json, and as checks/latest.json."""
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(self.at))}-{self.current[:12]}-{self.candidate[:12]}"
        self.report = str(directory / f"{stem}.md")
        atomic_write(directory / f"{stem}.md", self.to_markdown())
        text = json.dumps(self.to_dict(), indent=1)
        atomic_write(directory / f"{stem}.json", text)
        atomic_write(directory / LATEST, text)
        return directory / f"{stem}.md"


def latest(directory: Path) -> dict[str, Any] | None:
    """The newest verdict, as saved (None: no check has run, or its file cannot be read)."""
    try:
        data = json.loads((directory / LATEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
