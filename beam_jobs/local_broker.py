"""The two brokers this project can start on loopback, by name, for run_local.sh and the benchmarks.

``tansu`` (``embedded_broker``): starts in 0.1 s with 15 MiB, no Java; the
quick start. ``kafka`` (``kafka_cluster``): Apache Kafka 4.4.0, what
production runs; 6-12 s and about 350 MiB per node here. Both are context
managers with ``bootstrap_servers`` (PLAINTEXT).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from beam_jobs.embedded_broker import EmbeddedBroker
from beam_jobs.kafka_cluster import KafkaCluster

BROKERS = ("tansu", "kafka")
LocalBroker = Union[EmbeddedBroker, KafkaCluster]


def local_broker(name: str, folder: Optional[Path] = None) -> LocalBroker:
    """A broker of that kind, not started yet; Kafka keeps its data and logs in `folder` (None: a temporary one)."""
    if name == "tansu":
        return EmbeddedBroker()
    if name == "kafka":
        return KafkaCluster(folder=folder)
    raise ValueError(f"broker must be one of {BROKERS}, not {name!r}")


def job_flags(broker: Optional[LocalBroker]) -> list[str]:
    """Job flags a broker needs beyond the defaults, which are Apache Kafka's (None: an outside broker).

    Tansu holds a fetch that finds nothing for its whole max wait (Kafka
    answers it when data arrives): at the default 500 ms a record written
    just after a fetch waited up to half a second (benchmarks/broker_settings.py).
    """
    return ["--fetch_max_wait_ms", "50"] if isinstance(broker, EmbeddedBroker) else []


def broker_cpu_seconds(broker: LocalBroker) -> float:
    """CPU time (user + system) the broker's processes have used so far: on two cores the broker competes with the job."""
    pids = [node.process.pid for node in broker.nodes if node.process] if isinstance(broker, KafkaCluster) \
        else [broker.pid] if broker.pid else []
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def add_broker_argument(parser, what: str) -> None:
    """``--broker tansu|kafka`` for a tool that starts its own broker."""
    parser.add_argument("--broker", choices=BROKERS, default="tansu",
                        help=f"the broker {what} starts: tansu (embedded, 0.1 s, no Java; the default) or kafka "
                             "(Apache Kafka 4.4.0 in KRaft mode, about 7 s; needs Java 17 and Maven once, "
                             "scripts/fetch_kafka.sh)")
