"""A cluster across hosts on one machine: each replica in its own Linux network namespace, with its
own address on a veth pair to a bridge, and the clients in another namespace. Needs root.

    python deploy/netns.py up --dir DIR [--f 1] [--service kv]   a cluster until Ctrl-C
    python deploy/netns.py down --tag TAG                           remove a cluster's namespaces

The bridge lives in a namespace of its own too, so nothing is added to the machine's own
network: every address below is inside namespaces this program made, and no route leads out.
Faults are what a real network does: a link cut (``ip link set down`` on the bridge's side),
a partition (iptables DROP between two groups of hosts) and packet loss (iptables' ``statistic``
match; this kernel has no ``tc netem``).

``load`` (run inside the clients' namespace by ``NetnsCluster.start_load``) drives closed-loop
kv clients whose every result is checked, and prints a JSON line every OBSERVE_S with the
operations done and what each replica's /status says, so that a test outside the namespaces
can watch the cluster through it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

SUBNET = "10.213.0"  # every cluster has its own bridge, so clusters may share addresses
OBSERVE_S = 0.25


def replica_address(i: int) -> str:
    return f"{SUBNET}.{10 + i}"


CLIENT_ADDRESS = f"{SUBNET}.200"


def available() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: iproute2, iptables)"
    probe = f"bftprobe{os.getpid()}"
    try:
        if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
            return "ip netns add failed (no CAP_SYS_ADMIN, or no netns support)"
        made = subprocess.run(
            ["ip", "-n", probe, "link", "add", "name", "a", "type", "veth", "peer", "name", "b"], capture_output=True
        )
        return None if made.returncode == 0 else "veth pairs cannot be made in a network namespace"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _sh(*cmd: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")


class NetnsCluster:
    """n = 3f+1 replica processes, replica i in namespace TAG-rI at replica_address(i), the
    clients in TAG-c; ``close`` removes every namespace, whatever state the cluster was left in."""

    def __init__(self, directory: Path, f: int = 1, service: str = "kv", params=None, tag: str | None = None) -> None:
        from bft import config as cfg
        from bft.core.params import Params

        self.tag = tag or f"bft{os.getpid() % 100000}"
        self.n = 3 * f + 1
        self.switch = f"{self.tag}-sw"
        self.hosts = {f"r{i}": (f"{self.tag}-r{i}", replica_address(i)) for i in range(self.n)}
        self.hosts["c"] = (f"{self.tag}-c", CLIENT_ADDRESS)
        self.directory = directory
        self.procs: dict[int, subprocess.Popen] = {}
        self.loads: list[Load] = []
        self.service = service
        try:
            self._build()
            cfg.keygen(directory, f, clients=8, base_port=7000, params=params or Params(),
                       hosts=[replica_address(i) for i in range(self.n)])
            self.cluster = cfg.load(directory / "cluster.toml")
            for i in range(self.n):
                self.start(i)
        except BaseException:
            self.close()
            raise

    # -- the network --------------------------------------------------------------------------

    def _build(self) -> None:
        _sh("ip", "netns", "add", self.switch)
        _sh("ip", "-n", self.switch, "link", "add", "name", "br0", "type", "bridge")
        _sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for name, (ns, address) in self.hosts.items():
            _sh("ip", "netns", "add", ns)
            # Made inside the switch's namespace, the host's end moved straight into its own:
            # no interface appears in the machine's namespace, even for a moment.
            _sh("ip", "-n", self.switch, "link", "add", "name", name, "type", "veth",
                "peer", "name", "eth0", "netns", ns)
            _sh("ip", "-n", self.switch, "link", "set", name, "master", "br0", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")

    def cut(self, host: str) -> None:
        """Take ``host``'s link down (``r0`` ... or ``c``), as a pulled cable does."""
        _sh("ip", "-n", self.switch, "link", "set", host, "down")

    def restore(self, host: str) -> None:
        _sh("ip", "-n", self.switch, "link", "set", host, "up")

    def split(self, *groups: list[str]) -> None:
        """Partition: hosts in different groups no longer reach each other; hosts named in no
        group (the clients, say) still reach everyone."""
        for g in groups:
            others = [self.hosts[h][1] for other in groups if other is not g for h in other]
            for h in g:
                for address in others:
                    self._iptables(h, "-A", "INPUT", "-s", address, "-j", "DROP")
                    self._iptables(h, "-A", "OUTPUT", "-d", address, "-j", "DROP")

    def lose(self, probability: float) -> None:
        """Drop ``probability`` of the packets arriving on every host's link: every hop of every
        connection loses that fraction (TCP retransmits; the protocol must not care)."""
        for h in self.hosts:
            self._iptables(h, "-A", "INPUT", "-i", "eth0", "-m", "statistic", "--mode", "random",
                           "--probability", str(probability), "-j", "DROP")

    def heal(self) -> None:
        """Every link up and every rule gone."""
        for h in self.hosts:
            self._iptables(h, "-F")
            self.restore(h)

    def _iptables(self, host: str, *rule: str) -> None:
        _sh("ip", "netns", "exec", self.hosts[host][0], "iptables", "-w", *rule)

    # -- processes --------------------------------------------------------------------------

    def exec_command(self, host: str, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host][0], *command]

    def start(self, i: int) -> None:
        from bft.launch import replica_command

        log = self.directory / "logs" / f"replica-{i}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        command = replica_command(self.cluster, i, self.service, log, "info")
        self.procs[i] = subprocess.Popen(self.exec_command(f"r{i}", command), start_new_session=True)

    def start_load(self, clients: int = 4, first_client: int = 0, op_timeout_s: float = 60.0) -> Load:
        """Closed-loop clients in the clients' namespace, watched through their JSON lines."""
        command = [sys.executable, str(Path(__file__).resolve()), "load", "--config", str(self.cluster.path),
                   "--clients", str(clients), "--first-client", str(first_client), "--op-timeout", str(op_timeout_s)]
        load = Load(subprocess.Popen(self.exec_command("c", command), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, start_new_session=True))
        self.loads.append(load)
        return load

    def close(self) -> None:
        for load in self.loads:
            load.kill()
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        remove(self.tag)


def remove(tag: str) -> None:
    """Delete every namespace of cluster ``tag`` (a process still inside one keeps only its own
    view of it; ours were stopped first)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in names:
        if name.startswith(f"{tag}-"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def remove_stale(prefix: str) -> None:
    """Delete the namespaces of clusters tagged ``prefix`` + PID + ... whose process is gone."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in names:
        digits = name.removeprefix(prefix).split("x")[0]
        if name.startswith(prefix) and digits.isdigit() and not Path(f"/proc/{digits}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Load:
    """The ``load`` process seen from outside: its JSON lines, read as they come."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.records: list[dict] = []
        self._lines: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)

    def _pump(self, block_s: float) -> bool:
        try:
            item = self._lines.get(timeout=block_s)
        except queue.Empty:
            return True
        if item is None:
            return False
        self.records.append(item)
        return True

    @property
    def last(self) -> dict:
        return self.records[-1] if self.records else {"ops": 0, "status": []}

    def wait_for(self, what: str, test: Callable[[dict], bool], timeout_s: float) -> dict:
        """The first record from now on for which ``test`` holds; AssertionError naming ``what``
        (and the last record) when none came within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        start = len(self.records)
        while time.monotonic() < deadline:
            for rec in self.records[start:]:
                if "ops" in rec and test(rec):
                    return rec
            start = len(self.records)
            if not self._pump(0.1) and not self._lines.qsize():
                break
        raise AssertionError(f"not within {timeout_s} s: {what}; last: {json.dumps(self.last)}")

    def at(self, wall: float, timeout_s: float = 10.0) -> dict:
        """The first record made at or after ``wall`` (time.time() here): records still queued
        from before a fault was made are not taken for what followed it."""
        return self.wait_for(f"a record after {wall:.2f}", lambda r: r["wall"] >= wall, timeout_s)

    def finish(self, timeout_s: float = 60.0) -> dict:
        """Stop issuing operations, wait for those in flight and return the final record."""
        self.proc.stdin.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._pump(0.2):
            if self.records and self.records[-1].get("done"):
                break
        self.proc.wait(max(0.1, deadline - time.monotonic()))
        final = self.records[-1] if self.records else {}
        assert final.get("done"), f"the load did not finish: {final}"
        return final

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- the load, inside the clients' namespace ----------------------------------------------------------


async def _load(config: str, clients: int, first_client: int, op_timeout_s: float) -> dict:
    import aiohttp
    import msgpack

    from bft import config as cfg
    from bft.service import KVService
    from client import Client

    cluster = cfg.load(config)
    started = time.monotonic()
    done = {"ops": 0, "errors": []}
    stopping = asyncio.Event()

    async def chain(c: Client, key: bytes) -> None:
        # Each put returns the previous value: a lost or doubled operation breaks the chain.
        i = 0
        while not stopping.is_set():
            ok, prev = msgpack.unpackb(await c.invoke(KVService.put(key, b"%d" % (i + 1)), timeout=op_timeout_s))
            if not ok or prev != (b"%d" % i if i else None):
                done["errors"].append(f"{key!r}: put {i + 1} returned {prev!r}")
                return
            i += 1
            done["ops"] += 1

    async def observe(http: aiohttp.ClientSession) -> None:
        while True:
            statuses = await asyncio.gather(*(_status(http, r) for r in cluster.replicas))
            print(json.dumps({"t": round(time.monotonic() - started, 2), "wall": time.time(), "ops": done["ops"],
                              "status": statuses}), flush=True)
            await asyncio.sleep(OBSERVE_S)

    async def until_stdin_closes() -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)
        stopping.set()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as http:
        watcher = asyncio.ensure_future(observe(http))
        conns = [Client(cluster, first_client + k) for k in range(clients)]
        for c in conns:
            await c.start()
        try:
            runs = [asyncio.ensure_future(chain(c, b"netns-%d" % (first_client + k))) for k, c in enumerate(conns)]
            await until_stdin_closes()
            results = await asyncio.gather(*runs, return_exceptions=True)
            done["errors"] += [repr(r) for r in results if isinstance(r, BaseException)]
        finally:
            for c in conns:
                await c.close()
            watcher.cancel()
        final_status = await asyncio.gather(*(_status(http, r) for r in cluster.replicas))
    elapsed = time.monotonic() - started
    return {"done": True, "ops": done["ops"], "errors": done["errors"], "seconds": round(elapsed, 2),
            "status": final_status}


async def _status(http, r) -> dict | None:
    import aiohttp

    try:
        async with http.get(f"http://{r.host}:{r.admin_port}/status") as resp:
            s = await resp.json()
    except (TimeoutError, OSError, ValueError, aiohttp.ClientError):
        return None
    keep = ("view", "primary", "executed", "stable_checkpoint", "stable_digest", "view_changing")
    return {k: s.get(k) for k in keep} | {"state_transfers": s.get("stats", {}).get("state-transfers", 0)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="deploy/netns.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="a cluster in namespaces until Ctrl-C")
    up.add_argument("--dir", required=True)
    up.add_argument("--f", type=int, default=1)
    up.add_argument("--service", default="kv")
    down = sub.add_parser("down", help="remove the namespaces of a cluster")
    down.add_argument("--tag", required=True)
    ld = sub.add_parser("load", help="(inside the clients' namespace) closed-loop clients and an observer")
    ld.add_argument("--config", required=True)
    ld.add_argument("--clients", type=int, default=4)
    ld.add_argument("--first-client", type=int, default=0)
    ld.add_argument("--op-timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    if a.command == "load":
        final = asyncio.run(_load(a.config, a.clients, a.first_client, a.op_timeout))
        print(json.dumps(final), flush=True)
    elif a.command == "down":
        remove(a.tag)
    else:
        why = available()
        if why:
            sys.exit(f"netns: {why}")
        c = NetnsCluster(Path(a.dir), a.f, a.service)
        print(f"netns cluster {c.tag}: replicas at {', '.join(replica_address(i) for i in range(c.n))}, "
              f"clients in namespace {c.hosts['c'][0]} (ip netns exec {c.hosts['c'][0]} bft status --config "
              f"{c.cluster.path}); Ctrl-C stops and removes it", flush=True)
        try:
            while all(proc.poll() is None for proc in c.procs.values()):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            c.close()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
