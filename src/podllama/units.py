"""Sizes, durations and dates as people write them in services.toml and on the command line, and as the
engines print them."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from "12GiB", "512 MiB", "1.5G" or a number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"'{text}' is not a size; write it like \"12GiB\", \"512MiB\" or \"auto\"")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_duration(text: str | int | float) -> float:
    """Seconds from 600, "90s", "10m", "1h30m"."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)\s*([hms])", str(text).strip().lower())
    if not parts or re.sub(r"[0-9.]+\s*[hms]", "", str(text).strip().lower()).strip():
        raise ValueError(f"'{text}' is not a duration; write it like 600, \"90s\", \"10m\" or \"1h\"")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def timestamp_of(text: str) -> float | None:
    """The time an ISO date or date and time names ("2027-01-31", "2027-01-31T18:00"; UTC unless it says);
    None when TEXT is not one."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def human(n: int | float) -> str:
    """"1.5 GiB", "312 MiB": a size for people."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
