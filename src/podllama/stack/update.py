"""`podllama update` and `podllama rebuild`: new llama-server images under running servers, never leaving a
broken stack. The order is build → smoke test → restart servers one at a time (each healthy before the next);
if any step fails, the submodule, the image tags and every server go back to where they were.

An update that was itself killed midway is finished by the next one: the submodule is already at the new
commit, so that one finds the images still built from the old commit (and builds them) or servers still on
the old image (and restarts them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..build import images, source
from ..build.errors import BuildError
from ..engine import EngineError
from . import L_HASH, Stack, StackError, Unit, container_name
from .conformance import shadow
from .conformance.verdict import Verdict
from .state import RUNNING


class UpdateError(Exception):
    """An update or rebuild that failed and was rolled back; the message says what failed and where the log is."""


@dataclass
class UpdateResult:
    ok: bool
    summary: str
    old_commit: str | None = None
    new_commit: str | None = None
    restarted: list[str] = field(default_factory=list)
    log: str | None = None
    check: dict[str, Any] | None = None  # the conformance verdict (conformance/verdict.py), where one was made

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def update(stack: Stack, ref: str = "HEAD", remote: str | None = None, progress: Callable[[str], None] = print,
           build: Callable[..., images.BuildResult] | None = None, check: bool | None = None,
           only_check: bool = False) -> UpdateResult:
    """Move llama.cpp to REF, build and smoke-test the images the stack uses, check the new build against the
    current one (CHECK; default [update] check), restart its servers. ONLY_CHECK: build and check, then put
    everything back as it was, whatever the verdict."""
    root = source.project_root()
    with stack.state.operation():  # the supervisor waits until we are done
        old, new = source.checkout(ref, remote, root)
        variants = _variants(stack)
        if new == old and not only_check:
            built_from = {v: stack.engine.image_labels(stack.image_of(v)).get("podllama.llama-commit") for v in variants}
            behind = {v: c for v, c in built_from.items() if c and c != new}
            if behind:  # an update killed after the checkout, before its images were built and tagged
                was = next(iter(behind.values()))
                progress(f"finishing an interrupted update: llama.cpp is at {new[:12]}, the "
                         f"{', '.join(behind)} image at {was[:12]}")
                return _roll(stack, progress, build, old=was, new=new, variants=list(behind),
                             undo_source=lambda: source.checkout(was, root=root))
            if _stale(stack):  # … or after the images, before every server was restarted on them
                progress("finishing an interrupted update: servers still on the previous image")
                # the build is checked again (that update may have been killed during its check), against the
                # build the servers still run
                return _roll(stack, progress, build, old=new, new=new, variants=[], undo_source=lambda: None,
                             check=check, current=_running_builds(stack))
            result = UpdateResult(True, f"already at {new[:12]}; nothing to do", old, new)
            stack.state.record_update(result.to_dict())
            return result
        progress(f"llama.cpp {old[:12]} → {new[:12]}")
        return _roll(stack, progress, build, old=old, new=new, variants=variants,
                     undo_source=lambda: source.checkout(old, root=root), check=check, only_check=only_check)


def rebuild(stack: Stack, variants: list[str] | None = None, progress: Callable[[str], None] = print,
            build: Callable[..., images.BuildResult] | None = None, check: bool | None = None) -> UpdateResult:
    """Build the stack's images again at the current commit (after a GPU was added, a base image changed …)
    and restart the servers on them, with the same safety as an update."""
    commit = source.status().commit
    with stack.state.operation():
        return _roll(stack, progress, build, old=commit, new=commit, undo_source=lambda: None,
                     variants=variants or _variants(stack), check=check)


def _variants(stack: Stack) -> list[str]:
    """The llama-server variants the stack runs (the other kinds are built from their own pinned sources)."""
    return sorted({stack.variant_of(s) for s in stack.cfg.servers.values() if s.kind.llama})


def _stale(stack: Stack) -> bool:
    """Whether a server's container is missing or no longer matches its spec (another image, other settings)."""
    running = stack.containers("server")
    return any(u.name not in running or running[u.name].labels.get(L_HASH) != u.hash for u in stack.units()
               if not _idle(stack, u))


def _running_builds(stack: Stack) -> dict[str, str]:
    """Variant → the image its running llama-servers were made from, where that is not what its tag says now."""
    running = stack.containers("server")
    out = {}
    for name, section in stack.cfg.servers.items():
        variant = stack.variant_of(section)
        info = running.get(container_name(stack.name, name, 1))
        if section.kind.llama and info is not None and info.image_id \
                and info.image_id != stack.engine.image_id(stack.image_of(variant)):
            out[variant] = info.image_id
    return out


def _idle(stack: Stack, unit: Unit) -> bool:
    """An on-demand server that is not loaded: its next load starts it on whatever image is current."""
    return unit.on_demand and stack.state.desired(unit.key) != RUNNING


def _roll(stack: Stack, progress: Callable[[str], None], build: Callable[..., images.BuildResult] | None, *,
          old: str | None, new: str | None, undo_source: Callable[[], Any], variants: list[str],
          check: bool | None = None, only_check: bool = False, current: dict[str, str] | None = None) -> UpdateResult:
    """CURRENT: variant → the image the servers run now (default: what each variant's tag points to before
    its build)."""
    cfg, engine = stack.cfg, stack.engine
    build = build or _default_build(stack)
    moved: list[str] = []  # variants whose tag now points at a new image
    shadow.remove_all(stack)  # left by a check that was killed
    tags = {v: images.tags_of(engine, v, cfg.build.repository) for v in variants}  # to put back on undo
    if current is None:
        current = {v: in_use for v, (in_use, _) in tags.items() if in_use}
    verdict: Verdict | None = None

    def put_back() -> None:
        """The tags and the checkout as they were: this update's builds untagged, and a tag an interrupted
        update had moved pointed back at the build the servers run."""
        for v in moved:
            images.restore(engine, v, tags[v], repo=cfg.build.repository)
        for v, image in current.items():
            if v not in moved and engine.image_id(stack.image_of(v)) != image:
                engine.tag(image, stack.image_of(v))
        undo_source()

    def undo(what: str, log: str | None) -> UpdateError:
        put_back()
        stack.state.record_update(UpdateResult(False, f"{what}; rolled back to {(old or '?')[:12]}", old, new,
                                               log=log, check=verdict.to_dict() if verdict else None).to_dict())
        return UpdateError(f"{what}. Rolled back: llama.cpp at {(old or '?')[:12]}, images and servers as they were."
                           + (f" Log: {log}" if log else ""))

    for variant in variants:
        progress(f"building {variant} at {(new or '?')[:12]}")
        try:
            built = build(variant)
        except BuildError as e:
            raise undo(f"the {variant} image failed: {e}", str(e.log) if e.log else None) from None
        if built.previous:
            moved.append(variant)

    if only_check or (cfg.update.check if check is None else check):
        changed = {v: i for v, i in current.items() if engine.image_id(stack.image_of(v)) != i}
        if changed:
            progress("checking the new build against the current one on shadow servers")
            try:
                verdict = shadow.check(stack, changed, old or "?", new or "?", progress)
            except (StackError, EngineError) as e:
                raise undo(f"the conformance check could not run: {e} (`--no-check` skips it)", None) from None
            progress(f"conformance: {verdict.summary}; report {verdict.report}")
            if only_check:
                put_back()
                result = UpdateResult(verdict.passed, f"checked {(new or '?')[:12]} against {(old or '?')[:12]}, "
                                      f"nothing changed: {verdict.summary}", old, new, check=verdict.to_dict())
                stack.state.record_update(result.to_dict())
                return result
            if not verdict.passed and cfg.update.gate == "strict":
                error = undo(f"the new build answers differently — {verdict.summary} (report: {verdict.report}; "
                             "[update] gate = \"report\" lets such differences through)", None)
                raise error from None
    if only_check:  # nothing to compare: no image changed
        put_back()
        return UpdateResult(True, "checked: the build did not change any image; nothing changed", old, new)

    units = stack.units()
    restarted: list[Unit] = []
    for unit in units:
        info = engine.inspect(unit.name)
        if (info is not None and info.labels.get(L_HASH) == unit.hash and info.running) or _idle(stack, unit):
            continue  # already on the new image (or its variant was not rebuilt), or not loaded
        progress(f"restarting {unit.name} on the new image")
        try:
            stack.recreate(unit)
            restarted.append(unit)
            stack.wait_ready([unit])
        except (StackError, EngineError) as e:
            error = undo(f"{unit.name} did not come back healthy on the new image: {e}", None)
            _restore(stack, progress)
            raise error from None
    result = UpdateResult(True, f"{(old or '?')[:12]} → {(new or '?')[:12]}: "
                                f"{len(restarted)} servers restarted", old, new, [u.name for u in restarted],
                          check=verdict.to_dict() if verdict else None)
    stack.state.record_update(result.to_dict())
    return result


def _restore(stack: Stack, progress: Callable[[str], None]) -> None:
    """Put every server back on the image its tag points to now (the old one, after the tags were rolled back)."""
    for unit in stack.units():
        info = stack.engine.inspect(unit.name)
        if (info is not None and info.labels.get(L_HASH) == unit.hash and info.running) or _idle(stack, unit):
            continue
        progress(f"restoring {unit.name} on the previous image")
        stack.recreate(unit)
        stack.wait_ready([unit])


def _default_build(stack: Stack) -> Callable[[str], images.BuildResult]:
    return lambda variant: images.build_configured(stack.engine, stack.cfg, variant, stack.hardware,
                                                   progress=stack.progress)
