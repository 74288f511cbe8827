"""The local stack's Kafka broker: KRaft, one node, jars resolved by Maven."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.topics import KafkaConfig
from sluice.admin import wait_for_broker
from sluice.errors import StackError
from sluice.stack.config import StackConfig
from sluice.stack.processes import _LOG_TAIL_LINES, _run_sync, _Service
from sluice.stack.security import StackSecrets, write_private

# The broker's Maven manifest is package data, so an installed sluice has it too.
_POM = resources.files("sluice.stack").joinpath("kafka/pom.xml")
_KAFKA_JAR_GLOB = "kafka_2.13-*.jar"
_MAVEN_TIMEOUT_S = 900.0  # a cold ~/.m2 downloads ~60 MB (about 45 s measured)

# Every young-generation pause of the broker holds every request in flight.
# G1 as kafka-run-class.sh sets it (20 ms pause goal, old-generation marking
# started early) sized its young generation to the goal: ~20 ms pauses every
# ~3 s at 1,000 requests/s, about 0.8% of the time stopped, which alone puts
# a p99 of 25 ms out of reach. The parallel collector, without G1's
# remembered sets, paused 10-18 ms every 6-10 s (0.2% of the time); its
# price is a full collection (~0.2 s for 200 MB) when the old generation
# fills: the old generation grew ~4 MB a minute under that load, so about
# two hours apart (bench/RESULTS.md).
_GC_OPTIONS: dict[str, tuple[str, ...]] = {
    "parallel": ("-XX:+UseParallelGC",),
    "g1": (
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
    ),
}

# The secure broker's principals. `admin` is the super user every Kafka-side
# task of the stack runs as (inter-broker traffic, topic creation, users,
# ACLs); `controller` only authenticates the KRaft controller listener.
ADMIN_USER = "admin"
CONTROLLER_USER = "controller"
SCRAM_MECHANISM = "SCRAM-SHA-512"


class KafkaBroker:
    """LocalStack's Kafka part (a mixin: it uses the stack's config,
    `_kafka` service, `_log`, `_which`, `_spawn` and `_wait_until`)."""

    if TYPE_CHECKING:  # what LocalStack provides
        config: StackConfig
        _kafka: _Service
        _log: Callable[[str], None]

        _secrets: StackSecrets

        @property
        def bootstrap_servers(self) -> str: ...
        @property
        def kafka_admin(self) -> str | KafkaConfig: ...

        @staticmethod
        def _which(program: str, hint: str) -> str: ...
        def _spawn(self, svc: _Service, argv: list[str]) -> int: ...
        def _wait_until(self, svc: _Service, pid: int, ready: Callable[[float], bool], what: str) -> None: ...

    def _ensure_jars(self) -> Path:
        kafka_dir = self._kafka.dir
        libs = kafka_dir / "libs"
        if any(libs.glob(_KAFKA_JAR_GLOB)):
            return libs
        mvn = self._which("mvn", "apt-get install maven")
        if not _POM.is_file():
            raise StackError(f"the Kafka pom is missing from the installed package ({_POM})")
        # Maven wants a file of its own to work beside, never the installed package's folder.
        pom = kafka_dir / "pom.xml"
        kafka_dir.mkdir(parents=True, exist_ok=True)
        pom.write_bytes(_POM.read_bytes())
        # Resolve into a side folder and rename when complete, so an interrupted
        # run never leaves a libs folder that looks resolved but is not.
        partial = kafka_dir / "libs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        self._log("kafka: resolving Kafka jars with Maven (first time only)...")
        start = time.monotonic()
        try:
            done = subprocess.run(
                [
                    mvn,
                    "-q",
                    "-B",
                    "-f",
                    str(pom),
                    "dependency:copy-dependencies",
                    "-DincludeScope=runtime",
                    f"-DoutputDirectory={partial}",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_MAVEN_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"Maven did not resolve the Kafka jars within {_MAVEN_TIMEOUT_S:g} s") from exc
        if done.returncode != 0 or not any(partial.glob(_KAFKA_JAR_GLOB)):
            output = "\n".join((done.stdout + done.stderr).splitlines()[-_LOG_TAIL_LINES:])
            raise StackError(f"Maven could not resolve the Kafka jars (exit {done.returncode}):\n{output}")
        shutil.rmtree(libs, ignore_errors=True)
        partial.rename(libs)
        self._log(f"kafka: jars resolved in {time.monotonic() - start:.0f} s")
        return libs

    def _write_kafka_config(self) -> Path:
        """Write server.properties and log4j.properties; returns server.properties.

        Rewritten on every start so that changed ports take effect.
        """
        kafka_dir = self._kafka.dir
        port, cport = self.config.kafka_port, self.config.kafka_controller_port
        settings: dict[str, str] = {
            # One node that is both the KRaft controller and the broker.
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{cport}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self._kafka_data_dir()),
            # Internal topics must fit on a single broker.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "num.partitions": "1",
            # Consumers join at once instead of waiting 3 s for more members.
            "group.initial.rebalance.delay.ms": "0",
            # Callers name their own reply_to topics; the broker creates them.
            "auto.create.topics.enable": "true",
            # A dev stack: keep a day, in segments small enough to be deleted.
            "log.retention.hours": "24",
            "log.segment.bytes": str(64 * 1024 * 1024),
            # A new segment's two index files are sparse and memory-mapped;
            # the first write into each faults, and the kernel reads ahead
            # around the fault: up to read_ahead_kb (8 MB here) of zeroed
            # pages, in the request handler thread, while produce requests
            # wait. 36 new partitions took ~150 ms of CPU that way (perf),
            # every hit sent then was 40-80 ms late. 1 MB still indexes a
            # 64 MB segment (16,384 entries at one per 4 KiB: 128 KB of
            # offsets, 192 KB of times); a full index only rolls early.
            "log.index.size.max.bytes": str(1024 * 1024),
            # Fewer threads and internal partitions: a laptop, not a cluster.
            "num.network.threads": "2",
            "num.io.threads": "4",
            "offsets.topic.num.partitions": "10",
        }
        if self.config.stack_secure:
            settings.update(self._security_settings())
        server_properties = kafka_dir / "server.properties"
        text = "# Written by sluice.stack on every start; edits are overwritten.\n" + "".join(
            f"{key}={value}\n" for key, value in settings.items()
        )
        if self.config.stack_secure:
            write_private(server_properties, text)  # it holds the stores' and JAAS passwords
        else:
            server_properties.write_text(text)
        (kafka_dir / "log4j.properties").write_text(
            "log4j.rootLogger=WARN, stdout\n"
            "log4j.appender.stdout=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
        )
        return server_properties

    def _security_settings(self) -> dict[str, str]:
        """server.properties of the secure broker: one SASL_SSL listener for
        clients and for the broker itself, SCRAM, ACLs with no allow-by-default,
        and a controller listener that takes a password too.

        The controller listener uses SASL_PLAINTEXT with PLAIN and a static
        JAAS user: KRaft cannot serve SCRAM there (SCRAM credentials live in
        the metadata log the controller itself serves), and it stays on
        127.0.0.1. The broker's own side of both listeners logs in with the
        `username`/`password` of the same JAAS entries.
        """
        port = self.config.kafka_port
        cport = self.config.kafka_controller_port
        sec = self._secrets
        admin_pw = self._admin_password()
        controller_pw = sec.password(CONTROLLER_USER)
        return {
            "listeners": f"SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"SASL_SSL://127.0.0.1:{port}",
            "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:SASL_PLAINTEXT",
            "inter.broker.listener.name": "SASL_SSL",
            "sasl.mechanism.inter.broker.protocol": SCRAM_MECHANISM,
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.sasl_ssl.sasl.enabled.mechanisms": SCRAM_MECHANISM,
            f"listener.name.sasl_ssl.{SCRAM_MECHANISM.lower()}.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="{ADMIN_USER}" password="{admin_pw}";'
            ),
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": (
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'username="{CONTROLLER_USER}" password="{controller_pw}" '
                f'user_{CONTROLLER_USER}="{controller_pw}";'
            ),
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(sec.keystore),
            "ssl.keystore.password": sec.password("keystore"),
            "ssl.key.password": sec.password("keystore"),
            "ssl.truststore.type": "PKCS12",
            "ssl.truststore.location": str(sec.truststore),
            "ssl.truststore.password": sec.password("truststore"),
            "ssl.client.auth": "none",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{ADMIN_USER};User:{CONTROLLER_USER}",
            "allow.everyone.if.no.acl.found": "false",
        }

    def _admin_password(self) -> str:
        """The admin's password: made before the secure data folder is
        formatted, fixed from then on (the folder's metadata holds it)."""
        data = self._kafka_data_dir()
        return self._secrets.password(
            ADMIN_USER,
            create=not (data / "meta.properties").exists(),
            hint=f"{data} was formatted with it; restore it, or `sluice down` and delete {data} to start over",
        )

    def _kafka_data_dir(self) -> Path:
        """The KRaft log dirs. The secure broker keeps its own: a folder
        formatted plaintext holds no admin SCRAM credential (it can only be
        added at format time) and no ACLs, and the plaintext stack's data
        stays intact for when the stack runs without --secure again."""
        return self._kafka.dir / ("data-secure" if self.config.stack_secure else "data")

    def _format_storage(self, java_bin: str, libs: Path, server_properties: Path) -> None:
        data = self._kafka_data_dir()
        if (data / "meta.properties").exists():
            return
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        self._log(f"kafka: formatting storage in {data} (cluster id {cluster_id})")
        scram: list[str] = []
        if self.config.stack_secure:
            # The admin's credential must be in the metadata before the broker
            # starts: the broker logs in as admin over its own SASL_SSL listener,
            # and only admin may create the other users. The storage tool takes
            # it only as an argument (a short-lived process, never a running one).
            password = self._admin_password()
            scram = ["--add-scram", f"{SCRAM_MECHANISM}=[name={ADMIN_USER},password={password}]"]
        done = subprocess.run(
            [
                java_bin,
                "-cp",
                f"{libs}/*",
                "kafka.tools.StorageTool",
                "format",
                # one word: a URL-safe base64 id starts with "-" one time in
                # 64, and the tool then took it for an option
                f"--cluster-id={cluster_id}",
                "--standalone",
                "--config",
                str(server_properties),
                *scram,
            ],
            cwd=self._kafka.dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).splitlines()[-_LOG_TAIL_LINES:])
            if scram:  # the tool may quote its arguments back
                output = output.replace(self._admin_password(), "<redacted>")
            raise StackError(f"formatting Kafka storage failed (exit {done.returncode}):\n{output}")

    def _start_kafka(self, java_bin: str, libs: Path, server_properties: Path) -> int:
        pid = self._spawn(
            self._kafka,
            [
                java_bin,
                f"-Xmx{self.config.kafka_heap_mb}m",
                f"-Xms{self.config.kafka_heap_mb}m",
                *_GC_OPTIONS[self.config.kafka_gc],
                # Die rather than limp along; the log tail then says why.
                "-XX:+ExitOnOutOfMemoryError",
                *self.config.kafka_jvm_options.split(),
                f"-Dlog4j.configuration=file:{self._kafka.dir / 'log4j.properties'}",
                "-cp",
                f"{libs}/*",
                "kafka.Kafka",
                str(server_properties),
            ],
        )
        self._log(f"kafka: started pid {pid} on {self.bootstrap_servers}")
        return pid

    def _wait_kafka(self, pid: int, *, announce: bool) -> None:
        admin = self.kafka_admin  # outside the loop: a missing secret fails at once

        def answers(timeout_s: float) -> bool:
            try:
                _run_sync(wait_for_broker(admin, timeout_s))
            except StackError:
                return False
            return True

        start = time.monotonic()
        self._wait_until(self._kafka, pid, answers, "the broker to answer")
        if announce:
            self._log(f"kafka: answering on {self.bootstrap_servers} (after {time.monotonic() - start:.1f} s)")
