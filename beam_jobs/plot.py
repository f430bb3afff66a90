"""Draws one device's scores over time, for people who would rather look than read.

    python -m beam_jobs.plot --scores S.avro [--events E.avro] --device D --output P.png

The top panels show the device's readings from the recording (--events), one
panel per reading, with anomalies marked; the bottom panel shows the anomaly
score, the threshold and the anomalies. Without --events only the score panel
is drawn. --scores and --events take files or quoted globs
('out/scores-*.avro'). Needs matplotlib: pip install -e '.[plot]'.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Sequence

from beam_jobs.compare import read_scores
from beam_jobs.recordings import PathLike, RecordingError, read_events

_ANOMALY_STYLE = dict(color="red", s=18, zorder=3, label="anomaly")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def device_scores(pattern: PathLike, device: str) -> list[dict]:
    """The device's scores in event-time order, event_time as UTC datetimes."""
    scores = [s for s in read_scores(pattern) if s["device_id"] == device]
    return sorted(scores, key=lambda s: s["event_time"])


def device_events(pattern: PathLike, device: str) -> list[dict]:
    """The device's recorded events in event-time order."""
    return sorted((e for e in read_events(pattern) if e["device_id"] == device), key=lambda e: e["event_time"])


def _utc(millis: int) -> dt.datetime:
    """Exact, like fastavro's timestamp-millis datetimes, so event times of events and scores match."""
    return _EPOCH + dt.timedelta(milliseconds=millis)


def draw(scores: list[dict], events: list[dict], device: str, output: str) -> None:
    """Writes the figure to `output` (the format follows its extension: .png, .svg, .pdf)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    features = sorted({name for e in events for name in e["readings"]})
    fig, axes = plt.subplots(len(features) + 1, 1, sharex=True, squeeze=False,
                             figsize=(12, 2.0 * len(features) + 3.0))
    anomaly_times = {s["event_time"] for s in scores if s["is_anomaly"]}
    for ax, name in zip(axes[:-1, 0], features):
        points = [(_utc(e["event_time"]), e["readings"][name]) for e in events if e["readings"].get(name) is not None]
        if points:
            ax.plot(*zip(*points), lw=0.8)
        marked = [(t, v) for t, v in points if t in anomaly_times]
        if marked:
            ax.scatter(*zip(*marked), **_ANOMALY_STYLE)
        ax.set_ylabel(name)
    ax = axes[-1, 0]
    times = [s["event_time"] for s in scores]
    ax.plot(times, [s["score"] for s in scores], lw=0.8, label="score")
    ax.plot(times, [s["threshold"] for s in scores], "--", color="grey", lw=1, label="threshold")
    flagged = [(s["event_time"], s["score"]) for s in scores if s["is_anomaly"]]
    if flagged:
        ax.scatter(*zip(*flagged), **_ANOMALY_STYLE)
    ax.set_yscale("symlog", linthresh=max((s["threshold"] for s in scores), default=1.0))
    ax.set_ylabel("score")
    ax.set_xlabel("event time (UTC)")
    ax.legend(loc="upper right")
    models = sorted({s["model_version"] for s in scores})
    fig.suptitle(f"{device}: {len(scores)} scores, {len(flagged)} anomalies (model {', '.join(models)})")
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m beam_jobs.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True, help="SensorScore Avro file(s): the job's file-mode output")
    parser.add_argument("--events", help="the recording that was scored, to draw the readings too")
    parser.add_argument("--device", required=True, help="device_id to draw")
    parser.add_argument("--output", required=True, help="image to write, e.g. device.png")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    try:
        scores = device_scores(args.scores, args.device)
        events = device_events(args.events, args.device) if args.events else []
    except (RecordingError, OSError) as e:
        print(f"plot failed: {e}", file=sys.stderr)
        sys.exit(2)
    if not scores:
        print(f"plot failed: no scores of device {args.device!r} in {args.scores}", file=sys.stderr)
        sys.exit(2)
    try:
        draw(scores, events, args.device, args.output)
    except ImportError:
        print("plot needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.output}: {len(scores)} scores, {len(events)} events of {args.device}", file=sys.stderr)


if __name__ == "__main__":
    main()
