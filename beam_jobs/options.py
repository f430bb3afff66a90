"""The job's command-line options, typed, grouped and explained in ``--help``."""

from __future__ import annotations

import argparse

from apache_beam.options.pipeline_options import (
    DirectOptions,
    FlinkRunnerOptions,
    PipelineOptions,
    PortableOptions,
    SetupOptions,
    StandardOptions,
)

from beam_jobs.security_options import KAFKA_SECURITY_OPTIONS, kafka_security
from models.artifact import BUNDLED, QUANTIZE_CHOICES
from models.rollout import RolloutConfig
from schemas.serde import WIRE_FORMATS
from transforms.event_time import WatermarkPolicy
from transforms.kafka_client import START_FROM_CHOICES, KafkaConfig


def _true_or_false(text: str) -> bool:
    """A boolean flag that can be turned off as well as on (argparse's store_true cannot)."""
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


# (group, flag, argparse keywords): one table for parsing and for --help.
_OPTIONS: list[tuple[str, str, dict]] = [
    ("Kafka", "--bootstrap_servers", dict(
        default="localhost:9092", help="Kafka bootstrap servers, comma-separated (default localhost:9092)")),
    ("Kafka", "--input_topic", dict(default="sensor-events", help="SensorEvent topic to score (default sensor-events)")),
    ("Kafka", "--score_topic", dict(
        default="sensor-scores", help="topic for SensorScore records (default sensor-scores)")),
    ("Kafka", "--drift_topic", dict(
        default="sensor-drift", help="topic for DriftStatistics records (default sensor-drift)")),
    ("Kafka", "--dead_letter_topic", dict(
        default="sensor-dead-letters",
        help="topic for DeadLetter records: bad input, failed inference (default sensor-dead-letters)")),
    ("Kafka", "--consumer_group", dict(
        default="sensor-scoring",
        help="group whose offsets are committed once outputs are written (default sensor-scoring)")),
    ("Kafka", "--start_from", dict(
        choices=START_FROM_CHOICES, default="committed",
        help="where each partition starts; committed falls back to earliest (default committed)")),
    ("Kafka", "--bounded", dict(
        action="store_true",
        help="read each partition up to its end offset at launch, then finish (tests, replays, benchmarks); "
             "without it the job runs until stopped")),
    ("Kafka", "--input_partitions", dict(
        default=None,
        help="comma-separated partitions of --input_topic this job reads, e.g. 0,2 (default: all); jobs on "
             "disjoint partitions share the work, as --local_processes does")),
    ("Kafka", "--fetch_max_wait_ms", dict(
        type=int, default=500,
        help="how long the broker may hold a fetch that finds nothing new (default 500, Kafka's own: Apache Kafka "
             "answers a held fetch as soon as data arrives); the embedded Tansu holds it the whole time, so "
             "run_local.sh and the benchmarks pass 50 there")),
    ("Kafka", "--topic_partitions", dict(
        type=int, default=4, help="partitions of the topics the job creates because they are missing (default 4)")),
    ("Kafka", "--wire_format", dict(
        choices=WIRE_FORMATS, default="plain",
        help="plain schemaless Avro (default), or confluent framing with ids from schemas/registry.json")),
    ("Model", "--model_dir", dict(
        default=BUNDLED,
        help="the primary model: an artifact folder written by python -m models.train, a symlink to one, or a "
             "registry folder whose newest artifact subfolder serves; watched for new artifacts (--model_poll_s). "
             "'bundled' (default) is the model shipped in the package, found on each worker")),
    ("Model", "--state_ttl_s", dict(
        type=float, default=600.0,
        help="event-time gap after which a device's state is reset and its memory reclaimed (default 600)")),
    ("Event time", "--max_out_of_orderness_s", dict(
        type=float, default=5.0,
        help="each input partition's watermark trails the newest event_time read from it by this much; Kafka "
             "record timestamps are never used (default 5)")),
    ("Event time", "--allowed_lateness_s", dict(
        type=float, default=0.0,
        help="an event more than this behind its partition's watermark is late: scored, counted, left out of "
             "drift; drift windows close this much after the watermark passes their end (default 0)")),
    ("Event time", "--partition_idle_s", dict(
        type=float, default=10.0,
        help="a partition caught up and silent this long (wall clock) stops holding the watermark back: it then "
             "moves on with the wall clock, so drift windows and expiry go on; replays at the recorded pace or "
             "faster are unaffected (default 10)")),
    ("Model", "--calibration_events", dict(
        type=int, default=120,
        help="per-device warm-up events that fit the device's baseline; no alarms during them (default 120)")),
    ("Model", "--quantize", dict(
        choices=QUANTIZE_CHOICES, default="none",
        help="int8: dynamic int8 quantisation of the LSTM cell and forecast layer, for small machines; "
             "its accuracy cost is measured by python -m benchmarks.skab (default none)")),
    ("Model", "--max_batch_size", dict(
        type=int, default=256, help="RunInference batch size across devices; a bundle's last batch is smaller "
                                    "(default 256)")),
    ("Model", "--inference_device", dict(
        choices=("CPU", "GPU"), default="CPU", help="where RunInference runs the scoring head (default CPU)")),
    ("Model rollout", "--model_poll_s", dict(
        type=float, default=10.0,
        help="seconds between checks of the model folders for a new artifact, which then serves without a "
             "restart; device state is kept or reset by the rules in models/rollout.py (default 10; 0: load once)")),
    ("Model rollout", "--canary_model_dir", dict(
        default=None, help="a canary model that decides for --canary_percent of the devices (default: none)")),
    ("Model rollout", "--canary_percent", dict(
        type=float, default=0.0,
        help="percent of devices, picked by a stable hash of device_id, that the canary serves (default 0)")),
    ("Model rollout", "--shadow_model_dir", dict(
        default=None,
        help="a shadow model that scores every event too, to --shadow_score_topic (file mode: shadow-scores-*.avro); "
             "it never decides anything (default: none)")),
    ("Model rollout", "--shadow_score_topic", dict(
        default="sensor-scores-shadow", help="topic for the shadow model's SensorScore records "
                                             "(default sensor-scores-shadow)")),
    ("Drift", "--retrain_topic", dict(
        default="sensor-retrain", help="topic for RetrainTrigger records (default sensor-retrain)")),
    ("Drift", "--drift_window_s", dict(
        type=float, default=60.0, help="event-time window of the fleet-wide drift statistics (default 60)")),
    ("Drift", "--drift_psi_threshold", dict(
        type=float, default=3.0,
        help="a window drifts when its PSI exceeds this (default 3.0; fleet windows are clustered by device, "
             "unshifted simulated windows reach 2.2, a 3-std shift about 8)")),
    ("Drift", "--drift_ks_pvalue", dict(
        type=float, default=1e-6,
        help="or when its KS p-value, at the effective sample size, is below this (default 1e-6)")),
    ("Drift", "--retrain_after_windows", dict(
        type=int, default=3, help="consecutive drifting windows of one feature that emit a retrain trigger (default 3)")),
    ("Local processes", "--local_processes", dict(
        type=int, default=1,
        help="run the job as this many scoring processes on this machine, the input partitions split between "
             "them, plus one drift merger process (beam_jobs/local_processes.py): Beam's in-process runner uses "
             "one core per job. Process i serves --metrics_port + i. Use the machine's core count; on Flink leave "
             "it at 1 and set --parallelism (default 1)")),
    ("Local processes", "--drift_partials_topic", dict(
        default=None,
        help="internal topic where the scoring processes of --local_processes write their drift partial "
             "summaries for the merger (default: DRIFT_TOPIC-partials; a job given it writes partials there "
             "instead of drift records)")),
    ("Monitoring", "--metrics_port", dict(
        type=int, default=0, help="serve the live figures as Prometheus text on this port, /metrics (default 0: off)")),
    ("Monitoring", "--status_interval_s", dict(
        type=float, default=5.0, help="seconds between status lines in the log (default 5; 0: off)")),
    # Shared with the command-line tools (beam_jobs/security_options.py).
    *(("Security", flag, kwargs) for flag, _, kwargs in KAFKA_SECURITY_OPTIONS),
    ("Security", "--pseudonymize_key_env", dict(
        default=None,
        help="NAME of the environment variable holding an HMAC key: device ids are replaced by "
             "HMAC-SHA256(key, device_id) (32 hex characters), and event ids likewise, right after decoding, in every "
             "output (default: off)")),
    ("Security", "--audit_topic", dict(
        default=None,
        help="topic for one AuditRecord per anomaly: the event's readings, imputed features, score and model "
             "version (default: no audit records)")),
    ("Kafka", "--startup_timeout_s", dict(
        type=float, default=60.0,
        help="how long the job waits at launch for an unreachable broker, retrying with backoff (default 60)")),
    ("Files", "--input_files", dict(
        default=None,
        help="file mode: score recordings matching this glob ('DIR/*.avro') instead of Kafka, bounded; "
             "needs --output_dir")),
    ("Files", "--output_dir", dict(
        default=None,
        help="file mode: folder for scores-*.avro and dead-letters-*.avro")),
    # Read by Beam's Java Flink runner (FlinkPipelineOptions), not by Python: registered here so
    # they reach the job server with the pipeline, whichever way it is submitted (docs/flink.md).
    ("Flink", "--checkpointing_interval", dict(
        type=int, default=None, help="milliseconds between Flink checkpoints; offsets are committed after each "
                                     "(default: the cluster's execution.checkpointing.interval)")),
    ("Flink", "--checkpointing_mode", dict(
        choices=("EXACTLY_ONCE", "AT_LEAST_ONCE"), default=None, help="Flink checkpointing mode")),
    ("Flink", "--state_backend", dict(
        choices=("rocksdb", "filesystem"), default=None,
        help="Flink state backend for device state and timers; rocksdb for large fleets")),
    ("Flink", "--state_backend_storage_path", dict(
        default=None, help="durable URI for checkpoints, e.g. s3://bucket/sensor-scoring/checkpoints")),
    ("Flink", "--savepoint_path", dict(default=None, help="savepoint to restore the job's state from (upgrades)")),
    ("Flink", "--allow_non_restored_state", dict(
        action="store_true", default=None, help="start from a savepoint even if some of its state has no operator")),
    ("Flink", "--finish_bundle_before_checkpointing", dict(
        type=_true_or_false, default=None,
        help="finish the open bundle before each checkpoint barrier (default on Flink: true). Without it a bundle "
             "cut by a checkpoint keeps its output in operator state until that operator's next element, and "
             "the partition list, the only element of its stage, may never reach the reader (docs/flink.md)")),

]

# Beam itself registers --bootstrap_servers (KafkaStreamsRunnerOptions) with the
# same meaning and default; adding it again would be an argparse conflict.
_REGISTERED_BY_BEAM = {"--bootstrap_servers"}

# Beam's own options most users of this job need, shown in --help.
_BEAM_GROUPS = [StandardOptions, DirectOptions, FlinkRunnerOptions, PortableOptions, SetupOptions]


class SensorScoringOptions(PipelineOptions):
    """Options of ``python -m beam_jobs.sensor_scoring``; every Beam flag works too."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        for _, flag, kwargs in _OPTIONS:
            if flag not in _REGISTERED_BY_BEAM:
                parser.add_argument(flag, **kwargs)

    @property
    def bootstrap_servers(self) -> str:
        return self.get_all_options()["bootstrap_servers"]


def kafka_config(opts: SensorScoringOptions) -> KafkaConfig:
    """The connection settings every Kafka client of the job is built from (no secret inside)."""
    return KafkaConfig(opts.bootstrap_servers, security=kafka_security(opts))


def watermark_policy(opts: SensorScoringOptions) -> WatermarkPolicy:
    """The event-time rules of every input partition (transforms/event_time.py)."""
    return WatermarkPolicy.from_seconds(opts.max_out_of_orderness_s, opts.allowed_lateness_s, opts.partition_idle_s)


def rollout_config(opts: SensorScoringOptions) -> RolloutConfig:
    """Which models serve, from the options; checked at launch with RolloutConfig.check."""
    return RolloutConfig(
        model_dir=opts.model_dir, calibration_events=opts.calibration_events, quantize=opts.quantize,
        poll_s=opts.model_poll_s, canary_model_dir=opts.canary_model_dir, canary_percent=opts.canary_percent,
        shadow_model_dir=opts.shadow_model_dir,
    )


def help_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser used only to print --help: the job's options by group, then Beam's."""
    parser = argparse.ArgumentParser(prog=prog, description=description, usage="%(prog)s [options]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for group, flag, kwargs in _OPTIONS:
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        groups[group].add_argument(flag, **kwargs)
    for options_class in _BEAM_GROUPS:
        beam_parser = argparse.ArgumentParser(add_help=False)
        options_class._add_argparse_args(beam_parser)
        group = parser.add_argument_group(f"Beam {options_class.__name__}")
        for action in beam_parser._actions:
            group._add_action(action)
    return parser
