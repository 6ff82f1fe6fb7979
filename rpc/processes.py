"""TVM's RPC tracker and servers as child processes that start on loopback and stop cleanly.

TVM's ``python -m tvm.exec.rpc_tracker`` / ``rpc_server`` do their work in a forked
``tvm.exec.popen_worker`` (and the server forks once more per session). Killing only the process
you started leaves the worker holding the port, and an orphaned server worker re-registers with
the next tracker. So every process here starts in its own process group, under a leader
(``_group_leader.py``) that stops the group when signalled or when its parent dies; ``stop()``
signals the whole group, and then checks with ``psutil`` that no member is left.

    with start_tracker() as tracker:                        # 127.0.0.1, first free port >= 9190
        with start_server(tracker.address, key="android"):  # registers with the tracker
            print(tracker_status(tracker.address))
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from tvm_lite.errors import TvmLiteError

LOOPBACK = "127.0.0.1"
# every tracker/server runs under a group leader that takes its group down with it (and when
# the process that started it dies)
_LEADER = [sys.executable, "-m", "tvm_lite.rpc._group_leader"]


class RPCError(TvmLiteError, RuntimeError):
    """An RPC tracker/server that cannot be started, reached or found; the message says which."""


def parse_address(address: str, default_port: int = 9190) -> tuple[str, int]:
    """``"HOST:PORT"`` (or ``"HOST"``) -> ``(host, port)``."""
    host, sep, port = str(address).rpartition(":")
    if not sep:
        return str(address), default_port
    if not port.isdigit():
        raise RPCError(f"bad address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host or LOOPBACK, int(port)


def _group_members(pgid: int) -> list:
    import psutil

    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return members


@dataclass
class RPCProcess:
    """One tracker or server: the process we started, its group, its log and its port."""

    kind: str  # "tracker" | "server"
    argv: list
    log_path: Path
    host: str = LOOPBACK
    key: str | None = None
    tracker: str | None = None
    popen: subprocess.Popen | None = field(default=None, repr=False)
    port: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "RPCProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # start_new_session: the process and everything it forks share one process group
        self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        log.close()
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def members(self) -> list:
        """The live processes of this one's group (itself, its workers, session processes)."""
        return _group_members(self.popen.pid) if self.popen is not None else []

    def listening_ports(self) -> list[int]:
        import psutil

        ports = set()
        for proc in self.members():
            try:
                for conn in proc.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN:
                        ports.add(conn.laddr.port)
            except psutil.Error:
                continue
        return sorted(ports)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_listening(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RPCError(f"the RPC {self.kind} exited with code {self.popen.returncode} "
                               f"before listening; its log ({self.log_path}):\n{self.log_tail()}")
            ports = self.listening_ports()
            if ports:
                self.port = ports[0]
                return self.port
            time.sleep(0.2)
        self.stop()
        raise RPCError(f"the RPC {self.kind} did not listen within {timeout:.0f} s; its log "
                       f"({self.log_path}):\n{self.log_tail()}")

    def _signal_group(self, sig) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the whole group, SIGKILL what is left after ``timeout``; verify none remains."""
        if self.popen is None:
            return
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.members() and time.monotonic() < deadline:
            self.popen.poll()
            time.sleep(0.1)
        if self.members():
            self._signal_group(signal.SIGKILL)
            time.sleep(0.2)
        self.popen.wait(timeout=timeout)
        left = self.members()
        if left:
            raise RPCError(f"RPC {self.kind} {self.pid}: processes {[p.pid for p in left]} survived "
                           "SIGKILL")

    def kill(self) -> None:
        """SIGKILL the whole group at once, as when a phone is unplugged."""
        if self.popen is None:
            return
        self._signal_group(signal.SIGKILL)
        self.popen.wait(timeout=30)
        deadline = time.monotonic() + 10
        while self.members() and time.monotonic() < deadline:
            time.sleep(0.1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


_started = itertools.count()


def _log_path(log_dir, name: str) -> Path:
    folder = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="tvm_lite_rpc_"))
    return folder / f"{name}-{time.strftime('%H%M%S')}-{os.getpid()}-{next(_started)}.log"


def start_tracker(host: str = LOOPBACK, port: int = 9190, port_end: int | None = None,
                  log_dir=None, timeout: float = 60.0) -> RPCProcess:
    """Start ``python -m tvm.exec.rpc_tracker`` bound to ``host`` on the first free port in
    ``[port, port_end)``; return once it listens (``.port`` is the port it took)."""
    argv = [*_LEADER, "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
            "--port-end", str(port_end or port + 100)]
    proc = RPCProcess("tracker", argv, _log_path(log_dir, "tracker"), host=host).start()
    proc.wait_listening(timeout)
    return proc


def start_server(tracker: str, key: str, host: str = LOOPBACK, port: int = 9090,
                 port_end: int | None = None, log_dir=None, no_fork: bool = False,
                 load_library: str | None = None, custom_addr: str | None = None,
                 timeout: float = 60.0, wait: bool = True) -> RPCProcess:
    """Start ``python -m tvm.exec.rpc_server`` registered with ``tracker`` ("HOST:PORT") under
    ``key``; return once the tracker lists it (or at once, with ``wait=False``: then call
    :func:`await_server`)."""
    thost, tport = parse_address(tracker)
    argv = [*_LEADER, "tvm.exec.rpc_server", "--host", host, "--port", str(port),
            "--port-end", str(port_end or port + 100), "--tracker", f"{thost}:{tport}",
            "--key", key]
    if no_fork:
        argv.append("--no-fork")
    if load_library:
        argv += ["--load-library", load_library]
    if custom_addr:
        argv += ["--custom-addr", custom_addr]
    proc = RPCProcess("server", argv, _log_path(log_dir, f"server-{key}"), host=host, key=key,
                      tracker=f"{thost}:{tport}").start()
    return await_server(proc, timeout) if wait else proc


def await_server(proc: RPCProcess, timeout: float = 60.0) -> RPCProcess:
    """Wait until the server listens and its tracker lists it under its key."""
    proc.wait_listening(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s["port"] == proc.port for s in tracker_status(proc.tracker)["servers"]
               if s["key"] == proc.key):
            return proc
        if not proc.alive():
            break
        time.sleep(0.2)
    proc.stop()
    raise RPCError(f"RPC server on port {proc.port} did not register with the tracker at "
                   f"{proc.tracker} under key {proc.key!r} within {timeout:.0f} s; its log:\n"
                   f"{proc.log_tail()}")


def connect_tracker(address: str, timeout: float = 10.0):
    """A ``tvm.rpc.TrackerSession``; a clear error if no tracker answers at ``address`` within
    ``timeout`` seconds (TVM's own connect retries for a minute)."""
    import socket

    from tvm import rpc

    host, port = parse_address(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return rpc.connect_tracker(host, port)
        except Exception as err:
            if time.monotonic() > deadline:
                raise RPCError(f"no RPC tracker answers at {host}:{port} ({err}). Start one "
                               "with `tvm-lite rpc tracker`.") from err
            time.sleep(0.5)


def tracker_status(address: str) -> dict:
    """``{"keys": {key: {"total", "free", "busy", "pending"}}, "servers": [{"key", "host",
    "port"}]}`` as the tracker at ``address`` sees them."""
    summary = connect_tracker(address).summary()
    servers = []
    for info in summary.get("server_info", []):
        kind, _, key = str(info.get("key", "")).partition(":")
        if kind != "server":
            continue
        host, port = (list(info.get("addr") or [None, None]) + [None, None])[:2]
        servers.append({"key": key, "host": host, "port": port})
    keys: dict = {}
    for key, queue in summary.get("queue_info", {}).items():
        total = sum(1 for s in servers if s["key"] == key)
        free, pending = int(queue.get("free", 0)), int(queue.get("pending", 0))
        keys[key] = {"total": total, "free": free, "busy": max(total - free, 0),
                     "pending": pending}
    for s in servers:
        keys.setdefault(s["key"], {"total": sum(1 for t in servers if t["key"] == s["key"]),
                                   "free": 0, "busy": 0, "pending": 0})
    return {"keys": keys, "servers": servers}


def wait_for_servers(address: str, key: str, count: int = 1, timeout: float = 60.0) -> int:
    """Wait until the tracker has at least ``count`` servers under ``key``; return how many."""
    deadline = time.monotonic() + timeout
    while True:
        n = tracker_status(address)["keys"].get(key, {}).get("total", 0)
        if n >= count or time.monotonic() > deadline:
            if n < count:
                raise RPCError(f"the tracker at {address} has {n} server(s) under key {key!r}, "
                               f"{count} needed (waited {timeout:.0f} s). Start one with "
                               f"`tvm-lite rpc server --tracker {address} --key {key}`.")
            return n
        time.sleep(0.5)


class LocalCluster:
    """A tracker and ``servers`` servers under ``key`` on loopback, stopped on exit.

    What the tests and ``rpc/gpu_loopback.sh`` use; a phone farm is the same with the servers on
    the phones (TVM's Android RPC app) and ``key`` naming the phone model.
    """

    def __init__(self, key: str = "local", servers: int = 2, host: str = LOOPBACK,
                 tracker_port: int = 9190, server_port: int = 9090, log_dir=None,
                 no_fork: bool = False):
        self.key, self.n, self.host = key, servers, host
        self.tracker_port, self.server_port = tracker_port, server_port
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="tvm_lite_rpc_"))
        self.no_fork = no_fork
        self.tracker: RPCProcess | None = None
        self.servers: list[RPCProcess] = []

    @property
    def address(self) -> str:
        return self.tracker.address

    def add_servers(self, count: int = 1) -> list[RPCProcess]:
        """Start ``count`` more servers under the key (in parallel: each imports TVM)."""
        # distinct first ports: two servers binding one port at the same moment could both pass
        # bind() (SO_REUSEADDR) and one then fail in listen()
        first = self.server_port + len(self.servers)
        new = [start_server(self.address, self.key, host=self.host, port=first + i,
                            log_dir=self.log_dir, no_fork=self.no_fork, wait=False)
               for i in range(count)]
        self.servers.extend(new)
        return [await_server(p) for p in new]

    def start(self) -> "LocalCluster":
        self.tracker = start_tracker(self.host, self.tracker_port, log_dir=self.log_dir)
        try:
            self.add_servers(self.n)
        except BaseException:
            self.stop()
            raise
        return self

    def processes(self) -> list[RPCProcess]:
        return [p for p in [*self.servers, self.tracker] if p is not None]

    def stop(self) -> None:
        errors = []
        for proc in self.processes():
            try:
                proc.stop()
            except Exception as err:  # stop the others anyway
                errors.append(err)
        if errors:
            raise errors[0]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
