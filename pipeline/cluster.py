"""Ray clusters: joining the one a command runs on (:func:`connect_ray`), and a real single-node cluster on the
loopback interface for development and tests (:class:`RayHead`).

:class:`RayHead` runs ``ray start --head --block`` with the dashboard (the Jobs API) bound to 127.0.0.1, explicit
free ports (none in Ray's default worker range 10002–19999, which other Ray instances on the machine use), token
authentication on with a token file it owns, and this environment's ``bin/`` first on ``PATH`` so that jobs run this
environment's Python. (Ray 2.60 replaces ``--node-ip-address=127.0.0.1`` with the machine's routable address and its
gRPC servers — GCS, raylet, object manager — listen on every interface; the token guards them too.)
It waits for the dashboard's ``/api/version`` (the Jobs API), and stops only what it started: SIGTERM to the
``ray start`` process (which tears its Ray processes down), then the same to any of its descendants that outlived
it — never ``ray stop``, which stops every Ray process on the machine.

Example::

    with RayHead(num_cpus=4) as head:
        subprocess.run(["ray", "job", "submit", "--address", head.address, "--working-dir", ".", "--",
                        "python", "-m", "pipeline", "run", "jobs/demo_digits.yaml"], env=head.client_env())
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pipeline.services import LOOPBACK, ServiceError, _Service, free_port

if TYPE_CHECKING:
    from pipeline.config import Recipe

__all__ = ["RayHead", "check_shared_storage", "connect_ray"]

logger = logging.getLogger(__name__)

_PORT_FLAGS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)
"""Every fixed port of ``ray start --head``; each gets a free one (the workers bind OS-chosen ports)."""

_MAX_SOCKET_PATH = 107
"""Unix socket paths (``TEMP/session_…/sockets/raylet``) longer than this fail: keep the temp dir short."""


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty log)"


class RayHead(_Service):
    """``ray start --head --block`` on 127.0.0.1 with token authentication; a context manager.

    Args:
        num_cpus: CPUs the node advertises (``--num-cpus``).
        temp_dir: Ray's ``--temp-dir`` (sessions, logs, uploaded working dirs). Default: a new short folder under
            ``/tmp`` (removed on stop); an explicit one is kept.
        token_path: The token file (``RAY_AUTH_TOKEN_PATH``): used as it is when it exists, else written with a new
            random token. Default: ``TEMP_DIR/auth_token``.
        env: Extra environment variables for the head and so for every job it runs (e.g.
            ``RAY_JOB_STOP_WAIT_TIME_S``). ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`` defaults to 0 here: a
            development head has no Serve traffic to drain, and Ray's default makes every stop wait 30 s.
        log_path: Where ``ray start``'s own output goes. Default: ``TEMP_DIR/ray-start.log``.
        startup_timeout: Seconds to wait for ``/api/version`` (about 70 s on a busy 2-core machine).
    """

    def __init__(
        self,
        *,
        num_cpus: int = 4,
        temp_dir: str | Path | None = None,
        token_path: str | Path | None = None,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 300.0,
    ) -> None:
        if num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1, got {num_cpus}")
        self.num_cpus = num_cpus
        self._own_temp_dir = temp_dir is None
        self._temp_dir_arg = Path(temp_dir) if temp_dir is not None else None
        self._token_path_arg = Path(token_path) if token_path is not None else None
        self._log_path_arg = Path(log_path) if log_path is not None else None
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.temp_dir: Path | None = None
        self.token_path: Path | None = None
        self.log_path: Path | None = None
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # ------------------------------------------------------------------------------------------------ addresses
    @property
    def pid(self) -> int | None:
        """PID of the ``ray start --block`` process (None when stopped)."""
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the ``ray start --block`` process is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def address(self) -> str:
        """The Jobs API / dashboard: ``http://127.0.0.1:PORT`` (what ``ray job submit --address`` takes)."""
        if "dashboard-port" not in self.ports:
            raise ServiceError("RayHead is not running; call start() first")
        return f"http://{LOOPBACK}:{self.ports['dashboard-port']}"

    @property
    def gcs_address(self) -> str:
        """``127.0.0.1:PORT`` of the GCS (what ``ray.init(address=…)`` takes on this machine)."""
        if "port" not in self.ports:
            raise ServiceError("RayHead is not running; call start() first")
        return f"{LOOPBACK}:{self.ports['port']}"

    @property
    def token(self) -> str:
        """The cluster's authentication token (keep it out of logs)."""
        if self.token_path is None:
            raise ServiceError("RayHead is not running; call start() first")
        return self.token_path.read_text().strip()

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for ``ray job …`` commands against this head: the venv first on ``PATH``, the token file,
        ``RAY_ADDRESS``; other Ray addresses and tokens of ``base`` removed.

        Args:
            base: Starting environment (default ``os.environ``).

        Returns:
            A new environment dict.
        """
        env = _clean_env(base)
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path), "RAY_ADDRESS": self.address})
        return env

    # ---------------------------------------------------------------------------------------------- start/stop
    def start(self) -> RayHead:
        """Starts the head and waits until the Jobs API answers.

        Returns:
            self.

        Raises:
            ServiceError: it did not come up in time (the message holds the end of its log), or the temp dir is too
                long for Ray's unix sockets.
        """
        if self.running:
            return self
        self.temp_dir = self._temp_dir_arg or Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
        self.temp_dir = self.temp_dir.resolve()
        # session_YYYY-MM-DD_HH-MM-SS_ffffff_PID/sockets/plasma_store: ~60 characters below the temp dir
        if len(str(self.temp_dir)) + 60 > _MAX_SOCKET_PATH:
            raise ServiceError(
                f"temp_dir {str(self.temp_dir)!r} is too long ({len(str(self.temp_dir))} chars): Ray's unix socket "
                f"paths below it must stay under {_MAX_SOCKET_PATH}; use a short folder such as /tmp/rjXXXX"
            )
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.token_path = self._token_path_arg or self.temp_dir / "auth_token"
        if not self.token_path.exists():
            self.token_path.parent.mkdir(parents=True, exist_ok=True)
            self.token_path.write_text(secrets.token_hex(32))
            self.token_path.chmod(0o600)
        self.log_path = self._log_path_arg or self.temp_dir / "ray-start.log"
        self.ports = {flag: free_port() for flag in _PORT_FLAGS}
        env = _clean_env(None)
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        env.update(self.extra_env)
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)})
        argv = [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            f"--node-ip-address={LOOPBACK}", f"--dashboard-host={LOOPBACK}", "--include-dashboard=true",
            f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
            "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats",
            *(f"--{flag}={port}" for flag, port in self.ports.items()),
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        logger.info("ray head: started pid %d (dashboard %s, temp dir %s)", self.proc.pid, self.address, self.temp_dir)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.running:
                break
            if self._api_ok():
                logger.info("ray head up at %s (GCS %s)", self.address, self.gcs_address)
                return self
            time.sleep(1.0)
        log = _tail(self.log_path)
        self.stop()
        raise ServiceError(f"ray head did not answer {self.address}/api/version within {self.startup_timeout:.0f} s; "
                           f"log:\n{log}")

    def _api_ok(self) -> bool:
        request = urllib.request.Request(f"{self.address}/api/version",
                                         headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, *, timeout: float = 60.0) -> None:
        """Stops the head this object started: SIGTERM to the ``ray start`` process, which stops its Ray processes;
        descendants that outlive it get SIGTERM, then SIGKILL after ``timeout``. Nothing else is signalled.

        Args:
            timeout: Seconds to wait after each signal.
        """
        proc, self.proc = self.proc, None
        try:
            if proc is not None:
                family = _descendants(proc.pid)  # before the parent goes: orphans lose their parent link
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    logger.warning("ray head (pid %d) ignored SIGTERM for %.0f s; killing it", proc.pid, timeout)
                    proc.kill()
                    proc.wait(timeout=timeout)
                _stop_survivors(family, timeout=timeout)
                logger.info("ray head: pid %d stopped", proc.pid)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            if self._own_temp_dir and self.temp_dir is not None:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.ports = {}


def _clean_env(base: dict[str, str] | None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with this environment's ``bin/`` first on ``PATH`` and no other cluster's
    address or token."""
    env = dict(os.environ if base is None else base)
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(key, None)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, *(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)])
    return env


def _descendants(pid: int) -> list[Any]:
    """The processes below ``pid`` right now (psutil handles: they remember their start time, so a recycled PID
    is never mistaken for one of them)."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _stop_survivors(family: list[Any], *, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout``, to those of ``family`` still running (only those)."""
    import psutil

    alive = [p for p in family if p.is_running()]
    if not alive:
        return
    _, alive = psutil.wait_procs(alive, timeout=min(10.0, timeout))  # the head may still be tearing them down
    if not alive:
        return
    logger.warning("ray head: %d of its processes outlived it; stopping them: %s", len(alive),
                   ", ".join(f"{p.pid}" for p in alive))
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)


def connect_ray() -> None:
    """Joins the Ray cluster this process runs on (``ray job submit``, RAY_ADDRESS) or starts a local one on the
    whole machine (``revcol run``, ``revcol eval``)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    import psutil

    # Ray counts as schedulable memory only what is free at start minus its object store (15 of 24 GiB here):
    # a recipe sized for the machine (scaling.memory_per_worker_gb) would wait forever. This cluster is the
    # whole machine, and `revcol plan` (checked before) guards what fits in it. address="local": a new cluster even
    # when another Ray runs on the machine (ray.init would join it, and refuse num_cpus there).
    ray.init(address="local", num_cpus=max(2, psutil.cpu_count() or 2), include_dashboard=False,
             log_to_driver=True, _memory=psutil.virtual_memory().total)


def check_shared_storage(recipe: Recipe, *, nodes: int | None = None) -> None:
    """On a cluster of more than one node (``nodes``, default: the alive nodes of the connected Ray cluster),
    refuses what only this node can see: a local ``storage_path``, shards or weights outside
    ``scaling.shared_paths``, and a SQLite tracking store (rank 0 logs from its own node).

    Raises:
        ValueError: naming each such key, its value and the fix; nothing has been placed on the cluster yet.
    """
    from pipeline.storage import is_s3_url

    if nodes is None:
        import ray

        nodes = sum(1 for node in ray.nodes() if node["Alive"])
    if nodes <= 1:
        return
    shared = [Path(p).expanduser().resolve() for p in recipe.scaling.shared_paths]

    def node_local(path: str) -> bool:
        return not is_s3_url(path) and not any(Path(path).resolve().is_relative_to(s) for s in shared)

    paths = {"storage_path": [recipe.storage_path]}
    for stage in recipe.stages:
        for split in ("train", "val"):
            paths[f"stages.{stage.name}.data.{split}"] = stage.data.spec_paths(split)
        if stage.init_from and stage.init_from not in {s.name for s in recipe.stages}:
            paths[f"stages.{stage.name}.init_from"] = [stage.init_from]
    problems = [f"{key}: {value!r} is a folder of this node" for key, values in paths.items()
                for value in values if node_local(value)]
    if recipe.tracking.uri.startswith("sqlite:"):
        problems.append(f"tracking.uri: {recipe.tracking.uri!r} is a database file of this node, which the "
                        "training workers on other nodes log to: use an MLflow server (http://HOST:5000)")
    if problems:
        raise ValueError(
            f"the Ray cluster has {nodes} nodes, and other nodes cannot see what is only on this one:\n  "
            + "\n  ".join(problems)
            + "\nUse s3:// URLs (and an MLflow server), or, for a folder every node mounts at the same path, "
            "declare it in scaling.shared_paths."
        )

