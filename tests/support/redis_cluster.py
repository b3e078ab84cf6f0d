"""A real three-master Redis Cluster on loopback, for tests: no replicas, nothing persisted.

Each node is a `RedisServer` with `--cluster-enabled yes`, its own directory and cluster config
file, and a short `--cluster-node-timeout` so a stopped node is noticed within seconds. The
nodes are joined by `redis-cli --cluster create` (which assigns the 16384 slots in three even
ranges), and `start()` returns once every node reports `cluster_state:ok`.

The cluster bus of a node listens on a second port. Redis defaults it to port + 10000, which
may be taken (or above 65535); Redis 7's `--cluster-port` names it instead, so both ports are
ordinary free ports and a clash is only the usual race of `free_port`, retried a few times.

A stopped node restarts on the same ports with the same config file, so it rejoins as the same
node (same id, same slots) — but empty, since nothing is persisted.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.support.process import free_port
from tests.support.redis_server import RedisServer

#: how many times a node is started on fresh ports when its ports were taken meanwhile
PORT_ATTEMPTS = 4


class ClusterNotReady(RuntimeError):
    """The cluster did not reach the state asked for in time."""


class RedisClusterServers:
    """Three (or `masters`) cluster nodes; `urls` name them, `stop()` ends them all."""

    def __init__(self, directory: Path, masters: int = 3, node_timeout_ms: int = 2000) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed (make test-deps installs it)")
        self.cli = cli
        self.directory = directory
        self.masters = masters
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []
        self._taken: set[int] = set()

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        """Start the nodes, join them into one cluster and wait until it serves every slot."""
        deadline = time.monotonic() + timeout
        try:
            for index in range(self.masters):
                self.nodes.append(self._start_fresh_node(index))
            self._create(max(1.0, deadline - time.monotonic()))
            self.wait_ok(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()  # a half-made cluster must not outlive the fixture that failed to make it
            raise
        return self

    def _start_fresh_node(self, index: int) -> RedisServer:
        directory = self.directory / f"node-{index}"
        directory.mkdir(parents=True, exist_ok=True)
        failure: RuntimeError | None = None
        for _ in range(PORT_ATTEMPTS):
            # a config file from an attempt on other ports would make the node a stranger to them
            (directory / "nodes.conf").unlink(missing_ok=True)
            port, bus = self._free_port(), self._free_port()
            node = RedisServer(
                directory,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",  # relative to --dir, which is the node's own directory
                "--cluster-port",
                str(bus),
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                port=port,
            )
            try:
                return node.start()
            except RuntimeError as exc:
                # most likely one of the two ports was taken between free_port and bind
                node.stop()
                failure = exc
        assert failure is not None
        raise failure

    def _free_port(self) -> int:
        """A free loopback port not already handed to another node (nor its bus) here."""
        for _ in range(100):
            port = free_port()
            if port not in self._taken:
                self._taken.add(port)
                return port
        raise RuntimeError("no free port distinct from the cluster's others")

    def _create(self, timeout: float) -> None:
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        argv = [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", "0"]
        done = subprocess.run(
            [*argv, "--cluster-yes"],  # answer its "Can I set the above configuration?"
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")

    def info(self, index: int) -> dict[str, str]:
        """A node's CLUSTER INFO as a mapping (`cluster_state`, `cluster_known_nodes` …)."""
        text = self.nodes[index].command("CLUSTER", "INFO")
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {key.strip(): value.strip() for key, value in pairs}

    def wait_ok(self, timeout: float = 30.0, nodes: list[int] | None = None) -> None:
        """Poll until every node (or those in `nodes`) says the whole cluster is usable."""
        self.wait_state("ok", timeout, nodes)

    def wait_state(self, state: str, timeout: float, nodes: list[int] | None = None) -> None:
        """Poll CLUSTER INFO until `cluster_state` is `state` on each of `nodes` (all by default).

        For `ok` the node must also know all the nodes and see every slot served: a node that
        has just joined can say ok before it has heard of the others' slots.
        """
        indices = list(range(len(self.nodes))) if nodes is None else nodes
        deadline = time.monotonic() + timeout
        seen: dict[int, dict[str, str] | str] = {}
        while True:
            for index in indices:
                try:
                    seen[index] = self.info(index)
                except (subprocess.SubprocessError, OSError) as exc:
                    seen[index] = f"no answer: {exc}"
            if all(self._in_state(seen[index], state) for index in indices):
                return
            if time.monotonic() >= deadline:
                raise ClusterNotReady(f"cluster_state never became {state}: {seen}")
            time.sleep(0.05)

    def _in_state(self, info: dict[str, str] | str, state: str) -> bool:
        if isinstance(info, str):
            return False
        if info.get("cluster_state") != state:
            return False
        if state != "ok":
            return True
        return (
            info.get("cluster_known_nodes") == str(self.masters)
            and info.get("cluster_slots_ok") == "16384"
        )

    def node_id(self, index: int) -> str:
        return self.nodes[index].command("CLUSTER", "MYID").strip()

    def owner_of(self, key: str, via: int = 0) -> int:
        """The index of the master serving `key`'s slot, as node `via` sees the slots (the
        server hashes the key, so a test need not know how)."""
        slot = int(self.nodes[via].command("CLUSTER", "KEYSLOT", key))
        for line in self.nodes[via].command("CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) < 9:
                continue
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for item in fields[8:]:
                if item.startswith("["):  # [slot->-id]: a migration, not an assignment
                    continue
                first, _, last = item.partition("-")
                if int(first) <= slot <= int(last or first):
                    return self.ports.index(port)
        raise LookupError(f"no master serves slot {slot} of {key!r}")

    def stop_node(self, index: int) -> None:
        """Stop one node (SIGTERM); the others mark it failed after the node timeout."""
        self.nodes[index].stop()

    def start_node(self, index: int, timeout: float = 30.0) -> None:
        """Restart a stopped node on its ports with its config file, and wait until the cluster
        is whole again (Redis waits up to twice the node timeout before it forgets a failure)."""
        self.nodes[index].start()
        self.wait_ok(timeout)

    def stop(self) -> None:
        """Stop every node, even when stopping one of them fails."""
        errors: list[BaseException] = []
        for node in self.nodes:
            try:
                node.stop()
            except Exception as exc:  # keep going: the other nodes must not be left running
                errors.append(exc)
        if errors:
            raise errors[0]
