"""Real local services on the loopback interface, for development and for tests.

* :class:`S3Server` runs ``moto_server`` (a real HTTP S3 API, in memory) on a free port.
* :class:`MLflowServer` runs ``mlflow server`` with a SQLite backend and artifacts proxied to a bucket of an
  :class:`S3Server`.

Both are context managers, start only on ``start()`` / ``__enter__`` and stop only the processes they started
(SIGTERM, then SIGKILL after a timeout). ``python -m pipeline.services up [--dir D]`` starts both, prints the
``export`` lines for a shell and stays up until Ctrl-C or SIGTERM (``infra/local/services.sh`` wraps it).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["MLflowServer", "S3Server", "ServiceError", "free_port", "main"]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
TEST_ACCESS_KEY_ID = "testing"
"""Dummy credentials of the local S3 server (moto accepts any); safe to print."""
TEST_SECRET_ACCESS_KEY = "testing"
TEST_REGION = "us-east-1"


class ServiceError(RuntimeError):
    """A local service failed to start (the message holds the end of its log)."""


def free_port(host: str = LOOPBACK) -> int:
    """Returns a TCP port that is free on ``host`` right now.

    Args:
        host: Interface to probe.

    Returns:
        The port number (another process may still take it before it is used; callers retry).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_port_free(host: str, port: int, service: str) -> None:
    """Raises ServiceError when ``host:port`` is taken: another server there would answer our readiness probe."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ServiceError(f"{service}: port {host}:{port} is already in use ({err.strerror})") from None


def _venv_executable(name: str) -> str:
    """Finds a console script of this environment (next to ``sys.executable``)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    raise ServiceError(
        f"{name!r} not found next to {sys.executable}; install the dev extras (pip install -e '.[dev]')"
    )


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(empty log)"


def _http_ok(url: str, *, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 500
    except urllib.error.HTTPError as err:
        return err.code < 500
    except (urllib.error.URLError, OSError):
        return False


class _Process:
    """A child process started in its own session; stopping signals its whole process group."""

    def __init__(self, name: str, log_path: Path | None) -> None:
        self.name = name
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def spawn(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        out: Any = self._log if self._log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        logger.debug("%s: started pid %d: %s", self.name, self.proc.pid, " ".join(argv))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, timeout: float = 10.0, group: bool) -> None:
        proc, self.proc = self.proc, None
        try:
            if proc is not None:
                self._signal(proc, signal.SIGTERM, group=group)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    logger.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", self.name, proc.pid, timeout)
                    self._signal(proc, signal.SIGKILL, group=group)
                    proc.wait(timeout=timeout)
                if group:
                    # Workers left behind in the group (the leader exited first) get the same treatment.
                    self._reap_group(proc.pid, timeout=timeout)
                logger.debug("%s: pid %d stopped", self.name, proc.pid)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals, *, group: bool) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)  # the group id is the pid: start_new_session=True
            elif proc.poll() is None:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _reap_group(pgid: int, *, timeout: float) -> None:
        """Waits for the rest of the group (already sent SIGTERM with its leader); SIGKILL after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            if time.monotonic() > deadline:
                logger.warning("process group %d outlived SIGTERM by %.0f s; killing it", pgid, timeout)
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
            time.sleep(0.1)


class _Service:
    """Base of the local services: one process this object starts and stops; usable as a context manager."""

    _process: _Process

    @property
    def pid(self) -> int | None:
        """PID of the service's (leader) process; None when stopped."""
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the service's (leader) process is alive."""
        return self._process.alive()

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class S3Server(_Service):
    """``moto_server`` on the loopback interface: a real HTTP S3 API holding its data in memory.

    Args:
        port: TCP port; a free one when None.
        log_dir: Folder for ``s3.log``; no log when None.
        startup_timeout: Seconds to wait until the server answers HTTP.

    Example::

        with S3Server(log_dir=tmp) as s3:
            s3.create_bucket("data")
            os.environ.update(s3.env())
    """

    def __init__(self, *, port: int | None = None, log_dir: str | Path | None = None, startup_timeout: float = 30.0):
        self.host = LOOPBACK
        self._requested_port = port
        self.port: int | None = None
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.startup_timeout = startup_timeout
        self._process = _Process("s3 (moto)", self.log_dir / "s3.log" if self.log_dir else None)

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        if self.port is None:
            raise ServiceError("S3Server is not running; call start() first")
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The AWS variables that point clients at this server (dummy test credentials).

        Returns:
            ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``.
        """
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": TEST_REGION,
        }

    def s3_config(self) -> Any:
        """Settings for :func:`pipeline.storage.make_client` that point at this server.

        Returns:
            A :class:`pipeline.config.S3Config` with the endpoint and the dummy test credentials.
        """
        from pipeline.config import S3Config

        return S3Config(
            endpoint_url=self.endpoint_url,
            region=TEST_REGION,
            access_key_id=TEST_ACCESS_KEY_ID,
            secret_access_key=TEST_SECRET_ACCESS_KEY,
            max_attempts=3,
        )

    def client(self) -> Any:
        """A boto3 client for this server (ignores the AWS variables of the environment).

        Returns:
            A ``botocore`` S3 client.
        """
        from pipeline.storage import make_client

        return make_client(self.s3_config(), environ={})

    def create_bucket(self, name: str) -> None:
        """Creates bucket ``name`` (no error when it exists already).

        Args:
            name: Bucket name.
        """
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        logger.debug("s3: bucket %r ready", name)

    def start(self) -> S3Server:
        """Starts the server and waits until it answers HTTP.

        Returns:
            self.

        Raises:
            ServiceError: it did not come up (the message holds the end of its log).
        """
        if self._process.alive():
            return self
        executable = _venv_executable("moto_server")
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(attempts):
            if self._requested_port is not None:
                _check_port_free(self.host, self._requested_port, "s3 (moto)")
            self.port = self._requested_port or free_port()
            self._process.spawn([executable, "-H", self.host, "-p", str(self.port)])
            if self._wait_ready():
                logger.info("s3 (moto) up at %s (pid %s)", self.endpoint_url, self.pid)
                return self
            exited = not self._process.alive()
            self._process.stop(group=False, timeout=5)
            if not exited or attempt == attempts - 1:
                break  # a hung server is not a port race: do not retry
        port, self.port = self.port, None
        raise ServiceError(
            f"moto_server did not answer on {self.host}:{port} within {self.startup_timeout:.0f} s; "
            f"log ({self._process.log_path}):\n{_tail(self._process.log_path)}"
        )

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self._process.alive():
                return False
            if _http_ok(f"{self.endpoint_url}/"):
                return True
            time.sleep(0.1)
        return False

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stops the server process this object started (SIGTERM, then SIGKILL after ``timeout`` seconds).

        Args:
            timeout: Seconds to wait after each signal.
        """
        self._process.stop(group=False, timeout=timeout)
        self.port = None


class MLflowServer(_Service):
    """``mlflow server`` on the loopback interface: SQLite backend, artifacts proxied into an S3 bucket.

    Args:
        s3: A running :class:`S3Server` holding the artifacts.
        workdir: Folder for ``mlflow.db`` and ``mlflow.log``.
        bucket: Artifact bucket (created on start).
        port: TCP port; a free one when None.
        workers: Server worker processes.
        startup_timeout: Seconds to wait for ``GET /health``.
    """

    def __init__(
        self,
        s3: S3Server,
        workdir: str | Path,
        *,
        bucket: str = "mlflow",
        port: int | None = None,
        workers: int = 1,
        startup_timeout: float = 180.0,
    ):
        self.s3 = s3
        self.workdir = Path(workdir)
        self.bucket = bucket
        self.host = LOOPBACK
        self._requested_port = port
        self.port: int | None = None
        self.workers = workers
        self.startup_timeout = startup_timeout
        self._process = _Process("mlflow", self.workdir / "mlflow.log")

    @property
    def tracking_uri(self) -> str:
        """``http://127.0.0.1:PORT`` (clients need no AWS variables: artifacts go through the server)."""
        if self.port is None:
            raise ServiceError("MLflowServer is not running; call start() first")
        return f"http://{self.host}:{self.port}"

    @property
    def artifacts_destination(self) -> str:
        """``s3://BUCKET/``."""
        return f"s3://{self.bucket}/"

    def start(self) -> MLflowServer:
        """Creates the bucket, starts the server and waits for ``GET /health``.

        Returns:
            self.

        Raises:
            ServiceError: it did not come up (the message holds the end of its log).
        """
        if self._process.alive():
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.s3.create_bucket(self.bucket)
        env = dict(os.environ)
        env.update(self.s3.env())
        env["MLFLOW_S3_ENDPOINT_URL"] = self.s3.endpoint_url
        # The server's background job runner (GenAI evaluation jobs: eight more processes) is not used here.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        if self._requested_port is not None:
            _check_port_free(self.host, self._requested_port, "mlflow")
        self.port = self._requested_port or free_port()
        argv = [
            _venv_executable("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{(self.workdir / 'mlflow.db').resolve()}",
            "--artifacts-destination",
            self.artifacts_destination,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
        self._process.spawn(argv, env=env, cwd=self.workdir)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self._process.alive():
                break
            if _http_ok(f"{self.tracking_uri}/health"):
                logger.info("mlflow up at %s (pid %s), artifacts in %s", self.tracking_uri, self.pid,
                            self.artifacts_destination)
                return self
            time.sleep(0.5)
        port, self.port = self.port, None
        self._process.stop(group=True, timeout=5)
        raise ServiceError(
            f"mlflow server did not answer {self.host}:{port}/health within {self.startup_timeout:.0f} s; "
            f"log ({self._process.log_path}):\n{_tail(self._process.log_path)}"
        )

    def stop(self, *, timeout: float = 15.0) -> None:
        """Stops the server's process group (its workers included): SIGTERM, then SIGKILL after ``timeout``.

        Args:
            timeout: Seconds to wait after each signal.
        """
        self._process.stop(group=True, timeout=timeout)
        self.port = None


def _export_lines(s3: S3Server, mlflow: MLflowServer | None) -> list[str]:
    env = s3.env()
    if mlflow is not None:
        env["MLFLOW_TRACKING_URI"] = mlflow.tracking_uri
    return [f"export {key}={value}" for key, value in env.items()]


class _Stop(Exception):
    """Raised by the SIGINT/SIGTERM handler of ``up``."""


def _raise_stop(signum: int, _frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def _cmd_up(args: argparse.Namespace) -> int:
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="revcol-services-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # The servers run in their own sessions (a terminal's Ctrl-C does not reach them): this process stops them,
    # also when the signal arrives while they are still starting.
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    s3 = S3Server(port=args.s3_port, log_dir=workdir)
    mlflow: MLflowServer | None = None
    status = 0
    try:
        s3.start()
        for bucket in args.bucket:
            s3.create_bucket(bucket)
        if not args.no_mlflow:
            mlflow = MLflowServer(s3, workdir, bucket=args.mlflow_bucket, port=args.mlflow_port)
            mlflow.start()
        print(f"# local services up (logs in {workdir}); Ctrl-C or SIGTERM stops them", flush=True)
        print("\n".join(_export_lines(s3, mlflow)), flush=True)
        while True:
            time.sleep(1.0)
            for server in (s3, mlflow):
                if server is not None and not server.running:
                    raise ServiceError(f"{type(server).__name__} exited unexpectedly; logs in {workdir}")
    except _Stop as stop:
        logger.info("%s received; stopping the services", stop)
    except ServiceError as err:
        print(f"services: {err}", file=sys.stderr, flush=True)
        status = 1
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
        try:
            if mlflow is not None:
                mlflow.stop()
            s3.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        print("# local services stopped", file=sys.stderr, flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.services up [--dir D]``: start S3 + MLflow on 127.0.0.1 until Ctrl-C / SIGTERM.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        Exit status: 0 after a clean stop, 1 when a service failed.
    """
    parser = argparse.ArgumentParser(prog="python -m pipeline.services", description=main.__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a local S3 server and an MLflow server; print export lines")
    up.add_argument("--dir", default=None, help="folder for logs and mlflow.db (default: a new temporary folder)")
    up.add_argument("--s3-port", type=int, default=None, help="S3 port (default: a free one)")
    up.add_argument("--mlflow-port", type=int, default=None, help="MLflow port (default: a free one)")
    up.add_argument("--mlflow-bucket", default="mlflow", help="bucket for MLflow artifacts (default: mlflow)")
    up.add_argument("--bucket", action="append", default=[], help="also create this bucket (repeatable)")
    up.add_argument("--no-mlflow", action="store_true", help="start only the S3 server")
    up.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return _cmd_up(args)


if __name__ == "__main__":
    raise SystemExit(main())
