"""Bad input accounting: skip a broken sample, count it by kind, keep a few examples, and stop the
run with a clear error once the bad share passes a threshold."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# missing: no such file (or a shard key without an image or caption); truncated / corrupt: image data
# that does not decode; not_image: not an image format; too_large: more pixels than
# images.MAX_IMAGE_PIXELS (decompression bombs); extreme_aspect: one side over images.MAX_ASPECT_RATIO
# times the other; empty_caption: no caption text; not_utf8: a manifest line or caption that is not
# UTF-8; unreadable_member: a shard or tar member that cannot be read.
BAD_KINDS = (
    "missing", "truncated", "corrupt", "not_image", "too_large", "extreme_aspect", "empty_caption", "not_utf8",
    "unreadable_member",
)
EXAMPLES_PER_KIND = 3


class DataQualityError(ValueError):
    """Too large a share of the data is broken; the message gives counts and examples."""


@dataclass
class DataQuality:
    """Counts of good samples and of bad ones by kind (see BAD_KINDS), with a few examples each."""

    threshold: float = 0.01
    good: int = 0
    bad: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def record_good(self) -> None:
        """Count one usable sample."""
        self.good += 1

    def record_bad(self, kind: str, example: str) -> None:
        """Count one skipped sample of `kind`, keeping `example` (e.g. its path and the reason) if few are kept."""
        if kind not in BAD_KINDS:
            raise ValueError(f"unknown bad-sample kind {kind!r}; known kinds: {', '.join(BAD_KINDS)}")
        self.bad[kind] += 1
        kept = self.examples.setdefault(kind, [])
        if len(kept) < EXAMPLES_PER_KIND:
            kept.append(example)

    @property
    def total(self) -> int:
        """Samples seen, good and bad."""
        return self.good + sum(self.bad.values())

    @property
    def bad_share(self) -> float:
        """Fraction of the samples seen that were bad (0 when none were seen)."""
        return sum(self.bad.values()) / self.total if self.total else 0.0

    def over_threshold(self) -> bool:
        """True when the bad share exceeds the threshold."""
        return self.bad_share > self.threshold

    def summary(self) -> dict:
        """Counts and examples as plain data, for results JSON and logs."""
        return {
            "good": self.good,
            "bad": dict(self.bad),
            "bad_share": self.bad_share,
            "threshold": self.threshold,
            "examples": {k: list(v) for k, v in self.examples.items()},
        }

    def report(self) -> str:
        """A few human-readable lines: totals, then each bad kind with its count and examples."""
        if not self.good and not any(self.bad.values()):
            return "nothing checked (no pairs were decoded from files: generated data)"
        lines = [f"{self.good} good, {sum(self.bad.values())} bad ({100 * self.bad_share:.2f}%; threshold {100 * self.threshold:g}%)"]
        for kind in BAD_KINDS:
            if self.bad[kind]:
                lines.append(f"  {kind}: {self.bad[kind]}, e.g. " + "; ".join(self.examples.get(kind, [])))
        return "\n".join(lines)

    def merge(self, other: "DataQuality") -> None:
        """Add another tally's counts (and examples, up to the kept number per kind) to this one."""
        self.good += other.good
        for kind, count in other.bad.items():
            self.bad[kind] += count
            kept = self.examples.setdefault(kind, [])
            kept.extend(other.examples.get(kind, [])[: EXAMPLES_PER_KIND - len(kept)])

    def drain(self) -> "DataQuality":
        """The counts gathered so far as a new tally, leaving this one empty (a worker's mailbox)."""
        taken = DataQuality(self.threshold, self.good, self.bad, self.examples)
        self.good, self.bad, self.examples = 0, Counter(), {}
        return taken

    def check(self) -> None:
        """Raise DataQualityError with the report when the bad share exceeds the threshold."""
        if self.over_threshold():
            raise DataQualityError(f"too much bad input ({self.bad_share:.2%} > {self.threshold:.2%}):\n{self.report()}")
