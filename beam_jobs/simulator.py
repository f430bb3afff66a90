"""A simulated manufacturing line: sensor events with ground-truth fault labels.

It stands in for sensor gateways in ``./run_local.sh``, demos and tests, so the
scoring job can be run and judged without a factory. Randomness comes from one
seeded numpy Generator and time is event time, never the wall clock, so a seed
always yields the same events and labels. ``python -m beam_jobs.simulator``
sends them to Kafka.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from kafka import KafkaProducer

from beam_jobs.security_options import add_kafka_security_arguments, kafka_security
from schemas.serde import EVENT, AvroEncoder
from transforms.kafka_client import KafkaConfig, KafkaSecurityError, make_producer

FEATURES: tuple[str, ...] = ("temperature", "vibration", "current", "pressure", "flow", "voltage")
FAULT_KINDS: tuple[str, ...] = ("bearing_wear", "overheating", "pressure_leak", "stuck_sensor", "spike")
DRIFT_FEATURE = "temperature"
DEFAULT_START_MS = 1_700_000_000_000

_T, _VIB, _CUR, _PRES, _FLOW, _VOLT = range(len(FEATURES))
_DRIFT = FEATURES.index(DRIFT_FEATURE)
_MACHINE_TYPES = ("press", "pump", "mixer", "conveyor", "compressor")
_DEVICES_PER_LINE = 10
_FAULT_SECONDS = (60.0, 300.0)
# Slow dynamics are short on purpose: a device calibrates on its first events (the job's default
# --calibration_events, 120 at 1 Hz), and a cycle or drift longer than that makes every later phase look like
# a lasting departure from normal. So the load cycle is a machine's work cycle, 30-90 s, temperature follows
# the current within seconds, and the load wobble reverts within a cycle.
_PERIOD_S = (30.0, 90.0)  # load cycle
_THERMAL_TAU_S = (5.0, 15.0)  # thermal time constant: temperature lags the current
_WOBBLE_TAU_S, _WOBBLE_SD = 15.0, 0.08  # operator-driven load changes around the cycle
# Ranges of fault size: vibration gain, degrees C, fraction of pressure lost, unused, reading factor.
_MAGNITUDES = dict(zip(FAULT_KINDS, ((1.5, 3.0), (12.0, 25.0), (0.3, 0.5), (0.0, 0.0), (2.0, 3.0)), strict=True))


@dataclass
class SimulatorConfig:
    """What to simulate.

    Attributes:
        devices: Number of machines, spread over lines of ten.
        rate_hz: Readings per device per second of event time.
        seed: Seed of every random draw; equal seeds give equal events.
        start_ms: Epoch millis of the first step; None is DEFAULT_START_MS, a
            fixed instant, so that runs never depend on the wall clock.
        fault_rate_per_hour: Faults a healthy device starts per hour, on average.
        missing_rate: Probability that any one reading is None.
        drift_per_hour: Growth per hour of a fleet-wide offset on DRIFT_FEATURE,
            in its units. Never labelled: it tests that a detector adapts.
    """

    devices: int = 20
    rate_hz: float = 1.0
    seed: int = 0
    start_ms: int | None = None
    fault_rate_per_hour: float = 2.0
    missing_rate: float = 0.01
    drift_per_hour: float = 0.0

    def __post_init__(self) -> None:
        if self.devices < 1 or self.rate_hz <= 0:
            raise ValueError(f"need devices >= 1 and rate_hz > 0, got {self.devices} and {self.rate_hz}")
        if self.fault_rate_per_hour < 0 or not 0 <= self.missing_rate < 1:
            raise ValueError("need fault_rate_per_hour >= 0 and 0 <= missing_rate < 1")
        if self.start_ms is None:
            self.start_ms = DEFAULT_START_MS


class _Baselines:
    """Per-device operating points, drawn once so that devices differ."""

    def __init__(self, rng: np.random.Generator, n: int):
        self.ambient = rng.uniform(18.0, 28.0, n)  # deg C
        self.temp_rise = rng.uniform(20.0, 45.0, n)  # deg C above ambient at full current
        self.tau_s = rng.uniform(*_THERMAL_TAU_S, n)
        self.current = rng.uniform(15.0, 60.0, n)  # A at full load
        self.vibration = rng.uniform(1.0, 4.5, n)  # mm/s RMS at nominal load
        self.flow = rng.uniform(60.0, 220.0, n)  # L/min at full load
        self.pressure = rng.uniform(3.0, 9.0, n)  # bar at full flow
        self.voltage = rng.normal(400.0, 3.0, n)  # V, three-phase supply
        self.period_s = rng.uniform(*_PERIOD_S, n)
        self.phase = rng.uniform(0.0, 2 * np.pi, n)


@dataclass
class _Fault:
    """One fault on one device, active for steps [start, end)."""

    kind: str
    start: int
    end: int
    feature: int
    magnitude: float
    frozen: float = np.nan

    def apply(self, row: np.ndarray, step: int) -> None:
        """Distorts one device's readings in place; wear and overheating ramp up like real degradation."""
        ramp = (self.end - self.start) // 2 if self.kind in ("bearing_wear", "overheating") else 1
        severity = min(1.0, (step - self.start + 1) / max(ramp, 1))
        if self.kind == "bearing_wear":
            row[_VIB] *= 1.0 + self.magnitude * severity
        elif self.kind == "overheating":
            row[_T] += self.magnitude * severity
        elif self.kind == "pressure_leak":
            row[_PRES] *= 1.0 - self.magnitude
            row[_FLOW] *= 1.0 + 0.6 * self.magnitude
        elif self.kind == "stuck_sensor":
            if np.isnan(self.frozen):
                self.frozen = row[self.feature]
            row[self.feature] = self.frozen
        else:  # spike
            row[self.feature] *= self.magnitude


def _draw_fault(rng: np.random.Generator, step: int, rate_hz: float) -> _Fault:
    """A random fault starting at `step`; durations are in event-time seconds, so independent of the rate."""
    kind = FAULT_KINDS[rng.integers(len(FAULT_KINDS))]
    steps = 1 if kind == "spike" else max(3, round(rng.uniform(*_FAULT_SECONDS) * rate_hz))
    feature = int(rng.integers(len(FEATURES)))
    magnitude = rng.uniform(*_MAGNITUDES[kind])
    if kind == "spike" and rng.random() < 0.5:
        magnitude = rng.uniform(0.0, 0.2)  # a dropout glitch
    return _Fault(kind, step, step + steps, feature, float(magnitude))


class _LineState:
    """The evolving state of every device: thermal lag, load noise, faults."""

    def __init__(self, config: SimulatorConfig, base: _Baselines, rng: np.random.Generator):
        self._config, self._base, self._rng = config, base, rng
        self._dt_s = 1.0 / config.rate_hz
        self._fault_p = -np.expm1(-config.fault_rate_per_hour * self._dt_s / 3600.0)
        self._wobble_keep = np.exp(-self._dt_s / _WOBBLE_TAU_S)  # AR(1) in event time, whatever the rate
        self._wobble_sd = _WOBBLE_SD * np.sqrt(1.0 - self._wobble_keep**2)
        self._load_noise = np.zeros(config.devices)
        self._temperature: np.ndarray | None = None
        self.faults: list[_Fault | None] = [None] * config.devices

    def _load(self, t_s: float) -> np.ndarray:
        """Fraction of full load: a slow cycle plus a mean-reverting wobble."""
        b = self._base
        self._load_noise = self._wobble_keep * self._load_noise + self._rng.normal(0.0, self._wobble_sd, len(b.phase))
        cycle = 0.6 + 0.3 * np.sin(2 * np.pi * t_s / b.period_s + b.phase)
        return np.clip(cycle + self._load_noise, 0.05, 1.0)

    def _clean(self, step: int) -> np.ndarray:
        """Healthy readings plus fleet drift, shape (devices, features).

        Load drives current, vibration and flow; temperature lags current and pressure follows flow, so the
        features correlate as on a real machine and a multivariate detector has structure to learn.
        """
        b, rng, n = self._base, self._rng, self._config.devices
        t_s = step * self._dt_s
        load = self._load(t_s)
        current = b.current * (0.3 + 0.7 * load)
        target = b.ambient + b.temp_rise * (current / b.current) ** 2  # I^2 R heating
        if self._temperature is None:
            self._temperature = target
        self._temperature = self._temperature + (target - self._temperature) * -np.expm1(-self._dt_s / b.tau_s)
        flow = b.flow * (0.4 + 0.6 * load)
        out = np.empty((n, len(FEATURES)))
        out[:, _T] = self._temperature + rng.normal(0.0, 0.3, n)
        out[:, _VIB] = np.abs(b.vibration * (0.5 + 0.8 * load) * (1.0 + rng.normal(0.0, 0.08, n)))
        out[:, _CUR] = current * (1.0 + rng.normal(0.0, 0.02, n))
        out[:, _PRES] = b.pressure * (0.3 + 0.7 * (flow / b.flow) ** 2) * (1.0 + rng.normal(0.0, 0.01, n))
        out[:, _FLOW] = flow * (1.0 + rng.normal(0.0, 0.015, n))
        out[:, _VOLT] = b.voltage - 4.0 * current / b.current + rng.normal(0.0, 0.8, n)
        out[:, _DRIFT] += self._config.drift_per_hour * t_s / 3600.0
        return out

    def _update_faults(self, step: int) -> None:
        """Ends expired faults and starts new ones as a Poisson process per healthy device."""
        starts = self._rng.random(self._config.devices) < self._fault_p
        for d, fault in enumerate(self.faults):
            if fault is not None and step >= fault.end:
                self.faults[d] = fault = None
            if fault is None and starts[d]:
                self.faults[d] = _draw_fault(self._rng, step, self._config.rate_hz)

    def step(self, step: int) -> tuple[list[list[float | None]], list[bool]]:
        """Readings (None where missing) and fault labels of every device."""
        values = self._clean(step)
        self._update_faults(step)
        missing = self._rng.random(values.shape) < self._config.missing_rate
        for d, fault in enumerate(self.faults):
            if fault is not None:
                fault.apply(values[d], step)
                if fault.kind == "spike":
                    missing[d, fault.feature] = False  # a labelled spike must be visible
        rows = np.round(values, 3).astype(object)  # sensor resolution; object dtype holds None
        rows[missing] = None
        return rows.tolist(), [f is not None for f in self.faults]


class LineSimulator:
    """An endless, reproducible stream of (event, is_fault) pairs."""

    def __init__(self, config: SimulatorConfig):
        self.config = config
        types, per_line = _MACHINE_TYPES, _DEVICES_PER_LINE  # ids read like "line1-press-000"
        self.device_ids = [f"line{i // per_line + 1}-{types[i % len(types)]}-{i:03d}" for i in range(config.devices)]
        base_seed, self._run_seed = np.random.SeedSequence(config.seed).spawn(2)
        self._base = _Baselines(np.random.default_rng(base_seed), config.devices)

    def events(self) -> Iterator[tuple[dict, bool]]:
        """Events of every device per time step, in event-time order.

        Each call starts over from the seed, so two iterators yield the same
        sequence. Events of one step share one event time.
        """
        state = _LineState(self.config, self._base, np.random.default_rng(self._run_seed))
        for step in itertools.count():
            event_time = self.config.start_ms + round(step * 1000.0 / self.config.rate_hz)
            rows, labels = state.step(step)
            for dev, row, is_fault in zip(self.device_ids, rows, labels, strict=True):
                readings = dict(zip(FEATURES, row, strict=True))
                event = {"event_id": f"{dev}-{step}", "device_id": dev, "event_time": event_time, "readings": readings}
                yield event, is_fault

    def take(self, n: int) -> list[tuple[dict, bool]]:
        """The first n events of `events()`."""
        return list(itertools.islice(self.events(), n))


def produce(
    simulator: LineSimulator,
    producer: KafkaProducer,
    topic: str,
    n: int | None,
    real_time_rate: float | None,
    encode: Callable[[dict], bytes],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Sends simulated events to a Kafka topic, keyed by device id.

    The Kafka timestamp is the event time, so other consumers that window on
    record timestamps see the simulated clock too (the job reads event time
    from the payload).

    Args:
        simulator: Source of events.
        producer: A kafka-python KafkaProducer (or anything with send/flush).
        topic: Topic to send to.
        n: Number of events to send; None sends forever.
        real_time_rate: Wall-clock events per second to pace at, so a demo
            looks live; None sends as fast as the producer accepts.
        encode: Turns an event dict into message bytes.
        progress: Called with the count sent so far about once a second.

    Returns:
        The number of events sent.
    """
    started = last_report = time.monotonic()
    count = 0
    try:
        for event, _ in itertools.islice(simulator.events(), n):
            if real_time_rate:
                ahead = started + count / real_time_rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            key = event["device_id"].encode()
            producer.send(topic, key=key, value=encode(event), timestamp_ms=event["event_time"])
            count += 1
            if progress and time.monotonic() - last_report >= 1.0:
                last_report = time.monotonic()
                progress(count)
    finally:
        producer.flush()
    return count


_CLI_OPTIONS = (  # flag, type, default, help
    ("--bootstrap_servers", str, "localhost:9092", "Kafka HOST:PORT[,HOST:PORT...]"),
    ("--topic", str, "sensor-events", "topic to send to"),
    ("--events", int, None, "number of events to send (default: forever)"),
    ("--devices", int, 20, "number of simulated machines"),
    ("--rate", float, 1.0, "readings per device per second of event time"),
    ("--seed", int, 0, "random seed; equal seeds give equal events"),
    ("--start_ms", int, None, f"event time of the first reading, epoch millis (default: {DEFAULT_START_MS})"),
    ("--fault_rate", float, 2.0, "faults per device per hour of event time"),
    ("--missing_rate", float, 0.01, "probability that a reading is null"),
    ("--drift_per_hour", float, 0.0, f"unlabelled fleet-wide {DRIFT_FEATURE} drift per hour of event time"),
    ("--real_time_rate", float, None, "events per wall-clock second (default: as fast as possible)"),
)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m beam_jobs.simulator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flag, type_, default, help_ in _CLI_OPTIONS:
        suffix = "" if default is None else f" (default: {default})"
        parser.add_argument(flag, type=type_, default=default, help=help_ + suffix)
    add_kafka_security_arguments(parser)
    return parser.parse_args(argv)


def _report(count: int) -> None:
    print(f"sent {count} events", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Sends simulated events to Kafka until --events are sent or Ctrl-C."""
    args = _parse_args(argv)
    config = SimulatorConfig(
        args.devices, args.rate, args.seed, args.start_ms, args.fault_rate, args.missing_rate, args.drift_per_hour
    )
    try:
        producer = make_producer(KafkaConfig(args.bootstrap_servers, security=kafka_security(args)))
    except KafkaSecurityError as e:
        print(f"simulator failed: {e}", file=sys.stderr)
        sys.exit(2)
    simulator, encode = LineSimulator(config), AvroEncoder(EVENT)
    try:
        sent = produce(simulator, producer, args.topic, args.events, args.real_time_rate, encode, _report)
        print(f"done: sent {sent} events to {args.topic}", file=sys.stderr)
    except KeyboardInterrupt:
        print("stopped by Ctrl-C", file=sys.stderr)
    finally:
        producer.close()


if __name__ == "__main__":
    main()
