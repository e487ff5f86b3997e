"""`digitlab serve --workers N`: N uvicorn server processes, each listening on a socket of its own.

On one listening socket shared by all workers, whichever idle worker wakes
first accepts every connection waiting (asyncio accepts up to the backlog per
wake-up), so a burst of keep-alive clients lands on one worker while the others
idle: with 16 clients, one of two workers did 84% of the work. Here each
worker gets its own socket on the same port with SO_REUSEPORT (Linux), and the
kernel spreads new connections over them. Elsewhere the workers share one socket.

Where the system allows it (Linux), each worker also keeps to a core of its own
(`worker_cores`): left to wander, two workers beside their clients on two cores
answered 9% fewer requests a second (benchmarks/README.md).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.synchronize import Event as EventType

import uvicorn

from digitlab.errors import DigitlabError

log = logging.getLogger("uvicorn.error")

SPREADS_CONNECTIONS = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")
STOP_MARGIN = 3.0
"""Seconds a worker gets past its graceful shutdown to end after SIGTERM before it is killed."""


def listen(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on host:port, or a DigitlabError saying why there cannot be one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048, reuse_port=reuse_port)
    except OSError as error:
        raise DigitlabError(
            f"cannot listen on {host}:{port} ({error.strerror}); choose another --port or --host"
        ) from None


def worker_sockets(host: str, port: int, workers: int) -> list[socket.socket]:
    """One listening socket per worker on one port (the same socket `workers` times where the kernel
    cannot spread connections). A port in use is refused first by a plain bind, so that a second
    server never joins another one's port silently."""
    probe = listen(host, port)
    if workers == 1 or not SPREADS_CONNECTIONS:
        return [probe] * workers
    port = probe.getsockname()[1]
    probe.close()
    sockets: list[socket.socket] = []
    try:
        for _ in range(workers):
            sockets.append(listen(host, port, reuse_port=True))
    except DigitlabError:
        for opened in sockets:
            opened.close()
        raise
    return sockets


class _ReportingServer(uvicorn.Server):
    """A uvicorn server that sets `ready` once it has started (its app loaded and listening)."""

    def __init__(self, config: uvicorn.Config, ready: EventType) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.ready.set()


def worker_cores(workers: int) -> list[set[int] | None]:
    """The cores each worker keeps to: one each in turn from those this process may use, or None for all
    (fewer cores than workers, or a system without CPU affinity)."""
    if not hasattr(os, "sched_getaffinity"):
        return [None] * workers
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        return [None] * workers
    return [{cores[index]} for index in range(workers)]


def _serve(config: uvicorn.Config, listener: socket.socket, ready: EventType, cores: set[int] | None) -> None:
    """A worker process: kept to its cores, uvicorn's logging set up anew (a spawned process starts without
    it), then serve."""
    if cores is not None:
        os.sched_setaffinity(0, cores)
    config.configure_logging()
    _ReportingServer(config, ready).run(sockets=[listener])


def run_workers(config: uvicorn.Config, sockets: list[socket.socket]) -> None:
    """Run one server process per socket until SIGINT or SIGTERM; start a new one for a worker that
    dies after it started serving; stop all if one ends before (its app failed to load, say): starting
    it again would fail again."""
    context = multiprocessing.get_context("spawn")
    stop = threading.Event()
    ready = [context.Event() for _ in sockets]
    cores = worker_cores(len(sockets))

    def start(index: int) -> multiprocessing.process.BaseProcess:
        ready[index].clear()
        process = context.Process(target=_serve, args=(config, sockets[index], ready[index], cores[index]))
        process.start()
        return process

    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    processes = [start(index) for index in range(len(sockets))]
    failed = False
    try:
        while not stop.wait(0.5):
            for index, process in enumerate(processes):
                if process.exitcode is None:
                    continue
                if not ready[index].is_set():  # uvicorn's own startup failures end here too
                    failed = True
                    stop.set()
                    break
                log.warning("worker process %s ended with status %s; starting another", process.pid, process.exitcode)
                processes[index] = start(index)
    finally:
        for process in processes:
            if process.exitcode is None and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + (config.timeout_graceful_shutdown or 0) + STOP_MARGIN
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:  # stuck past its graceful shutdown
                process.kill()
                process.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise DigitlabError("a worker process could not start the service; its log above says why")
