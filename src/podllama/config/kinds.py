"""The server programs podllama runs, one kind per program, as data.

llama-server (llama.cpp, the project's submodule) serves the text roles; the roles it cannot serve have their own
programs, each built from a pinned source into its own image like llama-server: whisper-server (whisper.cpp) for
speech to text, sd-server (stable-diffusion.cpp) for images, and podllama's speech server (piper) for text to
speech. A kind says which roles it serves, which image repository and Containerfiles it has, what its command
line looks like and how the build's smoke test checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Kind:
    name: str  # llama | whisper | sd | speech
    program: str  # what people know it as
    roles: tuple[str, ...]
    image: str  # the last part of its image repository (podllama/<image>)
    variants: tuple[str, ...]  # the Containerfiles written for it
    help_file: str = "/app/server.help"  # its --help, recorded in the image (flags are checked against it)
    help_indent: int = 4  # how far its --help indents the flags (llama-server: not at all; flags.FlagSet.parse)
    model_flag: str = "--model"
    alias_flag: str | None = None  # the flag naming the model it answers to, where it has one
    # an on-demand server of this kind can save and restore its prompt caches (llama-server's slots)
    slots: bool = False
    # it loads its model before it listens (sd-server): not listening yet is loading, not a fault
    listens_when_loaded: bool = False

    @property
    def llama(self) -> bool:
        return self.name == "llama"

    def containerfile(self, variant: str, root: Path) -> Path:
        name = f"Containerfile.{variant}" if self.llama else f"Containerfile.{self.name}-{variant}"
        return root / "containers" / name

    def repository(self, llama_repository: str) -> str:
        """Its image repository beside llama-server's (`[build] repository`): podllama/whisper-server for
        podllama/llama-server."""
        if self.llama:
            return llama_repository
        head, _, _ = llama_repository.rpartition("/")
        return f"{head}/{self.image}" if head else self.image


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("llama", "llama-server", ("chat", "embedding", "rerank", "vision", "infill", "audio"), "llama-server",
         ("cpu", "cuda", "rocm", "vulkan"), help_file="/app/llama-server.help", help_indent=0, alias_flag="--alias",
         slots=True),
    Kind("whisper", "whisper-server", ("transcription",), "whisper-server", ("cpu", "cuda", "vulkan")),
    Kind("sd", "sd-server", ("image",), "sd-server", ("cpu", "cuda", "vulkan"), listens_when_loaded=True),
    Kind("speech", "speech server (piper)", ("speech",), "speech-server", ("cpu",), alias_flag="--alias"),
)}
ROLE_KIND: dict[str, Kind] = {role: kind for kind in KINDS.values() for role in kind.roles}


def of_role(role: str) -> Kind:
    return ROLE_KIND[role]


def named(name: str) -> Kind:
    kind = KINDS.get(name)
    if kind is None:
        raise ValueError(f"no server kind '{name}'; kinds: {', '.join(KINDS)}")
    return kind
