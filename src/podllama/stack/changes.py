"""Changing a running stack's config: validate → diff against what runs → plan → apply → persist.

Validation is complete before anything changes: the schema, every server's args against the flags of the
image it will run, the models present. The plan restarts only the servers the change touches. The file is
replaced atomically (atomic_write) and versioned by a hash of its text (the API's ETag); edits of single
servers keep the rest of the file, comments included.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tomlkit

from .. import config
from ..atomic import atomic_write
from ..config import ConfigError
from . import Plan, Stack, StackError, Unit


class ChangeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Change:
    text: str
    cfg: config.Config
    stack: Stack
    units: list[Unit] = field(default_factory=list)
    plan: Plan = field(default_factory=Plan)


def version_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def current_text(stack: Stack) -> str:
    if stack.cfg.source is None:
        raise ChangeError(409, "this gateway has no config file to change")
    return stack.cfg.source.read_text()


def propose(stack: Stack, text: str) -> Change:
    """Check a whole new services.toml against what runs; nothing is changed."""
    try:
        cfg = config.parse(text, source=stack.cfg.source)
    except ConfigError as e:
        raise ChangeError(422, str(e)) from None
    for key in ("name", "engine", "models_dir"):
        if getattr(cfg.stack, key) != getattr(stack.cfg.stack, key):
            raise ChangeError(422, f"stack.{key} cannot change while the stack runs; stop it, edit the file, "
                                   "start it again")
    new = Stack(cfg, stack.engine, stack.progress, hw=stack.hw, default_variant=stack.default_variant)
    problems = new.missing_models(list(cfg.servers))
    if problems:
        raise ChangeError(422, "\n".join(problems))
    try:
        units = new.units()
    except StackError as e:
        raise ChangeError(422, str(e)) from None
    return Change(text, cfg, new, units, new.plan(None, units))


def submit(stack: Stack, edit: Callable[[str], str], if_match: str | None = None, dry_run: bool = False,
           wait: bool = True) -> Change:
    """One change, start to end: under the stack's operation lock the current file is read, checked against
    IF_MATCH (412 when it changed since), edited by EDIT, validated and planned; unless DRY_RUN it is then
    written (atomically) and applied. The changed servers are waited for after the lock is let go."""
    with stack.state.operation():
        current = current_text(stack)
        if if_match is not None and if_match.strip().strip('"') not in (version_of(current), "*"):
            raise ChangeError(412, f"the config changed since version {if_match.strip()} was read (now "
                                   f"{version_of(current)}); GET it again and redo the change")
        change = propose(stack, edit(current))
        if dry_run:
            return change
        path = change.cfg.source
        assert path is not None
        atomic_write(path, change.text)
        change.stack.record_desired(change.plan, change.units)
        change.stack.apply(change.plan, change.units)
    changed = {s.container for s in change.plan.changes}
    if wait:
        change.stack.wait_ready([u for u in change.units if u.name in changed])
    return change


# -- editing one server, keeping the rest of the file -----------------------------------------------------------
def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def with_server(text: str, name: str, fields: dict[str, Any] | None) -> str:
    """TEXT with server NAME set to FIELDS (None: removed); comments and the other servers stay as they are."""
    doc = tomlkit.parse(text)
    servers = doc.get("servers")
    if servers is None:
        servers = tomlkit.table(is_super_table=True)
        doc["servers"] = servers
    if fields is None:
        if name in servers:
            del servers[name]
    else:
        table = tomlkit.table()
        for key, value in fields.items():
            if value is not None:
                table[key] = _inline(value) if isinstance(value, dict) else value
        servers[name] = table
    return tomlkit.dumps(doc)


def _inline(value: dict[str, Any]) -> Any:
    t = tomlkit.inline_table()
    t.update(value)
    return t


def server_fields(cfg: config.Config, name: str) -> dict[str, Any]:
    return cfg.servers[name].model_dump(mode="json", exclude_none=True, exclude_defaults=True) | {
        "model": cfg.servers[name].model, "role": cfg.servers[name].role}
