"""What an answer held, counted as it streams past: its bytes, its server-sent events and the token counts
the server reported.

Token counts come from the end of the answer, where llama-server puts them: OpenAI's `usage`
(`prompt_tokens`, `completion_tokens`), else its `timings` (`prompt_n`, `predicted_n`), else the native
`/completion`'s `tokens_evaluated` and `tokens_predicted`. A stream that reports none is counted by its
events (one token each; the prompt unknown). Only the last TAIL bytes are kept to read them from; with
KEEP, the first KEEP bytes of the answer are kept as well, for the request log.
"""

from __future__ import annotations

import re

TAIL = 16 * 1024
_NUMBERS = {name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*(\d+)') for name in (
    "prompt_tokens", "completion_tokens", "prompt_n", "predicted_n", "tokens_evaluated", "tokens_predicted")}
_USAGE_PAIRS = (("prompt_tokens", "completion_tokens"), ("prompt_n", "predicted_n"),
                ("tokens_evaluated", "tokens_predicted"))


class Tally:
    __slots__ = ("size", "events", "tail", "keep", "kept", "_before")

    def __init__(self, keep: int = 0) -> None:
        self.size = 0
        self.events = 0
        self.tail = bytearray()
        self.keep = keep
        self.kept = bytearray()
        self._before = b"\n"  # the stream's last bytes before this chunk (an event may begin across two)

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        joined = self._before + chunk[:5]  # "\ndata:" is 6 bytes: at most 5 of it came before
        self.events += joined.count(b"\ndata:") + chunk.count(b"\ndata:")
        self._before = (self._before + chunk)[-5:]
        self.tail += chunk
        if len(self.tail) > 2 * TAIL:
            del self.tail[:-TAIL]
        if len(self.kept) < self.keep:
            self.kept += chunk[: self.keep - len(self.kept)]

    def tokens(self, sse: bool) -> tuple[int | None, int | None]:
        """(prompt tokens, completion tokens) as the server reported them; None where it did not."""
        tail = bytes(self.tail[-TAIL:])
        for prompt_name, completion_name in _USAGE_PAIRS:
            prompt, completion = _last(prompt_name, tail), _last(completion_name, tail)
            if prompt is not None or completion is not None:
                return prompt, completion
        if sse and self.events:
            done = 1 if b"data: [DONE]" in tail else 0
            return None, max(0, self.events - done)
        return None, None


def _last(name: str, data: bytes) -> int | None:
    matches = _NUMBERS[name].findall(data)
    return int(matches[-1]) if matches else None
