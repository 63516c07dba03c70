"""Bad input: what the shard reader skips, how it is counted, and the ceiling that stops a run.

Every item a data stream draws is either a usable sample or bad input of one of `BAD_KINDS`:

  unreadable_shard   a shard URL that cannot be opened or read (missing file, failing ``pipe:``
                     command, not a tar file, no sample in it)
  corrupt_member     a shard that breaks off part-way (truncated tar, damaged member)
  undecodable_image  no image member, or bytes that do not decode as an image
  missing_caption    no ``.txt`` member, or one that is not UTF-8
  empty_caption      a ``.txt`` member that is blank
  bad_latent         preprocessed shards: latent or text embedding missing, unreadable (never
                     unpickled), not finite, or of the wrong shape

Each skip is logged as a warning naming the shard URL and the sample key, and counted; `seen`
counts every item drawn (samples and shard failures alike). `check_bad_fraction` raises a
`DataError` naming the counts once `seen` reaches a threshold and the skipped fraction exceeds a
ceiling. This module does not repair input or retry failing URLs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger("megatron_ecdit.data")

BAD_KINDS = ("unreadable_shard", "corrupt_member", "undecodable_image", "missing_caption",
             "empty_caption", "bad_latent")


class DataError(ValueError):
    """The input data cannot be used: too much of it is bad, or none of it can be read."""


class BadSample(Exception):
    """Raised by a decoder for a sample it must skip."""

    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind, self.reason = kind, reason


@dataclass(frozen=True)
class BadInput:
    """One skipped item; travels through the shuffle buffer like a sample."""

    kind: str
    url: str
    key: str | None
    reason: str


def zero_counts() -> dict[str, int]:
    return {"seen": 0, **dict.fromkeys(BAD_KINDS, 0)}


def describe_counts(counts: dict[str, int]) -> str:
    """A one-line summary, e.g. "skipped 3 of 1200 (0.25%): corrupt_member 1, ..."."""
    bad = sum(counts[k] for k in BAD_KINDS)
    seen = counts["seen"]
    parts = ", ".join(f"{k} {counts[k]}" for k in BAD_KINDS if counts[k])
    share = f" ({100 * bad / seen:.2f}%)" if seen else ""
    return f"skipped {bad} of {seen} items read{share}" + (f": {parts}" if parts else "")


def check_bad_fraction(counts: dict[str, int], max_fraction: float, check_after: int) -> None:
    """Raise DataError when at least `check_after` items were seen and more than
    `max_fraction` of them were bad."""
    seen = counts["seen"]
    bad = sum(counts[k] for k in BAD_KINDS)
    if seen >= check_after and bad > max_fraction * seen:
        raise DataError(f"too much bad input: {describe_counts(counts)}, above "
                        f"data.max_bad_fraction={max_fraction}")


class BadInputLog:
    """Counts of one stream's items; logs each skip and enforces the ceiling."""

    def __init__(self, max_fraction: float, check_after: int):
        self.max_fraction, self.check_after = max_fraction, check_after
        self.counts = zero_counts()

    def saw(self) -> None:
        self.counts["seen"] += 1

    def skip(self, bad: BadInput) -> None:
        self.counts[bad.kind] += 1
        logger.warning("skipped %s: %s (shard %s, key %s)", bad.kind, bad.reason, bad.url, bad.key)

    def check(self) -> None:
        check_bad_fraction(self.counts, self.max_fraction, self.check_after)
