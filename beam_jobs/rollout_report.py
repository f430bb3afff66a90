"""Rollout gate: does the shadow or canary model behave like the primary?

    python -m beam_jobs.rollout_report shadow [--bootstrap_servers HOST:PORT] [--score_topic T] [--shadow_score_topic T]
    python -m beam_jobs.rollout_report shadow --scores 'OUT/scores-*.avro' --shadow_scores 'OUT/shadow-scores-*.avro'
    python -m beam_jobs.rollout_report canary [--bootstrap_servers ... | --scores GLOB] [--canary_version V]

shadow: the primary's and the shadow's scores of the same events, paired by
event_id: how often they agree on the anomaly decision, each one's anomaly
rate, and how far apart their score distributions are (two-sample
Kolmogorov-Smirnov statistic, Wasserstein distance).

canary: the primary topic holds the scores of both models, told apart by
model_version; the canary's devices against the others: anomaly rates and
score-distribution distance (different devices, so no per-event agreement).
Without --canary_version the version serving fewer devices is the canary.

Duplicates (at-least-once delivery after a restart) are counted once. Scores
made while a device calibrates are left out: they are 0 by design, for either
model, and would inflate the agreement.

Exit status: 0 when every gate passes (--min_agreement, --max_anomaly_rate_delta,
--max_ks), 1 when one fails, 2 when the scores cannot be read or there is
nothing to compare.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from beam_jobs.compare import scores_by_event
from beam_jobs.recordings import RecordingError
from beam_jobs.security_options import add_kafka_security_arguments, kafka_security
from schemas.serde import SCORE, WIRE_FORMATS, AvroDecoder
from transforms.kafka_client import BrokerUnavailable, KafkaConfig, KafkaSecurityError, read_topic


@dataclass(frozen=True)
class Gates:
    min_agreement: float = 0.99
    max_anomaly_rate_delta: float = 0.01
    max_ks: float = 0.1


@dataclass
class RolloutReport:
    """The figures of one comparison; `agreement` only when the same events were scored by both."""

    mode: str
    baseline: str
    candidate: str
    events: tuple[int, int]
    devices: tuple[int, int]
    anomaly_rates: tuple[float, float]
    ks_statistic: float
    wasserstein: float
    agreement: float | None = None
    paired: int | None = None

    def failures(self, gates: Gates) -> list[str]:
        """The gates this report does not pass, in words."""
        failed = []
        if self.agreement is not None and self.agreement < gates.min_agreement:
            failed.append(f"agreement {self.agreement:.4f} < {gates.min_agreement}")
        delta = abs(self.anomaly_rates[1] - self.anomaly_rates[0])
        if delta > gates.max_anomaly_rate_delta:
            failed.append(f"anomaly rate delta {delta:.4f} > {gates.max_anomaly_rate_delta}")
        if self.ks_statistic > gates.max_ks:
            failed.append(f"KS statistic {self.ks_statistic:.4f} > {gates.max_ks}")
        return failed


class NothingToCompare(ValueError):
    """One side has no scored (calibrated) events."""


def scored(scores: dict[str, dict]) -> dict[str, dict]:
    """The scores made after calibration; a calibrating device scores exactly 0 with no contributions."""
    return {event_id: s for event_id, s in scores.items() if s["score"] != 0.0 or any(s["contributions"].values())}


def _distribution_report(mode: str, baseline: list[dict], candidate: list[dict], names: tuple[str, str],
                         **paired) -> RolloutReport:
    if not baseline or not candidate:
        raise NothingToCompare(f"no calibrated scores from {names[0] if not baseline else names[1]}")
    a = np.array([s["score"] for s in baseline])
    b = np.array([s["score"] for s in candidate])
    return RolloutReport(
        mode=mode, baseline=names[0], candidate=names[1], events=(len(a), len(b)),
        devices=(len({s["device_id"] for s in baseline}), len({s["device_id"] for s in candidate})),
        anomaly_rates=(float(np.mean([s["is_anomaly"] for s in baseline])),
                       float(np.mean([s["is_anomaly"] for s in candidate]))),
        ks_statistic=float(stats.ks_2samp(a, b).statistic), wasserstein=float(stats.wasserstein_distance(a, b)),
        **paired,
    )


def shadow_report(primary: dict[str, dict], shadow: dict[str, dict]) -> RolloutReport:
    """Primary against shadow over the events both scored after calibration."""
    primary, shadow = scored(primary), scored(shadow)
    both = sorted(primary.keys() & shadow.keys())
    if not both:
        raise NothingToCompare("no event has a calibrated score from both the primary and the shadow")
    a, b = [primary[e] for e in both], [shadow[e] for e in both]
    agreement = float(np.mean([x["is_anomaly"] == y["is_anomaly"] for x, y in zip(a, b)]))
    names = (_version_of(a), _version_of(b))
    return _distribution_report("shadow", a, b, names, agreement=agreement, paired=len(both))


def canary_report(scores: dict[str, dict], canary_version: str | None = None) -> RolloutReport:
    """The canary's devices against the rest of the fleet, from one score stream."""
    by_version: dict[str, list[dict]] = {}
    for score in scored(scores).values():
        by_version.setdefault(score["model_version"], []).append(score)
    if canary_version is None:
        if len(by_version) != 2:
            raise NothingToCompare(f"expected scores of two model versions, found {sorted(by_version) or 'none'}: "
                                   "name the canary with --canary_version")
        canary_version = min(by_version, key=lambda v: len({s["device_id"] for s in by_version[v]}))
    canary = by_version.pop(canary_version, [])
    rest = [s for group in by_version.values() for s in group]
    return _distribution_report("canary", rest, canary, (_version_of(rest), canary_version))


def _version_of(scores: list[dict]) -> str:
    return ",".join(sorted({s["model_version"] for s in scores}))


def scores_from_topic(config: KafkaConfig, topic: str, wire_format: str) -> dict[str, dict]:
    """Every SensorScore on a topic, by event_id, the first of duplicates kept."""
    decode, scores = AvroDecoder(SCORE, wire_format), {}
    for record in read_topic(config, topic):
        score = decode(record.value)
        scores.setdefault(score["event_id"], score)
    return scores


def render(report: RolloutReport, failures: list[str]) -> str:
    """The report people read, the verdict last."""
    lines = [f"{report.mode}: {report.baseline} (baseline) vs {report.candidate} (candidate)",
             f"calibrated scores: {report.events[0]} vs {report.events[1]} from {report.devices[0]} vs "
             f"{report.devices[1]} devices"]
    if report.agreement is not None:
        lines.append(f"decision agreement over {report.paired} paired events: {report.agreement:.4f}")
    lines += [f"anomaly rate: {report.anomaly_rates[0]:.4f} vs {report.anomaly_rates[1]:.4f}",
              f"score distributions: KS statistic {report.ks_statistic:.4f}, Wasserstein {report.wasserstein:.4f}",
              "PASS" if not failures else "FAIL: " + "; ".join(failures)]
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m beam_jobs.rollout_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("shadow", "canary"), help="what to compare with the primary")
    files = parser.add_argument_group("from files (file mode's outputs)")
    files.add_argument("--scores", help="the primary's SensorScore files (quoted glob)")
    files.add_argument("--shadow_scores", help="the shadow's SensorScore files (quoted glob), for shadow")
    kafka = parser.add_argument_group("from Kafka (used when --scores is not given)")
    kafka.add_argument("--bootstrap_servers", default="localhost:9092", help="(default localhost:9092)")
    kafka.add_argument("--score_topic", default="sensor-scores", help="(default sensor-scores)")
    kafka.add_argument("--shadow_score_topic", default="sensor-scores-shadow", help="(default sensor-scores-shadow)")
    kafka.add_argument("--wire_format", choices=WIRE_FORMATS, default="plain", help="(default plain)")
    add_kafka_security_arguments(parser)
    parser.add_argument("--canary_version", default=None, help="model_version of the canary (canary mode)")
    gates = parser.add_argument_group("gates")
    defaults = Gates()
    gates.add_argument("--min_agreement", type=float, default=defaults.min_agreement,
                       help=f"shadow: least share of events with the same decision (default {defaults.min_agreement})")
    gates.add_argument("--max_anomaly_rate_delta", type=float, default=defaults.max_anomaly_rate_delta,
                       help=f"largest |difference| of anomaly rates (default {defaults.max_anomaly_rate_delta})")
    gates.add_argument("--max_ks", type=float, default=defaults.max_ks,
                       help=f"largest KS statistic between score distributions (default {defaults.max_ks})")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object instead")
    args = parser.parse_args(argv)
    if args.mode == "shadow" and bool(args.scores) != bool(args.shadow_scores):
        parser.error("shadow mode from files needs both --scores and --shadow_scores")
    return args


def _read(args: argparse.Namespace, shadow: bool = False) -> dict[str, dict]:
    """The primary's or the shadow's scores, from files when --scores is given, else from Kafka."""
    if args.scores:
        return scores_by_event(args.shadow_scores if shadow else args.scores)[0]
    config = KafkaConfig(args.bootstrap_servers, security=kafka_security(args))
    return scores_from_topic(config, args.shadow_score_topic if shadow else args.score_topic, args.wire_format)


def _load(args: argparse.Namespace) -> RolloutReport:
    if args.mode == "canary":
        return canary_report(_read(args), args.canary_version)
    return shadow_report(_read(args), _read(args, shadow=True))


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    try:
        report = _load(args)
    except (RecordingError, OSError, NothingToCompare, BrokerUnavailable, KafkaSecurityError) as e:
        print(f"rollout_report: {e}", file=sys.stderr)
        sys.exit(2)
    failures = report.failures(Gates(args.min_agreement, args.max_anomaly_rate_delta, args.max_ks))
    print(json.dumps({**asdict(report), "failures": failures}) if args.json else render(report, failures))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
