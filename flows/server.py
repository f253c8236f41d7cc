"""The Prefect API that a `cbir build` / `cbir nightly` run reports to.

A configured PREFECT_API_URL (the user's own server, which `cbir serve` needs) is used as it is,
after a health check. Without one, cbir starts a temporary API server of its own for the command
rather than Prefect's "ephemeral" one, which gives up after
PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (counted in poll iterations) and so fails on a
busy machine, and whose database errors land on the user's terminal. This one:

* keeps its state in the workspace: PREFECT_HOME, the server's and the command's own, is
  `<data folder>/prefect` (the SQLite database, kept between runs so that migrations and block
  registration run once; `server.log`, the server's output; `<command>.log`, the flow run's
  log); nothing is written to ~/.prefect and nothing is sent out (analytics off);
* is waited for as long as its process is alive and has spent less than SERVER_CPU_LIMIT
  seconds of CPU time without answering: no wall-clock deadline, which is what fails under load;
* makes SQLite contention harmless: a long busy timeout, and the services a one-shot run does
  not need (automations, the event store, telemetry) off;
* starts before the flow's heavy imports (Prefect itself, torch) and comes up in parallel with
  them: this module imports nothing of Prefect until a flow runs;
* never outlives its command: it is stopped when the command ends, and it stops itself when the
  command dies, even by SIGKILL (a watchdog thread sees its end of a pipe close).

This module is also the server's entry point: `python -m flows.server --fd N --watch M`.

Longer than 400 lines: starting, watching and stopping the server process is one concern.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cbir.environ import defaults
from cbir.errors import CbirError
from cbir.store.layout import layout

SERVER_CPU_LIMIT = 600.0  # s of the server's own CPU time spent without answering: give up
NOTE_AFTER = 10.0  # s of waiting before the one progress note on stderr
POLL_SECONDS = 0.1
STOP_GRACE = 30.0  # s a stopping server has to finish before it is killed
SQLITE_BUSY_SECONDS = 600  # how long a server's query waits for a locked SQLite database
DRAIN_SECONDS = 60.0  # s the run's last logs and events have to reach the API
SERVER_LOG = "server.log"
REPO = Path(__file__).resolve().parent.parent  # where `flows` is importable from


def prefect_home(settings: object) -> Path:
    """`<data folder>/prefect`: the data folder holds data.manifest_dir (and `.cbir.lock`)."""
    return layout(settings).prefect_home


def one_line(text: object) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- configured API


def configured_api_url() -> str | None:
    """The user's PREFECT_API_URL from the environment or the active Prefect profile, read
    without importing Prefect (FlowApi.url checks Prefect's own settings once it is loaded)."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if url:
        return url
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    profile = profiles.get("profiles", {}).get(name, {})
    return str(profile.get("PREFECT_API_URL") or "").strip() or None


def check_api(
    url: str,
    hint: str = "Start that server, or unset PREFECT_API_URL to let cbir start a temporary one",
) -> None:
    """Fail with one line naming `url` when no Prefect API answers there."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise CbirError(
            f"no Prefect API answers at {url} (PREFECT_API_URL): "
            f"{type(error).__name__}: {one_line(error)}. {hint}"
        )


SERVE_NEEDS_SERVER = (
    "serving a schedule needs a Prefect server that keeps running (a temporary one runs no "
    "scheduler): start one with `prefect server start` and point PREFECT_API_URL at it, e.g. "
    "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`"
)


def served_api() -> str:
    """The configured Prefect API that `cbir serve` registers with, checked: one line when
    there is none or it does not answer."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise CbirError(SERVE_NEEDS_SERVER)
    check_api(url, "Start that server (`prefect server start`) and keep it running")
    return url


# --------------------------------------------------------------------------- the local server


def server_env(home: Path) -> dict[str, str]:
    """The server's environment: its state in `home`, nothing sent out, the services a
    one-shot run needs only (task runs and logs are recorded; no automations or event store)."""
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), path])),
        "PREFECT_HOME": str(home),
        "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),  # the user's profile is not ours
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_DATABASE_TIMEOUT": str(SQLITE_BUSY_SECONDS),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_EVENT_LOGGER_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        "PREFECT__SERVER_EPHEMERAL": "1",  # as Prefect's own temporary server: no scheduler...
        "PREFECT__SERVER_FINAL": "1",
    }


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid` (Linux /proc), None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*:")


def _log_tail(path: Path) -> str:
    """The end of a server log on one line: its last exception, then its last line."""
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    if not lines:
        return ""
    error = next((ln for ln in reversed(lines) if _EXCEPTION_LINE.match(ln)), lines[-1])
    tail = [error] if error == lines[-1] else [error, lines[-1].split(" | ")[-1]]
    return "; ".join(one_line(ln)[:300] for ln in tail)


class LocalServer:
    """A temporary Prefect API server for one command, its state in `home` (see the module)."""

    def __init__(self, home: Path, command: str) -> None:
        self.home = Path(home)
        self.log = self.home / SERVER_LOG
        self.command = command
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._watch_fd: int | None = None
        self._startup_fd: int | None = None
        self._ready = False

    def start(self) -> LocalServer:
        """Start the server process (returns at once; `wait` waits for it)."""
        self.home.mkdir(parents=True, exist_ok=True)
        # One server at a time migrates the database: held until this one answers.
        self._startup_fd = os.open(self.home / "startup.lock", os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self._startup_fd, fcntl.LOCK_EX)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # bound here: no port race
        read_end = -1
        try:
            read_end, self._watch_fd = os.pipe()
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "flows.server",
                        "--fd",
                        str(sock.fileno()),
                        "--watch",
                        str(read_end),
                    ],
                    pass_fds=(sock.fileno(), read_end),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=server_env(self.home),
                    cwd=self.home,
                    start_new_session=True,
                )  # a Ctrl-C is the command's to handle
        except BaseException:
            self.stop()
            raise
        finally:
            sock.close()
            if read_end >= 0:
                os.close(read_end)
        return self

    def wait(self) -> str:
        """Wait until the server answers /health, as long as it is alive and not spinning;
        returns its API URL."""
        assert self.proc is not None
        if self._ready:
            return self.url
        t0, noted = time.monotonic(), False
        while not self._healthy():
            code = self.proc.poll()
            if code is not None:
                raise CbirError(
                    f"the temporary Prefect server stopped before it answered "
                    f"(exit status {code}): {_log_tail(self.log) or 'no output'} "
                    f"(log: {self.log})"
                )
            cpu = cpu_seconds(self.proc.pid)
            if cpu is not None and cpu > SERVER_CPU_LIMIT:
                raise CbirError(
                    f"the temporary Prefect server used {cpu:.0f} s of CPU time "
                    f"without answering: {_log_tail(self.log) or 'no output'} "
                    f"(log: {self.log})"
                )
            if not noted and time.monotonic() - t0 > NOTE_AFTER:
                print(
                    f"cbir {self.command}: waiting for the temporary Prefect server to start "
                    f"(log: {self.log})",
                    file=sys.stderr,
                    flush=True,
                )
                noted = True
            time.sleep(POLL_SECONDS)
        self._ready = True
        self._release_startup()
        return self.url

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def _release_startup(self) -> None:
        if self._startup_fd is not None:
            os.close(self._startup_fd)  # drops the flock
            self._startup_fd = None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after STOP_GRACE s) and reap it."""
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._watch_fd is not None:
            os.close(self._watch_fd)
            self._watch_fd = None
        self._release_startup()


# --------------------------------------------------------------------------- using an API


@contextlib.contextmanager
def api_settings(url: str) -> Iterator[None]:
    """Prefect's client pointed at `url` for the block; the run's last logs and events are
    sent before it ends (so no client thread talks to a stopped server afterwards)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        try:
            yield
        finally:
            _drain()


def _drain() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=DRAIN_SECONDS, at_exit=False)


@contextlib.contextmanager
def local_api(home: Path, command: str = "tests") -> Iterator[str]:
    """A temporary local API server with its state in `home`, Prefect's client pointed at it
    for the block (the test suite's server; cbir's commands use `flow_api`)."""
    server = LocalServer(home, command).start()
    try:
        url = server.wait()
        with api_settings(url):
            yield url
    finally:
        server.stop()


class FlowApi:
    """The API of one command's flow run: the configured one, or a LocalServer."""

    def __init__(self, home: Path, command: str, server: LocalServer | None) -> None:
        self.home = home
        self.command = command
        self.server = server
        self.log = home / f"{command}.log"  # the flow run's log (the terminal gets warnings)

    def url(self) -> str:
        """The API to use, checked (call once Prefect is imported)."""
        from prefect.settings import get_current_settings

        url = get_current_settings().api.url
        if url:  # configured, maybe where `configured_api_url` does not look (a .env file...)
            if self.server is not None:
                self.server.stop()
                self.server = None
            check_api(url)
            return url
        if self.server is None:
            self.server = LocalServer(self.home, self.command).start()
        return self.server.wait()

    def run(self, flow: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `flow` against the API; returns its final state."""
        url = self.url()
        with api_settings(url), _run_log(self.log):
            return flow(*args, return_state=True, **kwargs)


@contextlib.contextmanager
def flow_api(settings: object, command: str) -> Iterator[FlowApi]:
    """The API for `cbir <command>`'s flow run (see the module docstring). The local server, if
    one is needed, starts at once, so the caller imports the flow while it comes up. Any
    failure in the block becomes one line (CbirError); the details go to the run's log."""
    home = prefect_home(settings)
    server = None if configured_api_url() else LocalServer(home, command).start()
    api = FlowApi(home, command, server)
    try:
        with _client_environ(home):
            yield api
    except (CbirError, KeyboardInterrupt):
        raise
    except Exception as exc:
        with contextlib.suppress(OSError), open(api.log, "a", encoding="utf-8") as log:
            log.write(traceback.format_exc())
        raise CbirError(f"{type(exc).__name__}: {one_line(exc)} (log: {api.log})") from None
    finally:
        if api.server is not None:
            api.server.stop()


@contextlib.contextmanager
def _client_environ(home: Path) -> Iterator[None]:
    """The command's own Prefect settings, read when Prefect is imported (in the block): its
    home is `home` too (importing Prefect creates its home folder: not in the user's HOME), the
    user's profile is still read from where it was, and no analytics are sent."""
    user_home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    wanted = {
        "PREFECT_HOME": str(home),
        "PREFECT_PROFILES_PATH": str(user_home / "profiles.toml"),
        "DO_NOT_TRACK": "1",
    }
    with defaults(wanted):
        yield


class _TerminalFilter(logging.Filter):
    """What of Prefect's log the terminal shows during a cbir command: warnings (a run waiting
    for the data folder...), without tracebacks. Failures are the command's one error line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno == logging.WARNING and not record.exc_info


@contextlib.contextmanager
def _run_log(path: Path) -> Iterator[None]:
    """Prefect's log of the run, tracebacks included, into `path`; the terminal keeps the
    warnings only (_TerminalFilter)."""
    from prefect.logging.formatters import PrefectFormatter
    from prefect.logging.handlers import PrefectConsoleHandler

    root = logging.getLogger()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setLevel(logging.INFO)
    fmt = "%(asctime)s | %(levelname)-7s | {}%(message)s"
    handler.setFormatter(
        PrefectFormatter(
            format=fmt.format("%(name)s - "),
            flow_run_fmt=fmt.format("Flow run %(flow_run_name)r - "),
            task_run_fmt=fmt.format("Task run %(task_run_name)r - "),
        )
    )
    consoles = [h for h in root.handlers if isinstance(h, PrefectConsoleHandler)]
    quiet = _TerminalFilter()
    root.addHandler(handler)
    for console in consoles:
        console.addFilter(quiet)
    try:
        yield
    finally:
        for console in consoles:
            console.removeFilter(quiet)
        root.removeHandler(handler)
        handler.close()


# --------------------------------------------------------------------------- the server process


def _watch_parent(fd: int) -> None:
    """Stop this server when its command is gone: the pipe's other end closes (even when the
    command was killed), and a read returns EOF."""

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 1024):
                pass
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down cleanly

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _long_sqlite_busy_timeout() -> None:
    """Prefect sets `PRAGMA busy_timeout` to 60 s on each connection; wait longer than that
    for a locked database (another cbir command's server on the same workspace, a slow disk)."""
    try:
        from prefect.server.database.configurations import AioSqliteConfiguration
    except ImportError:
        return
    setup = getattr(AioSqliteConfiguration, "setup_sqlite", None)
    if setup is None:
        return

    def setup_sqlite(self: Any, conn: Any, record: Any) -> None:
        setup(self, conn, record)
        cursor = conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_SECONDS * 1000};")
        cursor.close()

    AioSqliteConfiguration.setup_sqlite = setup_sqlite  # type: ignore[method-assign]  # deliberate patch of Prefect


#: What a flow run's first requests need, asked once the server answers: the first request
#: to each part of the API costs the server a second or more (lazy set-up, the first database
#: connection), which is better spent while the command still imports its flow.
WARM_UP = [
    ("GET", "/admin/version", None),
    ("POST", "/flows/filter", {"limit": 1}),
    ("POST", "/flow_runs/filter", {"limit": 1}),
    ("POST", "/task_runs/filter", {"limit": 1}),
    ("POST", "/logs/filter", {"limit": 1}),
    ("POST", "/artifacts/filter", {"limit": 1}),
]


def _warm_up(fd: int) -> None:
    """Ask the WARM_UP requests of this server (listening on `fd`) once it answers."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"

    def warm() -> None:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=60):
                    break
            except (OSError, ValueError):
                time.sleep(POLL_SECONDS)
        for method, path, body in WARM_UP:
            data = None if body is None else json.dumps(body).encode()
            request = urllib.request.Request(
                f"{url}{path}",
                data=data,
                method=method,
                headers={"Content-Type": "application/json"},
            )
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(request, timeout=60) as response,
            ):
                response.read()

    threading.Thread(target=warm, name="warm-up", daemon=True).start()


def serve(fd: int, watch: int) -> None:
    """Run Prefect's API app (as `prefect server start` does, without UI) on the listening
    socket `fd` until SIGTERM or until the pipe `watch` closes."""
    _watch_parent(watch)
    _warm_up(fd)
    _long_sqlite_busy_timeout()
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        fd=fd,
        log_level="error",
        lifespan="on",
        timeout_graceful_shutdown=10,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="cbir's temporary Prefect API server")
    parser.add_argument("--fd", type=int, required=True, help="listening socket")
    parser.add_argument("--watch", type=int, required=True, help="pipe closed when cbir ends")
    args = parser.parse_args(argv)
    serve(args.fd, args.watch)


if __name__ == "__main__":
    main()
