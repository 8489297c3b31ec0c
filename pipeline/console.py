"""What a person reads while ``revcol run`` and ``revcol demo`` work, and the log file that keeps everything else.

The console gets, per stage, one line when it starts, one progress line (step/total, loss, samples/s, ETA) and one
line when it ends; besides those, the warnings of this project's own code (driver and workers, once each), what
Ray's raylet reports to the driver (a worker killed for memory, …) and every error. Everything else — the driver's
INFO logging, Ray's, Ray Data's, MLflow's and DeepSpeed's messages, Python warnings and every line the Ray workers
print (Ray forwards them to the driver) — goes to one log file per run, named on the console's first line, which also
names Ray's own session logs. With ``verbose`` the libraries' output stays on the console as well (the file is
still written).

On a terminal the progress line is redrawn in place; otherwise (``ray job logs``, a pipe, a file) it is printed as
plain lines: the first, then at most one per tenth of the stage and minute, and the last, so a job log stays short.

The progress numbers are rank 0's progress log line (``_log_progress`` in :mod:`pipeline.train.loop`), which Ray
forwards from the worker to the driver anyway: no extra channel between them. Hooking into that forwarding uses
Ray's stdout/stderr dispatcher (``ray._private.ray_logging``), the one ``ray.init(log_to_driver=True)`` prints
through; without it (another Ray version) worker lines stay on the console as Ray prints them.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["RunConsole", "StageEvents", "run_log_path"]

logger = logging.getLogger(__name__)

_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The message of rank 0's `_log_progress` (pipeline/train/loop.py): "pretrain step 20/135 epoch 0 loss 3.2100 lr
# 1.00e-03 45.6 samples/s stall 3% skipped 0".
_PROGRESS = re.compile(r"(?P<stage>\S+) step (?P<step>\d+)/(?P<total>\d+) epoch (?P<epoch>\d+) loss (?P<loss>\S+) "
                       r"lr \S+ (?P<rate>\S+) samples/s")
_RESUMED = re.compile(r"rank 0 resumed at step (?P<step>\d+)")
# A record of this project's own loggers as a worker prints it (train_func's logging format, `_FILE_FORMAT`).
_WORKER_WARNING = re.compile(r"^\S+ \S+ (?P<level>WARNING|ERROR|CRITICAL) (?P<name>(?:pipeline|revcol)[\w.]*): "
                             r"(?P<message>.*)")
_OWN_LOGGERS = ("pipeline", "revcol")
_PLAIN_EVERY_S = 60.0
"""Off a terminal, at most one progress line per tenth of the stage and this many seconds (plus the first, last)."""


def run_log_path(folder: str | Path, name: str) -> Path:
    """``FOLDER/NAME-YYYYmmdd-HHMMSS.log``: a new log file per run."""
    return Path(folder) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class StageEvents:
    """What the stage chain tells whoever watches it (:func:`pipeline.stages.run_pipeline`); this base class
    ignores it all (library use, tests), :class:`RunConsole` shows it."""

    def note(self, text: str) -> None:
        """A line of information outside any stage (e.g. the demo's data)."""

    def stage_started(self, stage: str, kind: str, run_id: str) -> None:
        """``stage`` starts, tracked in MLflow run ``run_id``."""

    # `outcome`: a pipeline.stages.StageOutcome (not imported: stages imports this module)
    def stage_skipped(self, outcome: Any) -> None:
        """A stage finished before: its outputs are reused."""

    def stage_finished(self, outcome: Any) -> None:
        """A stage ended successfully."""

    def stage_failed(self, stage: str, error: BaseException) -> None:
        """A stage raised ``error`` (it propagates after this)."""


class _Progress:
    """The current stage's progress as the driver sees it: steps and when they arrived, for the ETA."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.started = time.monotonic()
        self.first: tuple[int, float] | None = None  # (step, time) of the first progress line
        self.text: str | None = None  # the latest progress line
        self.printed_at = 0.0  # off a terminal: when a progress line was last printed, and its tenth
        self.printed_tenth = -1

    def update(self, step: int, total: int, epoch: int, loss: str, rate: str) -> None:
        now = time.monotonic()
        if self.first is None or step < self.first[0]:
            self.first = (step, now)
        eta = "-"
        first_step, first_time = self.first
        if step > first_step:
            eta = _duration((total - step) * (now - first_time) / (step - first_step))
        self.text = f"{self.stage} step {step}/{total} epoch {epoch} loss {loss} | {rate} samples/s | ETA {eta}"


class _ConsoleHandler(logging.Handler):
    """Root-logger records that belong on the console: this project's warnings and every error, each message once."""

    def __init__(self, console: RunConsole) -> None:
        super().__init__(level=logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        own = record.name.split(".")[0] in _OWN_LOGGERS
        if record.levelno < logging.ERROR and not own:
            return
        try:
            text = record.getMessage()
        except Exception:  # a malformed record must not break the run; the file handler reports it
            return
        if record.exc_info and record.levelno >= logging.ERROR:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.console.warn_once(f"{record.levelname.lower()}: {text}")


class RunConsole(StageEvents):
    """The console of one run and its log file; a context manager (``with RunConsole(path) as console:``).

    Args:
        log_path: The run's log file (created with its folder).
        verbose: Leave Ray's, Ray Data's, DeepSpeed's and the other libraries' output on the console too, progress
            bars included, and log at DEBUG.
        stream: Where the start, progress and end lines go (default ``sys.stdout``); warnings and errors go to
            ``sys.stderr``. A terminal gets a live progress line, anything else plain lines.
    """

    def __init__(self, log_path: str | Path, *, verbose: bool = False, stream: IO[str] | None = None) -> None:
        self.log_path = Path(log_path).absolute()
        self.verbose = verbose
        self.stream = stream if stream is not None else sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._lock = threading.RLock()
        self._progress: _Progress | None = None
        self._drawn = False  # a live progress line is on the terminal, without its newline
        self._warned: set[str] = set()
        self._file_handler: logging.FileHandler | None = None
        self._console_handler: _ConsoleHandler | None = None
        self._removed_root_handlers: list[logging.Handler] = []
        self._ray_hooked = False
        self._closed = True

    # ------------------------------------------------------------------------------------------------ lifetime
    def __enter__(self) -> RunConsole:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._file_handler = logging.FileHandler(self.log_path, encoding="utf-8")
        self._file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        root = logging.getLogger()
        root.setLevel(logging.DEBUG if self.verbose else logging.INFO)
        root.addHandler(self._file_handler)
        self._closed = False
        if not self.verbose:
            # the root's own console handlers (logging.basicConfig) give way to the filtered one
            self._removed_root_handlers = [h for h in root.handlers if _prints_to_console(h)]
            for handler in self._removed_root_handlers:
                root.removeHandler(handler)
            self._console_handler = _ConsoleHandler(self)
            root.addHandler(self._console_handler)
            logging.captureWarnings(True)  # Python warnings (deprecations, …) become records: the file
            # Ray's and MLflow's loggers print on their own (propagate=False); imported here so that what they say
            # while the cluster and the tracking store start goes to the file too.
            import mlflow  # noqa: F401
            import ray  # noqa: F401

            self._route_library_loggers()
        self.line(f"log: {self.log_path} (Ray, Ray Data, DeepSpeed and worker output"
                  f"{', also shown here' if self.verbose else ''})")
        logger.info("command line: %s", " ".join(sys.argv))
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        with self._lock:
            self._finish_progress_line()
            if exc is not None:
                self.line(f"the full log of this run: {self.log_path}", stream=sys.stderr)
            self._closed = True
        root = logging.getLogger()
        for handler in (self._console_handler, self._file_handler):
            if handler is not None:
                root.removeHandler(handler)
                handler.close()
        for handler in self._removed_root_handlers:
            root.addHandler(handler)
        self._removed_root_handlers = []
        if not self.verbose:
            logging.captureWarnings(False)
        if self._ray_hooked:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher

            global_worker_stdstream_dispatcher.remove_handler("revcol_console")

    # -------------------------------------------------------------------------------------------------- output
    def line(self, text: str, *, stream: IO[str] | None = None) -> None:
        """Prints ``text`` as its own line, keeping a live progress line below it."""
        stream = stream or self.stream
        with self._lock:
            if self._drawn:
                self.stream.write("\r\x1b[K")
            stream.write(text + "\n")
            stream.flush()
            if self._drawn:
                self.stream.write(self._progress.text if self._progress and self._progress.text else "")
                self.stream.flush()

    def warn_once(self, text: str) -> None:
        """``text`` on stderr, unless it was shown before in this run."""
        with self._lock:
            if text in self._warned or self._closed:
                return
            self._warned.add(text)
            self.line(text, stream=sys.stderr)

    def _show_progress(self, progress: _Progress, step: int, total: int) -> None:
        text = progress.text or ""
        if self.live:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
            self._drawn = True
            return
        now = time.monotonic()
        tenth = 10 * step // max(total, 1)
        first, final = progress.printed_tenth < 0, step >= total
        if first or final or (tenth > progress.printed_tenth and now - progress.printed_at >= _PLAIN_EVERY_S):
            progress.printed_tenth, progress.printed_at = tenth, now
            self.line(text)

    def _finish_progress_line(self) -> None:
        """Ends the live progress line with a newline (it stays on the terminal as the stage's last progress)."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    # ---------------------------------------------------------------------------------------------- stage events
    def note(self, text: str) -> None:
        self.line(text)

    def stage_started(self, stage: str, kind: str, run_id: str) -> None:
        self._hook_ray()
        self._route_library_loggers()  # libraries imported since (Ray Train, DeepSpeed) may have their own
        with self._lock:
            self._progress = _Progress(stage)
        self.line(f"{stage} started ({kind}): MLflow run {run_id}")

    def stage_skipped(self, outcome: Any) -> None:
        self.line(f"{outcome.stage} skipped: finished before, outputs reused (MLflow run {outcome.run_id})")

    def stage_finished(self, outcome: Any) -> None:
        with self._lock:
            progress, self._progress = self._progress, None
            if progress is not None and progress.text and not self.live and progress.printed_tenth < 10:
                self.line(progress.text)  # the last step, when the throttle held it back
            self._finish_progress_line()
        parts = [f"{outcome.stage} finished in {_duration(outcome.seconds or 0.0)}"]
        if outcome.samples_per_s:
            parts.append(f"{outcome.samples_per_s:.0f} samples/s")
        top1 = outcome.metrics.get("val/top1")
        if top1 is not None:
            parts.append(f"top-1 {top1:.2%}")
        self.line(", ".join(parts))

    def stage_failed(self, stage: str, error: BaseException) -> None:
        with self._lock:
            progress, self._progress = self._progress, None
            self._finish_progress_line()
        seconds = time.monotonic() - progress.started if progress is not None else 0.0
        reason = "stopped" if isinstance(error, (SystemExit, KeyboardInterrupt)) else "failed"
        # the last line: a worker error's message ends with the worker's own exception
        lines = [line for line in str(error).splitlines() if line.strip()]
        self.line(f"{stage} {reason} after {_duration(seconds)}: {lines[-1] if lines else type(error).__name__}",
                  stream=sys.stderr)

    # ------------------------------------------------------------------------------------------- worker output
    def _hook_ray(self) -> None:
        """Once Ray is up: worker lines Ray forwards go through :meth:`_on_worker_output` (into the file; progress
        and this project's warnings onto the console), Ray Data's progress bars off, Ray's session logs named."""
        if self._ray_hooked:
            return
        import ray

        if not ray.is_initialized():
            return
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher
        except ImportError:  # another Ray: its own printing stays
            logger.warning("this Ray version has no worker-output dispatcher; worker output stays on the console")
            return
        if not self.verbose:
            global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
            from ray.data import DataContext

            # the datasets built from here on carry the setting to the actors that execute them
            DataContext.get_current().enable_progress_bars = False
        global_worker_stdstream_dispatcher.add_handler("revcol_console", self._on_worker_output)
        self._ray_hooked = True
        try:
            logs = ray._private.worker._global_node.get_logs_dir_path()
        except AttributeError:  # joined a cluster from a client: its logs are on the head node
            logs = "on the Ray head node (ray logs --help)"
        logger.info("Ray's own logs (every Ray process of this session): %s", logs)

    def _on_worker_output(self, data: dict[str, Any]) -> None:
        """A batch of lines from one Ray process (``data``: pid, actor or task name, lines), as Ray forwards it."""
        pid = data.get("pid")
        who = " ".join(str(x) for x in (data.get("actor_name") or data.get("task_name"), f"pid={pid}") if x)
        lines = data.get("lines", [])
        if pid == "autoscaler":  # its status every few seconds: only its events, as Ray itself prints them
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        for line in lines:
            if "__ray_tqdm_magic_token__" in line:  # a Ray Data / tqdm_ray progress bar's state update
                continue
            self._write_file(f"({who}) {line}")
            if pid in ("raylet", "autoscaler"):  # what Ray tells the driver: a worker killed for memory, resources
                self.warn_once(f"ray: {line}")  # no node can offer, …
            elif (match := _WORKER_WARNING.match(line)) is not None:
                self.warn_once(f"{match['level'].lower()}: {match['message']}")  # once, whichever worker says it
            elif (match := _PROGRESS.search(line)) is not None:
                self._on_progress(match)
            elif (match := _RESUMED.search(line)) is not None:
                with self._lock:
                    stage = self._progress.stage if self._progress else "stage"
                self.warn_once(f"{stage} resumed at step {match['step']} from its checkpoint")

    def _on_progress(self, match: re.Match[str]) -> None:
        with self._lock:
            progress = self._progress
            if progress is None or progress.stage != match["stage"] or self._closed:
                return  # late lines of a stage that ended
            step, total = int(match["step"]), int(match["total"])
            progress.update(step, total, int(match["epoch"]), match["loss"], match["rate"])
            self._show_progress(progress, step, total)

    def _write_file(self, text: str) -> None:
        handler = self._file_handler
        if handler is None or self._closed:
            return
        handler.handle(logging.LogRecord("worker", logging.INFO, __file__, 0, text, None, None))

    # ------------------------------------------------------------------------------------------ library loggers
    def _route_library_loggers(self) -> None:
        """Loggers that print to the console themselves (Ray's, Ray Data's, MLflow's, DeepSpeed's) hand their records
        to the root logger instead, whose handlers are this console's (the file; the filtered console)."""
        if self.verbose:
            return
        for candidate in list(logging.root.manager.loggerDict.values()):
            if not isinstance(candidate, logging.Logger):
                continue
            printing = [h for h in candidate.handlers if _prints_to_console(h)]
            for handler in printing:
                candidate.removeHandler(handler)
            if printing:
                candidate.propagate = True


def _prints_to_console(handler: logging.Handler) -> bool:
    """A handler writing to a terminal stream (not a file; not this console's)."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
