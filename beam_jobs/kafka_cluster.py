"""Apache Kafka itself on loopback: one KRaft node, or a few, for tests, benchmarks and ``run_local.sh --broker kafka``.

The embedded Tansu broker (``embedded_broker``) starts in a fraction of a
second and needs no Java, but it is not the broker production runs: it holds
an empty fetch for its whole max wait, has no SASL users and serves TLS only
through a proxy. This launcher runs ``org.apache.kafka:kafka_2.13`` (the jars
``scripts/fetch_kafka.sh`` fetches once with Maven into a cache outside git)
in KRaft combined mode, each node both broker and controller:

* storage formatted with ``kafka.tools.StorageTool format``, which also adds
  the SCRAM-SHA-512 users (an admin, ``scorer`` with rights on every topic
  and group, ``outsider`` with none), then ``kafka.Kafka server.properties``;
* three client listeners per node on free ports: PLAINTEXT, SSL and SASL_SSL
  (SCRAM-SHA-512), TLS with a CA and certificate made on the fly;
* ``StandardAuthorizer``: PLAINTEXT and SSL clients are anonymous super users
  (the tests' own clients and the brokers' traffic), SASL users get what the
  ACLs give them;
* with three nodes: replication factor 3 and ``min.insync.replicas`` 2 for
  every topic, and a dead broker fenced after 3 s instead of 9 s.

Logs go to ``server.log`` (log4j) and ``console.log`` (the JVM's own output)
in each node's folder. Every JVM is stopped with its owner (see
``broker_process``).

Run ``python -m beam_jobs.kafka_cluster [--nodes 3]`` to keep one in the
foreground.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Optional

from beam_jobs.broker_process import free_port, port_answers, start_owned, stop_processes
from beam_jobs.throwaway_certificates import TlsFiles, make_certificates
from transforms.kafka_client import KafkaConfig, KafkaSecurity, make_admin

KAFKA_VERSION = "4.4.0"
FETCH_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fetch_kafka.sh"
SCRAM = "SCRAM-SHA-512"
ADMIN, SCORER, OUTSIDER = "admin", "scorer", "outsider"
LISTENERS = ("PLAINTEXT", "SSL", "SASL_SSL")

_LOG4J2 = """status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.state.name = state.change.logger
logger.state.level = WARN
"""


class KafkaNotInstalled(RuntimeError):
    """Java or the Kafka jars are missing; the message says what to install."""


def kafka_classpath() -> str:
    """The jars' classpath (``libs/*``), fetched on first use by scripts/fetch_kafka.sh."""
    done = subprocess.run(["bash", str(FETCH_SCRIPT)], capture_output=True, text=True)
    if done.returncode != 0:
        raise KafkaNotInstalled(done.stderr.strip() or f"{FETCH_SCRIPT} failed with code {done.returncode}")
    return str(Path(done.stdout.strip().splitlines()[-1]) / "*")


class Ports(NamedTuple):
    plaintext: int
    ssl: int
    sasl_ssl: int
    controller: int


@dataclass
class KafkaNode:
    """One KRaft node (broker and controller) and its process."""

    node_id: int
    folder: Path
    ports: Ports = field(default_factory=lambda: Ports(free_port(), free_port(), free_port(), free_port()))
    process: Optional[subprocess.Popen] = None

    def port(self, listener: str) -> int:
        return self.ports[LISTENERS.index(listener)]

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class KafkaCluster:
    """Apache Kafka nodes on 127.0.0.1, ready when ``start()`` returns; a context manager.

    Args:
        nodes: KRaft nodes; 1 for tests and local runs, 3 for replication.
        folder: where data, configs and logs go; None: a temporary folder,
            removed on stop (give one to keep the logs).
        heap_mb: each JVM's maximum heap.
        settings: broker properties that override the defaults below.
    """

    def __init__(self, nodes: int = 1, folder: Optional[Path] = None, heap_mb: int = 512,
                 settings: Optional[dict[str, str]] = None):
        self._own_folder = folder is None
        self.folder = Path(folder or tempfile.mkdtemp(prefix="kafka-"))
        self.nodes = [KafkaNode(i, self.folder / f"node-{i}") for i in range(1, nodes + 1)]
        self.heap_mb = heap_mb
        self._settings = settings or {}
        self.passwords = {user: secrets.token_urlsafe(18) for user in (ADMIN, SCORER, OUTSIDER)}
        self.tls: Optional[TlsFiles] = None
        self.started_in_s: Optional[float] = None

    # -- addresses and client settings --------------------------------------------------------------------------

    def bootstrap(self, listener: str = "PLAINTEXT") -> str:
        """``host:port,...`` of every node's `listener` (PLAINTEXT, SSL or SASL_SSL)."""
        return ",".join(f"127.0.0.1:{node.port(listener)}" for node in self.nodes)

    @property
    def bootstrap_servers(self) -> str:
        return self.bootstrap("PLAINTEXT")

    def security(self, listener: str = "PLAINTEXT", user: Optional[str] = None,
                 password_env: Optional[str] = None) -> KafkaSecurity:
        """The client settings for a listener; SASL_SSL needs the user and the variable its password is in."""
        if listener == "PLAINTEXT":
            return KafkaSecurity()
        assert self.tls is not None, "start the cluster first"
        if listener == "SSL":
            return KafkaSecurity("SSL", ssl_cafile=str(self.tls.ca))
        return KafkaSecurity("SASL_SSL", ssl_cafile=str(self.tls.ca), sasl_mechanism=SCRAM, sasl_username=user,
                             sasl_password_env=password_env)

    def config(self, listener: str = "PLAINTEXT", user: Optional[str] = None,
               password_env: Optional[str] = None) -> KafkaConfig:
        return KafkaConfig(self.bootstrap(listener), security=self.security(listener, user, password_env))

    # -- life cycle ---------------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 90.0) -> "KafkaCluster":
        started = time.monotonic()
        classpath = kafka_classpath()
        tls_folder = self.folder / "tls"
        tls_folder.mkdir(parents=True, exist_ok=True)
        self.tls = make_certificates(tls_folder, ca_name="sensor-scoring Kafka CA")
        keystore = tls_folder / "broker-keystore.pem"  # Kafka's PEM keystore: the key, then the certificate
        keystore.write_bytes(self.tls.key.read_bytes() + self.tls.cert.read_bytes())
        cluster_id = "-"
        while cluster_id.startswith("-"):  # StorageTool would take a leading "-" for an option
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        for node in self.nodes:
            shutil.rmtree(node.folder, ignore_errors=True)  # always a fresh cluster: storage is formatted anew
            node.folder.mkdir(parents=True)
            (node.folder / "server.properties").write_text(self._properties(node, keystore))
            (node.folder / "log4j2.properties").write_text(_LOG4J2.format(log=node.log))
        try:
            self._format(classpath, cluster_id)
            for node in self.nodes:
                self._launch(classpath, node)
            self._wait_until_ready(started + timeout_s)
            self._grant_scorer()
        except BaseException:
            self.stop()
            raise
        self.started_in_s = time.monotonic() - started
        return self

    def _properties(self, node: KafkaNode, keystore: Path) -> str:
        n = len(self.nodes)
        voters = ",".join(f"{other.node_id}@127.0.0.1:{other.ports.controller}" for other in self.nodes)
        listeners = [f"{name}://127.0.0.1:{node.port(name)}" for name in LISTENERS]
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": ",".join([*listeners, f"CONTROLLER://127.0.0.1:{node.ports.controller}"]),
            "advertised.listeners": ",".join(listeners),
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(node.folder / "data"),
            "num.partitions": "4",
            "default.replication.factor": str(min(n, 3)),
            "min.insync.replicas": str(min(n, 2)),
            "offsets.topic.replication.factor": str(min(n, 3)),
            "offsets.topic.num.partitions": "8",  # 50 by default: the first consumer group waited for all of them
            "transaction.state.log.replication.factor": str(min(n, 3)),
            "transaction.state.log.min.isr": str(min(n, 2)),
            "share.coordinator.state.topic.replication.factor": str(min(n, 3)),
            "share.coordinator.state.topic.min.isr": str(min(n, 2)),
            "group.initial.rebalance.delay.ms": "0",
            # Records carry their event time (2023-2025 in the tests and the simulator): with the default 7-day
            # retention, the first retention check deleted whole topics while tests were still reading them.
            "log.retention.ms": "-1",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            # PLAINTEXT and SSL clients (and the brokers themselves) are ANONYMOUS: the tests' own clients.
            "super.users": f"User:ANONYMOUS;User:{ADMIN}",
            "sasl.enabled.mechanisms": SCRAM,
            f"listener.name.sasl_ssl.{SCRAM.lower()}.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(keystore),
            "ssl.client.auth": "none",
        }
        if n > 1:  # fence a killed broker after 3 s (default 9 s), so the tests' failover is quick
            settings.update({"broker.heartbeat.interval.ms": "500", "broker.session.timeout.ms": "3000"})
        settings.update(self._settings)
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _java(self, classpath: str, node: KafkaNode, main: str, heap_mb: int) -> list[str]:
        java = str(Path(os.environ["JAVA_HOME"]) / "bin" / "java") if os.environ.get("JAVA_HOME") else "java"
        return [java, f"-Xmx{heap_mb}m", f"-Xms{min(heap_mb, 128)}m", "-XX:+UseSerialGC",
                "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={node.folder / 'log4j2.properties'}", "-cp", classpath, main]

    def _format(self, classpath: str, cluster_id: str) -> None:
        """Formats every node's storage at once (one JVM each, about 1.5 s), with the SCRAM users."""
        users = [a for user, password in self.passwords.items()
                 for a in ("--add-scram", f"{SCRAM}=[name={user},password={password}]")]
        formats = [(node, start_owned(
            [*self._java(classpath, node, "kafka.tools.StorageTool", 256), "format", "-t", cluster_id,
             "-c", str(node.folder / "server.properties"), *users],
            log=node.folder / "format.log")) for node in self.nodes]
        for node, process in formats:
            if process.wait(timeout=120) != 0:
                raise RuntimeError(f"formatting Kafka node {node.node_id} failed (code {process.returncode}): "
                                   f"{(node.folder / 'format.log').read_text()[-2000:]}")

    def _launch(self, classpath: str, node: KafkaNode) -> None:
        node.process = start_owned([*self._java(classpath, node, "kafka.Kafka", self.heap_mb),
                                    str(node.folder / "server.properties")], log=node.folder / "console.log")

    def _wait_until_ready(self, deadline: float) -> None:
        """Every node listens and the cluster reports all of them: then topics get all their replicas."""
        while not all(port_answers(node.ports.plaintext) for node in self.nodes):
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"Kafka did not listen on {self.bootstrap_servers} in time; see {self.folder}")
            time.sleep(0.1)
        admin = make_admin(self.config(), timeout_s=max(1.0, deadline - time.monotonic()))
        try:
            while len(admin.describe_cluster()["brokers"]) < len(self.nodes):
                self._check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not every Kafka node joined the cluster in time; see {self.folder}")
                time.sleep(0.2)
        finally:
            admin.close()

    def _check_alive(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"Kafka node {node.node_id} exited with code {node.process.returncode}: "
                                   f"{_tail(node.folder / 'console.log')}{_tail(node.log)}")

    def _grant_scorer(self) -> None:
        """``scorer`` may do anything with any topic and consumer group; ``outsider`` gets nothing."""
        from kafka.admin import (ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern,
                                 ResourceType)

        admin = make_admin(self.config())
        try:
            admin.create_acls([ACL(f"User:{SCORER}", "*", ACLOperation.ALL, ACLPermissionType.ALLOW,
                                   ResourcePattern(kind, "*", ACLResourcePatternType.LITERAL))
                               for kind in (ResourceType.TOPIC, ResourceType.GROUP)])
        finally:
            admin.close()

    def stop(self) -> None:
        """Stops every node (SIGTERM, SIGKILL after 10 s); removes the folder if this launcher made it."""
        stop_processes([node.process for node in self.nodes if node.process is not None])
        for node in self.nodes:
            node.process = None
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- faults, for tests --------------------------------------------------------------------------------------

    def node(self, node_id: int) -> KafkaNode:
        return self.nodes[node_id - 1]

    def pid(self, node_id: int = 1) -> Optional[int]:
        process = self.node(node_id).process
        return process.pid if process else None

    def kill(self, node_id: int) -> None:
        """SIGKILL: the node stops at once, as in a power cut; its data folder stays for a restart."""
        node = self.node(node_id)
        if node.process is not None:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait()

    def restart(self, node_id: int) -> None:
        """Starts a killed node again on the same ports and data."""
        self._launch(kafka_classpath(), self.node(node_id))

    def leaders(self, topic: str) -> dict[int, int]:
        """Partition -> id of the node that leads it now (-1 while none does)."""
        admin = make_admin(self.config())
        try:
            (described,) = admin.describe_topics([topic])
            return {p["partition_index"]: p["leader_id"] for p in described["partitions"]}
        finally:
            admin.close()

    def __enter__(self) -> "KafkaCluster":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return f"\n--- {path}:\n{path.read_text(errors='replace')[-chars:]}"
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1, help="KRaft nodes (default 1; 3 replicates every topic)")
    parser.add_argument("--folder", type=Path, default=Path("out/kafka"),
                        help="data, configs and logs (default out/kafka; emptied first)")
    parser.add_argument("--heap_mb", type=int, default=512, help="each JVM's maximum heap (default 512)")
    args = parser.parse_args(argv)
    shutil.rmtree(args.folder, ignore_errors=True)
    cluster = KafkaCluster(args.nodes, args.folder, args.heap_mb)
    try:
        cluster.start()
    except (KafkaNotInstalled, RuntimeError) as e:
        print(f"kafka_cluster failed: {e}", file=sys.stderr)
        sys.exit(2)
    users = args.folder / "sasl-users.env"
    users.write_text("".join(f"KAFKA_PASSWORD_{user.upper()}={password}\n"
                             for user, password in cluster.passwords.items()))
    users.chmod(0o600)
    print(f"Apache Kafka {KAFKA_VERSION}, {args.nodes} node(s), started in {cluster.started_in_s:.1f} s; "
          f"logs in {args.folder}/node-*/server.log\n"
          f"  PLAINTEXT {cluster.bootstrap('PLAINTEXT')}\n"
          f"  SSL       {cluster.bootstrap('SSL')}  (--ssl_cafile {cluster.tls.ca})\n"
          f"  SASL_SSL  {cluster.bootstrap('SASL_SSL')}  ({SCRAM}; users {SCORER}, {OUTSIDER} (no rights), "
          f"{ADMIN}; passwords in {users})\n"
          "Ctrl-C stops it", flush=True)
    try:
        while all(node.running() for node in cluster.nodes):
            time.sleep(1)
        print("a Kafka node exited; see its server.log", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
