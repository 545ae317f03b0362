"""Types shared across the package: span kinds and the names used for them."""

from __future__ import annotations

import enum


class SpanKind(enum.IntEnum):
  """Kind of a token's span. Stored as int8 in prepared datasets; values are frozen."""

  PAD = 0
  SYSTEM = 1
  TASK = 2
  REASON = 3
  ACTION = 4
  OBSERVATION = 5
  ANSWER = 6

  @classmethod
  def from_name(cls, name: str) -> SpanKind:
    try:
      return cls[name.upper()]
    except KeyError:
      raise ValueError(
          f"unknown span kind {name!r}; expected one of {SEGMENT_KINDS}"
      ) from None


# Segment kinds a trajectory may contain (PAD is only for token arrays).
SEGMENT_KINDS: tuple[str, ...] = (
    "system", "task", "reason", "action", "observation", "answer"
)
# Kinds the student is trained to produce. Everything else is context: it never
# appears in a loss numerator or denominator.
SUPERVISED_KINDS: frozenset[SpanKind] = frozenset(
    {SpanKind.REASON, SpanKind.ACTION, SpanKind.ANSWER}
)
