"""A match, or a skip with its reason: the outcome of a decision that may say no.

Finding sites and fusing site boundaries both either find something or explain, in words a
user reads (`hcpass.explain`, the backend's log), why not. ``Match[T] | Skip`` says that in
the type, and ``isinstance(outcome, Skip)`` tells the two apart -- where a bare string for
the reason would make every ``str``-valued match ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Match(Generic[T]):
    """What was found."""

    value: T


@dataclass(frozen=True)
class Skip:
    """Nothing found; `reason` says why, for a person reading a report or a log."""

    reason: str
