"""A throwaway Apache Kafka cluster (KRaft) on free loopback ports, for tests and benchmarks.

The broker and its run-time dependencies come from Maven Central: ``tests/kafka/pom.xml`` names
them and ``mvn dependency:copy-dependencies`` copies the jars once into a cache directory
(``$CDC_KAFKA_CACHE``, default ``~/.cache/cdc/kafka-<hash of the pom>``), reused on every later
start. Each node runs both KRaft roles (controller and broker) as ``java -cp ... kafka.Kafka``.

    with KafkaCluster(nodes=3) as kafka:
        kafka.bootstrap_servers      # "127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3"
        kafka.kill(kafka.leader("t")) # SIGKILL the partition leader; kafka.start_node(id) restarts it

Needs Java 17+ (``java`` on PATH or ``$JAVA_HOME``) and, for the first fetch, Maven (``mvn``).

Over 400 lines: one cluster's whole life (fetch, format, start, wait, kill, restart, clean up after
a killed test process) is one concern; split, the process handling would be scattered.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import ctypes
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdc.dev.postgres import free_port

POM = Path(__file__).resolve().parents[2] / "tests" / "kafka" / "pom.xml"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
HEAP = os.environ.get("CDC_KAFKA_HEAP", "512m")

# Warnings and errors only, one line each, to the node's log file (its stdout).
LOG4J2 = """\
status = error
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
"""


def _tool(name: str) -> str:
    home = os.environ.get("JAVA_HOME") if name == "java" else None
    path = str(Path(home) / "bin" / name) if home else shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        hint = {"java": "a Java 17+ runtime (Debian: openjdk-17-jre-headless)", "mvn": "Maven (Debian: maven)"}[name]
        raise RuntimeError(f"Apache Kafka for the tests needs {hint}: `{name}` is not on PATH (scripts/test-services installs it)")
    return path


def kafka_libs() -> Path:
    """The directory holding the broker's jars; fetched with Maven on first use, then reused."""
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cdc" / f"kafka-{digest}"
    libs = Path(os.environ.get("CDC_KAFKA_CACHE") or default)
    if (libs / ".complete").exists():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=libs.name + ".", dir=libs.parent))
    try:
        result = subprocess.run(
            [_tool("mvn"), "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
             "-DincludeScope=runtime", f"-DoutputDirectory={staging}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"fetching Apache Kafka with Maven ({POM}) failed:\n{result.stdout[-4000:]}")
        (staging / ".complete").touch()
        try:
            staging.rename(libs)  # atomic: a concurrent fetch that won the race is just as good
        except OSError:
            if not (libs / ".complete").exists():
                shutil.rmtree(libs, ignore_errors=True)
                staging.rename(libs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return libs


def _die_with_parent() -> None:
    # Linux: the JVM gets SIGKILL when the test process dies, even on kill -9, so no broker outlives it.
    # (Strictly when the thread that started it ends: start nodes from a long-lived thread.)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion from sync code, even when the caller is inside an event loop."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _cluster_id() -> str:
    """A random Kafka Uuid (base64url, no padding); like Kafka's own, never starting with '-',
    which a command line would read as an option."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


@dataclass
class SecureListeners:
    """Listeners beside PLAINTEXT, for tests of TLS and SASL: ``SSL``, ``SASL_PLAINTEXT`` and
    ``SASL_SSL`` on ports of their own. TLS uses a PKCS#12 keystore; SASL takes PLAIN and
    SCRAM-SHA-256/512 for each of ``users`` (name -> password)."""

    keystore: Path
    keystore_password: str
    users: dict[str, str]
    protocols: tuple[str, ...] = ("SSL", "SASL_PLAINTEXT", "SASL_SSL")
    # ACLs decide (StandardAuthorizer) for every user but these; PLAINTEXT and the controllers
    # (User:ANONYMOUS) are always super users. None: no authorizer, everyone may do everything.
    super_users: tuple[str, ...] | None = None


class KafkaNode:
    def __init__(self, node_id: int, root: Path):
        self.id = node_id
        self.port = free_port()
        self.controller_port = free_port()
        self.secure_ports: dict[str, int] = {}  # protocol -> port, with SecureListeners
        self.dir = root / f"node{node_id}"
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class KafkaCluster:
    """``nodes`` combined controller+broker nodes. Topics default to replication factor ``nodes``
    (at most 3) and ``min.insync.replicas`` 2 from three nodes up, as a production cluster would."""

    def __init__(self, nodes: int = 1, *, config: dict[str, Any] | None = None, base_dir: Path | None = None,
                 secure: SecureListeners | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="cdc-kafka-", dir=base_dir))
        self.nodes = {i: KafkaNode(i, self.root) for i in range(1, nodes + 1)}
        self.secure = secure
        if secure is not None:
            for node in self.nodes.values():
                node.secure_ports = {protocol: free_port() for protocol in secure.protocols}
        self.cluster_id = _cluster_id()
        rf = min(nodes, 3)
        self.config: dict[str, Any] = {
            "num.partitions": 1,
            "default.replication.factor": rf,
            "min.insync.replicas": 2 if nodes >= 3 else 1,
            "offsets.topic.replication.factor": rf,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": 2 if nodes >= 3 else 1,
            # start-up and tests that wait: no rebalance delay, retention checked every second
            "group.initial.rebalance.delay.ms": 0,
            "log.initial.task.delay.ms": 0,
            "log.retention.check.interval.ms": 1000,
            "offsets.topic.num.partitions": 1,
            **(config or {}),
        }
        self._classpath: str | None = None
        atexit.register(self.stop)

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(n.address for n in self.nodes.values())

    def secure_bootstrap(self, protocol: str, host: str = "127.0.0.1") -> str:
        """Bootstrap servers of a SecureListeners protocol (``host``: the name cdc dials)."""
        return ",".join(f"{host}:{n.secure_ports[protocol]}" for n in self.nodes.values())

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout_s: float = 120.0) -> "KafkaCluster":
        self._classpath = str(kafka_libs() / "*")
        try:
            formats = [self._format(node) for node in self.nodes.values()]  # in parallel: one JVM each
            for node, proc in zip(self.nodes.values(), formats):
                if proc.wait() != 0:
                    raise RuntimeError(f"formatting Kafka storage of node {node.id} failed:\n{self._tail(node)}")
            for node in self.nodes.values():
                self._launch(node)
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_config(self, node: KafkaNode) -> Path:
        node.dir.mkdir(parents=True, exist_ok=True)
        voters = ",".join(f"{n.id}@127.0.0.1:{n.controller_port}" for n in self.nodes.values())
        props = {
            "process.roles": "broker,controller",
            "node.id": node.id,
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": node.dir / "data",
            **self.config,
        }
        if self.secure is not None:
            props.update(self._secure_props(node))
        path = node.dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.root / "log4j2.properties").write_text(LOG4J2)
        return path

    def _secure_props(self, node: KafkaNode) -> dict[str, Any]:
        secure = self.secure
        assert secure is not None
        listeners = {p: f"{p}://127.0.0.1:{port}" for p, port in node.secure_ports.items()}
        advertised = {p: f"{p}://localhost:{port}" for p, port in node.secure_ports.items()}  # the certificate's name
        props: dict[str, Any] = {
            "listeners": ",".join([f"PLAINTEXT://127.0.0.1:{node.port}", f"CONTROLLER://127.0.0.1:{node.controller_port}",
                                   *listeners.values()]),
            "advertised.listeners": ",".join([f"PLAINTEXT://127.0.0.1:{node.port}", *advertised.values()]),
            "listener.security.protocol.map": ",".join(["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT",
                                                        *(f"{p}:{p}" for p in secure.protocols)]),
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": secure.keystore,
            "ssl.keystore.password": secure.keystore_password,
            "ssl.key.password": secure.keystore_password,
            "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
        }
        if secure.super_users is not None:
            props["authorizer.class.name"] = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
            props["super.users"] = ";".join(f"User:{u}" for u in ("ANONYMOUS", *secure.super_users))
        plain_users = " ".join(f'user_{name}="{password}"' for name, password in secure.users.items())
        for protocol in secure.protocols:
            if protocol.startswith("SASL_"):
                prefix = f"listener.name.{protocol.lower()}"
                props[f"{prefix}.plain.sasl.jaas.config"] = (
                    f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};")
                for mechanism in ("scram-sha-256", "scram-sha-512"):
                    props[f"{prefix}.{mechanism}.sasl.jaas.config"] = (
                        "org.apache.kafka.common.security.scram.ScramLoginModule required;")
        return props

    def _java(self, node: KafkaNode, *args: str) -> subprocess.Popen:
        log = open(node.log_path, "ab")
        try:
            return subprocess.Popen(
                [_tool("java"), f"-Xmx{HEAP}", "-Xms128m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                 f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}",
                 "-cp", self._classpath or "", *args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
            )
        finally:
            log.close()

    def _format(self, node: KafkaNode) -> subprocess.Popen:
        config = self._write_config(node)
        scram = []  # SCRAM credentials live in the cluster's metadata: written when formatting
        for name, password in (self.secure.users.items() if self.secure is not None else ()):
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                scram += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        return self._java(node, STORAGE_TOOL, "format", f"--cluster-id={self.cluster_id}", "--config", str(config),
                          "--ignore-formatted", *scram)

    def _launch(self, node: KafkaNode) -> None:
        node.proc = self._java(node, MAIN_CLASS, str(node.dir / "server.properties"))

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until every running node is a broker in the cluster's metadata and the controllers
        answer (creating a topic needs them)."""
        expected = {n.id for n in self.nodes.values() if n.running}
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"Kafka node {node.id} exited with {node.proc.returncode}:\n{self._tail(node)}")
            try:
                for node in self.nodes.values():  # listening first: the admin client logs every refusal
                    if node.running:
                        socket.create_connection(("127.0.0.1", node.port), timeout=0.5).close()
                last = _run_async(self._broker_ids())
                if last >= expected:
                    return
            except Exception as exc:  # not listening or not registered yet
                last = exc
            time.sleep(0.2)
        raise RuntimeError(f"Kafka did not have brokers {sorted(expected)} within {timeout_s}s (last: {last!r})")

    def stop(self) -> None:
        """SIGTERM every node (a controlled shutdown), SIGKILL what is left after 20 s; the data goes."""
        for node in self.nodes.values():
            if node.running:
                node.proc.terminate()
        deadline = time.monotonic() + 20
        for node in self.nodes.values():
            if node.proc is not None:
                try:
                    node.proc.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()
                node.proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "KafkaCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- faults --------------------------------------------------------------------------------

    def kill(self, node_id: int) -> None:
        """SIGKILL one node: no controlled shutdown, as a crashed machine."""
        node = self.nodes[node_id]
        assert node.proc is not None
        node.proc.kill()
        node.proc.wait()

    def pause(self, node_id: int) -> None:
        """SIGSTOP one node: it keeps its connections but answers nothing (requests time out)."""
        self.nodes[node_id].proc.send_signal(signal.SIGSTOP)

    def resume(self, node_id: int) -> None:
        self.nodes[node_id].proc.send_signal(signal.SIGCONT)

    def stop_node(self, node_id: int, timeout_s: float = 30.0) -> None:
        node = self.nodes[node_id]
        if node.running:
            node.proc.terminate()
            node.proc.wait(timeout_s)

    def start_node(self, node_id: int, timeout_s: float = 60.0) -> None:
        """Start a stopped or killed node again on its ports and data; waits until it is a broker again."""
        self._launch(self.nodes[node_id])
        self.wait_ready(timeout_s)

    def acls(self, *args: str) -> str:
        """Run kafka-acls (AclCommand) against the cluster as a super user; returns its output."""
        node = next(n for n in self.nodes.values() if n.running)
        proc = subprocess.run(
            [_tool("java"), "-Xmx256m", f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}",
             "-cp", self._classpath or str(kafka_libs() / "*"), "org.apache.kafka.tools.AclCommand",
             "--bootstrap-server", node.address, *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"kafka-acls {' '.join(args)} failed:\n{proc.stdout[-4000:]}")
        return proc.stdout

    # ---- what the cluster reports --------------------------------------------------------------

    def leader(self, topic: str, partition: int = 0) -> int:
        """Node id of the partition's leader."""
        return _run_async(self._leader(topic, partition))

    async def _admin(self):
        from aiokafka.admin import AIOKafkaAdminClient  # a runtime dependency of cdc anyway

        running = ",".join(n.address for n in self.nodes.values() if n.running)
        admin = AIOKafkaAdminClient(bootstrap_servers=running, request_timeout_ms=5000)
        await admin.start()
        return admin

    async def _broker_ids(self) -> set[int]:
        admin = await self._admin()
        try:
            return {b["node_id"] for b in (await admin.describe_cluster())["brokers"]}
        finally:
            await admin.close()

    async def _leader(self, topic: str, partition: int) -> int:
        admin = await self._admin()
        try:
            (description,) = await admin.describe_topics([topic])
            return next(p["leader"] for p in description["partitions"] if p["partition"] == partition)
        finally:
            await admin.close()

    def _tail(self, node: KafkaNode) -> str:
        try:
            return node.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"
