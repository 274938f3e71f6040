"""The shadow run: for each llama-server the update touches, a shadow server on the current image and then one on
the candidate — the same model, arguments and mounts as the real server, on the stack's network but with no
name there and a kind of their own, so the gateway never routes to them and the supervisor never restarts them.
One shadow at a time, and only when the host has the memory the server is estimated to hold; the real servers
keep serving throughout. The same cases go to both; the answers are compared (compare.py).

Both builds are run as shadows, rather than the candidate against the live server, so that the comparison is
made under the same conditions — no live request batched beside a replayed one (llama.cpp's results depend on
the batch), the same cold start measured as load time — and so that live clients never wait behind the replay.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from ...engine import ContainerSpec, EngineError
from ...engine.health import OK, container_health
from ...models.memory import available_memory
from ...units import human
from ..spec import L_HASH, L_KIND, SERVER_PORT
from . import samples
from .cases import Case, deterministic, for_server
from .compare import Answer, ServerResult, compare, parse_stream
from .verdict import Verdict

if TYPE_CHECKING:
    from .. import Stack, Unit

SHADOW = "shadow"  # the kind label of a shadow container
CHECKS = "checks"  # where verdicts are kept, in the state directory


def shadow_name(stack: Stack, server: str) -> str:
    return f"{stack.name}-{server}-shadow"


def remove_all(stack: Stack) -> None:
    """Every shadow of the stack removed (a check that was killed leaves its shadow running)."""
    for name in stack.containers(SHADOW):
        stack.engine.remove(name)


def shadow_spec(stack: Stack, unit: Unit, image: str, build: str) -> ContainerSpec:
    """UNIT's container as a shadow on IMAGE: no network alias (it is never routed), no hash (no start plan
    takes it for a server), the kind label `shadow` (the gateway and the supervisor look at `server` only)."""
    labels = {k: v for k, v in unit.spec.labels.items() if k != L_HASH} | {L_KIND: SHADOW, "podllama.build": build}
    return dataclasses.replace(unit.spec, name=shadow_name(stack, unit.server), image=image, labels=labels,
                               network_aliases=[], restart=None)


def replay(url: str, key: str | None, cases: list[Case], timeout: float) -> list[Answer]:
    """Each case sent to the server at URL in turn, each on a connection of its own (a kept-alive connection the
    server has meanwhile closed would read as a build that does not answer); a case that fails to get an answer
    is status 0, its body what the transport said."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    out = []
    with httpx.Client(base_url=url, headers=headers, timeout=timeout,
                      limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for case in cases:
            t0 = time.monotonic()
            try:
                r = client.post(case.path, json=deterministic(case.path, case.body))
            except httpx.HTTPError as e:
                out.append(Answer(0, body=str(e), seconds=time.monotonic() - t0))
                continue
            answer = Answer(r.status_code, seconds=time.monotonic() - t0)
            if "text/event-stream" in r.headers.get("content-type", ""):
                answer.events, answer.framing = parse_stream(r.content)
            else:
                try:
                    answer.body = r.json()
                except ValueError:
                    answer.body = r.text[:200]
            out.append(answer)
    return out


def run_shadow(stack: Stack, unit: Unit, image: str, build: str, cases: list[Case]) -> tuple[float, list[Answer]]:
    """A shadow of UNIT on IMAGE: started, waited for, replayed to, removed. (load seconds, answers)"""
    engine, name = stack.engine, shadow_name(stack, unit.server)
    engine.remove(name)  # one left by a check that was killed
    t0 = time.monotonic()
    engine.run(shadow_spec(stack, unit, image, build))
    try:
        deadline = t0 + stack.cfg.stack.ready_timeout
        while True:
            info = engine.inspect(name)
            if info is None or not info.running:
                raise EngineError(f"the {build} build's shadow of {unit.server} exited while loading. Last log "
                                  f"lines:\n{stack.tail(name)}")
            if container_health(engine, info, SERVER_PORT) == OK and info.ip:
                break
            if time.monotonic() > deadline:
                raise EngineError(f"the {build} build's shadow of {unit.server} was not ready after "
                                  f"{stack.cfg.stack.ready_timeout:.0f}s ([stack] ready_timeout)")
            time.sleep(0.2)
        loaded = time.monotonic() - t0
        answers = replay(f"http://{info.ip}:{SERVER_PORT}", stack.credentials.server_key(), cases,
                         stack.cfg.update.timeout)
        return loaded, answers
    finally:
        engine.remove(name)


def memory_problem(stack: Stack, server: str) -> str | None:
    """Why a shadow of SERVER does not fit on the host now (None: it does). GPU memory is not checked here."""
    need = stack.estimate(server).devices.get("cpu", 0)
    have = available_memory()
    if need > have:
        return (f"a shadow needs about {human(need)} of memory and the host has {human(have)} free; "
                "stop other servers or run `podllama update --no-check`")
    return None


def check_server(stack: Stack, unit: Unit, current: str, candidate: str,
                 progress: Callable[[str], None]) -> ServerResult:
    """UNIT's server on the CURRENT image and on the CANDIDATE image, the same cases replayed on both."""
    server = stack.cfg.servers[unit.server]
    result = ServerResult(unit.server)
    cases = for_server(server) + samples.cases(stack.cfg, stack.credentials, unit.server)
    if not cases:
        result.skipped = f"no conformance cases for role {server.role}"
        return result
    if why := memory_problem(stack, unit.server):
        result.skipped = why
        return result
    progress(f"{unit.server}: {len(cases)} cases on the current build, then on the candidate")
    was_load, was = run_shadow(stack, unit, current, "current", cases)
    now_load, now = run_shadow(stack, unit, candidate, "candidate", cases)
    result.load_seconds = (round(was_load, 2), round(now_load, 2))
    result.outcomes = [compare(c, b, a, stack.cfg.update) for c, b, a in zip(cases, was, now, strict=True)]
    result.sum_up(stack.cfg.update)
    return result


def check(stack: Stack, current: dict[str, str], old: str, new: str,
          progress: Callable[[str], None] = lambda m: None) -> Verdict:
    """The candidate builds (what each variant's tag points to now) against the CURRENT ones (variant → image
    id) on every llama-server of those variants; the verdict saved in the state directory's checks/."""
    t0 = time.monotonic()
    verdict = Verdict(old, new, stack.cfg.update.gate)
    for unit in stack.units():
        server = stack.cfg.servers[unit.server]
        variant = stack.variant_of(server)
        if unit.replica != 1 or not server.kind.llama or variant not in current:
            continue
        candidate = stack.engine.image_id(unit.spec.image) or unit.spec.image
        verdict.servers.append(check_server(stack, unit, current[variant], candidate, progress))
    verdict.seconds = time.monotonic() - t0
    verdict.save(stack.cfg.state_path / CHECKS)
    return verdict
