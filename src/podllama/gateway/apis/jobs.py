"""Long work started over the API (update, rebuild): one at a time, in a thread, its progress kept for polling."""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    id: str
    kind: str
    params: dict[str, Any]
    state: str = "running"  # running | done | failed
    started: float = field(default_factory=time.time)
    finished: float | None = None
    lines: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)  # e.g. bytes done per file, updated in place
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def to_dict(self, with_log: bool = False) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("lines", "cancel")}
        d["last"] = self.lines[-1] if self.lines else None
        d["cancelled"] = self.cancel.is_set()
        if with_log:
            d["log"] = self.lines
        return d


class Jobs:
    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def running(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.state == "running"), None)

    def start(self, kind: str, params: dict[str, Any], work: Callable[[Job], Any]) -> Job:
        """Run WORK(job) in a thread; it reports with job.lines / job.progress and may honour job.cancel."""
        with self._lock:
            busy = self.running()
            if busy is not None:
                raise RuntimeError(f"job {busy.id} ({busy.kind}) is still running")
            job = Job(uuid.uuid4().hex[:12], kind, params)
            self.jobs[job.id] = job

        def run() -> None:
            try:
                result = work(job)
                job.result = result.to_dict() if hasattr(result, "to_dict") else result
                job.state = "done"
            except Exception as e:  # the job's error is its result
                job.error, job.state = str(e), "cancelled" if job.cancel.is_set() else "failed"
                job.lines.append("".join(traceback.format_exception_only(e)).strip())
            finally:
                job.finished = time.time()

        threading.Thread(target=run, name=f"podllama-job-{job.id}", daemon=True).start()
        return job
