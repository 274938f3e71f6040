"""llama-server's command-line flags: parsed from its own `--help`, and the `args` mapping rendered to them.

Each image records the `--help` of the binary it carries (/app/llama-server.help), so a config is checked
against the exact llama.cpp version that will run it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from ..config import ArgValue

_HEAD = re.compile(r"^((?:-[^\s,]+(?: [^\s,]+)*,\s*)*-[^\s,]+(?: [^\s,]+)*)")
_NAME = re.compile(r"(?:^|,\s*)(--?[A-Za-z0-9][^\s,]*)")

# Flags podllama sets itself, and the services.toml key to use instead.
RESERVED = {
    "model": "model", "m": "model", "alias": "alias", "a": "alias", "mmproj": "mmproj", "mm": "mmproj",
    "ctx-size": "ctx_size", "c": "ctx_size", "n-gpu-layers": "gpu_layers", "ngl": "gpu_layers",
    "gpu-layers": "gpu_layers", "host": "(the engine network)", "port": "(the engine network)",
    "api-key": "the gateway's keys", "api-key-file": "the gateway's keys",
    "embedding": "role = \"embedding\"", "embeddings": "role = \"embedding\"",
    "rerank": "role = \"rerank\"", "reranking": "role = \"rerank\"",
    "hf-repo": "model = \"hf://org/repo:QUANT\"", "hf": "model = \"hf://org/repo:QUANT\"",
    **dict.fromkeys(("spec-draft-model", "md", "model-draft", "spec-draft-hf", "hfd", "hfrd", "hf-repo-draft"),
                    "draft_model = \"FILE\" or \"hf://org/repo:QUANT\""),
}
SPECULATIVE = "--spec-"  # llama-server's speculative decoding flags: the server section's `speculative` table


class FlagError(ValueError):
    pass


@dataclass
class Flag:
    names: list[str]
    takes_value: bool
    negatives: list[str] = field(default_factory=list)


@dataclass
class FlagSet:
    flags: dict[str, Flag]  # every spelling ("--parallel", "-np", "--no-mmap") → its flag

    @classmethod
    def parse(cls, help_text: str, indent: int = 0) -> FlagSet:
        """The flags of a --help text, each at the start of a line or indented by at most INDENT spaces
        (llama-server starts them at the line's start and indents value lists; whisper-server and argparse
        indent flags by two)."""
        flags: dict[str, Flag] = {}
        for line in help_text.splitlines():
            if indent and len(line) - len(line.lstrip(" ")) <= indent:
                line = line.lstrip(" ")
            if not line.startswith("-") or line.startswith("--- ") or line.startswith("-----"):
                continue
            m = _HEAD.match(line)
            if not m:
                continue
            head = m.group(1)
            names = _NAME.findall(head)
            last = names[-1]
            takes_value = bool(head[head.rindex(last) + len(last):].strip())
            negatives = [n for n in names if n.startswith("--no-")] if len(names) > 1 else []
            flag = Flag(names=[n for n in names if n not in negatives], takes_value=takes_value, negatives=negatives)
            for n in names:
                flags[n] = flag
        return cls(flags)

    def __contains__(self, name: str) -> bool:
        return name in self.flags

    def __len__(self) -> int:
        return len({id(f) for f in self.flags.values()})

    def names(self) -> list[str]:
        return sorted(self.flags)

    def spelling(self, key: str) -> str | None:
        """The flag a services.toml key means: 'parallel' → '--parallel', 'np' → '-np', 'flash_attn' → '--flash-attn'."""
        dashed = key.replace("_", "-")
        for candidate in (f"--{dashed}", f"-{dashed}"):
            if candidate in self.flags:
                return candidate
        return None


def render(args: dict[str, ArgValue], known: FlagSet | None = None, table: str = "args") -> list[str]:
    """A mapping of flags as llama-server arguments. With KNOWN, every flag must exist in that llama-server.
    TABLE is the services.toml table they come from: `args` (any flag but those podllama sets, and the
    speculative ones), or `speculative` (the --spec-* flags, named without that prefix)."""
    prefix = SPECULATIVE.lstrip("-") if table == "speculative" else ""
    argv: list[str] = []
    for key, value in args.items():
        dashed = prefix + key.replace("_", "-")
        if table == "args" and dashed in RESERVED:
            raise FlagError(f"args.{key}: podllama sets --{dashed} itself; use {RESERVED[dashed]} in the server section")
        flag = f"--{dashed}" if len(dashed) > 2 else f"-{dashed}"
        spec = None
        if known is not None:
            spelled = known.spelling(dashed)
            if spelled is None:
                long_names = [n for n in known.names() if n.startswith(f"--{prefix}")]
                close = difflib.get_close_matches(f"--{dashed}", long_names, n=3, cutoff=0.8)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise FlagError(f"{table}.{key}: this llama-server has no flag --{dashed}{hint}; see `llama-server --help`")
            flag, spec = spelled, known.flags[spelled]
        speculative = next((n for n in (spec.names if spec else [flag]) if n.startswith(SPECULATIVE)), None)
        if table == "args" and speculative:
            raise FlagError(f"args.{key}: {flag} is a speculative decoding flag; set it in the server's speculative "
                            f"table as {speculative.removeprefix(SPECULATIVE).replace('-', '_')} (and a draft model "
                            "as draft_model)")
        for item in value if isinstance(value, list) else [value]:
            argv += _one(f"{table}.{key}", flag, item, spec)
    return argv


def _one(where: str, flag: str, value: str | int | float | bool, spec: Flag | None) -> list[str]:
    if value is True:
        if spec is not None and spec.takes_value:
            raise FlagError(f"{where}: {flag} takes a value; write {where.split('.')[-1]} = \"VALUE\" instead of true")
        return [flag]
    if value is False:
        if spec is None:
            return [f"--no-{flag.lstrip('-')}"]
        if spec.negatives:
            return [spec.negatives[0]]
        raise FlagError(f"{where}: {flag} has no negative form; remove the key instead of setting it to false")
    if spec is not None and not spec.takes_value:
        raise FlagError(f"{where}: {flag} is a switch; write {where.split('.')[-1]} = true")
    return [flag, str(value)]
