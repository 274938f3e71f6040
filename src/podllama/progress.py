"""Progress of long commands: named steps, each timed, with a count (objects compiled, bytes downloaded, build
steps) where there is one. On a terminal, a live line per step with a bar; elsewhere (CI logs, pipes) plain
lines: the step, its progress every few seconds, its end. A summary of every step's time closes the command.

Modules report through plain callbacks (`say(line)`, `advance(done, total, detail)`); only the CLI makes a
`Steps`, so nothing below it knows whether a terminal is watching.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

PLAIN_EVERY = 5.0  # seconds between progress lines when not on a terminal

# what build tools print about how far they are
_NINJA = re.compile(r"\[\s*(\d+)/(\d+)\]\s+(?:Building|Linking)")  # ninja (also inside BuildKit's "#12 3.4 …")
_BUILDAH_STEP = re.compile(r"^(?:\[(\d+)/(\d+)\] )?STEP (\d+)/(\d+): (.*)")  # podman/buildah ([stage] STEP n/N)
_BUILDKIT_STEP = re.compile(r"^#\d+ \[(?:[\w-]+ )?(\d+)/(\d+)\] (.*)")  # docker BuildKit (--progress=plain)


def build_progress(line: str) -> tuple[int, int, str] | None:
    """(done, total, what) from one line of an image build's output, or None."""
    m = _NINJA.search(line)
    if m:
        return int(m.group(1)), int(m.group(2)), "objects compiled"
    m = _BUILDAH_STEP.match(line)
    if m:
        stage = f"stage {m.group(1)}/{m.group(2)}: " if m.group(1) else ""
        return int(m.group(3)), int(m.group(4)), (stage + m.group(5))[:60]
    m = _BUILDKIT_STEP.match(line)
    if m:
        return int(m.group(1)), int(m.group(2)), m.group(3)[:60]
    return None


@dataclass
class Step:
    title: str
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    failed: bool = False
    _advance: Callable[[int | None, int | None, str], None] = field(default=lambda d, t, s: None, repr=False)
    _say: Callable[[str], None] = field(default=lambda s: None, repr=False)

    def advance(self, done: int | None, total: int | None = None, detail: str = "") -> None:
        self._advance(done, total, detail)

    def say(self, line: str) -> None:
        self._say(line)

    def on_build_line(self, line: str) -> None:
        """Feed a line of build output: the step advances where the line says how far the build is."""
        found = build_progress(line)
        if found is not None:
            self.advance(*found)


class Steps:
    def __init__(self, console: Console, live: bool | None = None) -> None:
        self.console = console
        self.live = console.is_terminal if live is None else live
        self.done: list[Step] = []
        self._bar: Progress | None = None

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Step]:
        step = Step(title)
        with self._live_step(step) if self.live else self._plain_step(step):
            try:
                yield step
            except BaseException:
                step.failed = True
                raise
            finally:
                step.seconds = time.monotonic() - step.started
                self.done.append(step)

    @contextlib.contextmanager
    def _live_step(self, step: Step) -> Iterator[None]:
        bar = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                       TextColumn("{task.fields[count]}", markup=False), TimeElapsedColumn(), console=self.console,
                       transient=True)
        task: TaskID = bar.add_task(escape(step.title), total=None, count="")

        def advance(done: int | None, total: int | None, detail: str) -> None:
            count = f"{done}/{total} {detail}".strip() if done is not None and total else detail
            bar.update(task, completed=done or 0, total=total or None, count=count[:50])

        step._advance = advance
        step._say = lambda line: bar.console.print(f"  [dim]{escape(line)}[/dim]", highlight=False)
        try:
            with bar:
                yield
        finally:
            mark = "[red]✗[/red]" if step.failed else "[green]✓[/green]"
            self.console.print(f"{mark} {escape(step.title)} [dim]({_duration(step.seconds or 0)})[/dim]", highlight=False)

    @contextlib.contextmanager
    def _plain_step(self, step: Step) -> Iterator[None]:
        self.console.print(escape(f"==> {step.title}"), highlight=False)
        last = [0.0]

        def advance(done: int | None, total: int | None, detail: str) -> None:
            now = time.monotonic()
            finished = done is not None and total is not None and done >= total
            if now - last[0] >= PLAIN_EVERY or finished:
                last[0] = now
                where = f"{done}/{total}" if done is not None and total else ""
                self.console.print(escape(f"    {where} {detail}".rstrip()), highlight=False)

        step._advance = advance
        step._say = lambda line: self.console.print(escape(f"    {line}"), highlight=False)
        try:
            yield
        finally:
            self.console.print(f"    {'failed' if step.failed else 'done'} in {_duration(step.seconds or 0)}",
                               highlight=False)

    def summary(self) -> None:
        """The time of every step, and in all."""
        if not self.done:
            return
        width = max(len("in all"), *(len(s.title) for s in self.done))
        self.console.print("[bold]steps[/bold]" if self.live else "steps", highlight=False)
        for s in self.done:
            self.console.print(f"  {s.title:<{width}}  {_duration(s.seconds or 0):>7}{'  failed' if s.failed else ''}",
                               highlight=False)
        self.console.print(f"  {'in all':<{width}}  {_duration(sum(s.seconds or 0 for s in self.done)):>7}",
                           highlight=False)

    def as_json(self) -> list[dict[str, object]]:
        return [{"step": s.title, "seconds": round(s.seconds or 0, 1), "failed": s.failed} for s in self.done]


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
