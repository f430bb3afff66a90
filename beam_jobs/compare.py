"""Compares two score outputs event by event: is run B the same as run A?

    python -m beam_jobs.compare A.avro B.avro [--tolerance X] [--show N]

A and B are Avro files of SensorScore records (file mode's scores-*.avro; a
quoted glob such as 'out/scores-*.avro' reads every shard). Scores are paired
by event_id. The summary counts events missing from B or extra in B, flipped
anomaly decisions, score and contribution deltas, and records identical in
every field but processed_at; then it lists the largest differences.

Exit status: 0 when B matches A within --tolerance (no missing or extra
events, no flipped decision, every score and contribution within the
tolerance), 1 when it does not, 2 when an input cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import fastavro

from beam_jobs.recordings import PathLike, RecordingError, expand_paths
from schemas.serde import SCORE, current_schema

DEFAULT_TOLERANCE = 1e-6
IGNORED_FIELDS = ("processed_at",)


def read_scores(pattern: PathLike) -> Iterator[dict]:
    """The SensorScore records of the files matching `pattern`."""
    reader_schema = current_schema(SCORE)
    for path in expand_paths(pattern):
        with open(path, "rb") as f:
            try:
                yield from fastavro.reader(f, reader_schema=reader_schema)
            except (ValueError, EOFError, fastavro.read.SchemaResolutionError) as e:
                raise RecordingError(f"{path} is not a readable SensorScore file: {e}") from None


def scores_by_event(pattern: PathLike) -> tuple[dict[str, dict], int]:
    """Scores keyed by event_id (the first of duplicates kept), and the number of duplicates."""
    scores: dict[str, dict] = {}
    duplicates = 0
    for score in read_scores(pattern):
        if score["event_id"] in scores:
            duplicates += 1
        else:
            scores[score["event_id"]] = score
    return scores, duplicates


def _same_except_ignored(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in a if k not in IGNORED_FIELDS)


def _contribution_delta(a: dict, b: dict) -> float:
    names = set(a) | set(b)
    return max((abs(a.get(n, 0.0) - b.get(n, 0.0)) for n in names), default=0.0)


@dataclass
class Comparison:
    """What differs between two score outputs; every list holds event_ids."""

    compared: int = 0
    identical: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    duplicates: tuple[int, int] = (0, 0)
    flipped: list[str] = field(default_factory=list)
    score_deltas: dict[str, float] = field(default_factory=dict)
    max_contribution_delta: float = 0.0
    a: dict[str, dict] = field(default_factory=dict, repr=False)
    b: dict[str, dict] = field(default_factory=dict, repr=False)

    @property
    def max_score_delta(self) -> float:
        return max(self.score_deltas.values(), default=0.0)

    def within(self, tolerance: float) -> bool:
        """True when B reproduces A: same events, same decisions, numbers within `tolerance`."""
        return (not self.missing and not self.extra and not self.flipped
                and self.max_score_delta <= tolerance and self.max_contribution_delta <= tolerance)


def compare_scores(a: dict[str, dict], b: dict[str, dict]) -> Comparison:
    """Pairs scores by event_id and measures how they differ."""
    result = Comparison(missing=sorted(a.keys() - b.keys()), extra=sorted(b.keys() - a.keys()), a=a, b=b)
    for event_id in sorted(a.keys() & b.keys()):
        x, y = a[event_id], b[event_id]
        result.compared += 1
        if _same_except_ignored(x, y):
            result.identical += 1
            continue
        if x["is_anomaly"] != y["is_anomaly"]:
            result.flipped.append(event_id)
        if x["score"] != y["score"]:
            result.score_deltas[event_id] = abs(x["score"] - y["score"])
        result.max_contribution_delta = max(result.max_contribution_delta,
                                            _contribution_delta(x["contributions"], y["contributions"]))
    return result


def compare_files(a: PathLike, b: PathLike) -> Comparison:
    """compare_scores of two score outputs (paths or globs)."""
    scores_a, dup_a = scores_by_event(a)
    scores_b, dup_b = scores_by_event(b)
    result = compare_scores(scores_a, scores_b)
    result.duplicates = (dup_a, dup_b)
    return result


def summary(result: Comparison, tolerance: float, show: int = 10) -> str:
    """The report people read: counts, then the largest differences."""
    a, b = result.a, result.b
    lines = [
        f"events: {len(a)} in A, {len(b)} in B, {result.compared} in both "
        f"({result.identical} identical except {', '.join(IGNORED_FIELDS)})",
        f"missing from B: {len(result.missing)}   extra in B: {len(result.extra)}   "
        f"duplicates: {result.duplicates[0]} in A, {result.duplicates[1]} in B",
        f"flipped decisions: {len(result.flipped)}   scores that differ: {len(result.score_deltas)}   "
        f"max |score delta|: {result.max_score_delta:.3g}   max |contribution delta|: "
        f"{result.max_contribution_delta:.3g}",
    ]
    largest = sorted(result.score_deltas, key=result.score_deltas.get, reverse=True)[:show]
    for event_id in dict.fromkeys(result.flipped[:show] + largest):
        x, y = a[event_id], b[event_id]
        lines.append(f"  {event_id} ({x['device_id']}): score {x['score']:.6g} -> {y['score']:.6g}, "
                     f"anomaly {x['is_anomaly']} -> {y['is_anomaly']}")
    for label, ids in (("missing from B", result.missing), ("extra in B", result.extra)):
        if ids:
            lines.append(f"  {label}: {', '.join(ids[:show])}{' ...' if len(ids) > show else ''}")
    verdict = "MATCH" if result.within(tolerance) else "DIFFERENT"
    lines.append(f"{verdict} within tolerance {tolerance:g}")
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m beam_jobs.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", metavar="A.avro", help="the reference scores (file or quoted glob)")
    parser.add_argument("b", metavar="B.avro", help="the scores to check against A (file or quoted glob)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest accepted |score delta| and |contribution delta| (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--show", type=int, default=10, help="differences to list (default 10)")
    args = parser.parse_args(argv)
    if args.tolerance < 0:
        parser.error("--tolerance must be 0 or more")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    try:
        result = compare_files(args.a, args.b)
    except (RecordingError, OSError) as e:
        print(f"compare failed: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary(result, args.tolerance, args.show))
    sys.exit(0 if result.within(args.tolerance) else 1)


if __name__ == "__main__":
    main()
