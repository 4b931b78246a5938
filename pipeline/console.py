"""The console of a Ray job as a person reads it: a header, one progress bar, the summary.

Enters: where a run's log goes (`{output}/logs/{run_id}.log`), `--verbose`, the number of
samples a run has to do, and Ray while it runs: the Python loggers of Ray and Ray Data, its
streaming executor (through a Ray Data execution callback) and the driver's standard error.
Leaves: Ray's own INFO records (cluster start, execution plan, per-operator progress) in the
run's log file instead of on the console (on both with `--verbose`); warnings and errors still
on the console; one progress line redrawn on a terminal, or a plain line every few seconds
where the output is not one (cron, `ray job logs`, a pipe); the log uploaded beside the results
when the output is on object storage.

One line of Ray's is moved from the console to the log even though it is printed at ERROR
level: the core worker's `Actor … has constructor arguments in the object store and
max_restarts > 0` (`FALSE_ALARM`). Ray Data itself passes every pool actor its DataContext and
its transform as object references (`map_operator.py`, `_map_transformer_ref`, kept by the
operator for the whole execution) and gives pool actors `max_restarts=-1`, so Ray prints it for
every healthy actor-pool job (ray-project/ray#57733). Restarts are what let a run survive a lost
node (tests/test_node_failure.py), so they stay, and only that exact line is moved.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TextIO

from fsspec.implementations.local import LocalFileSystem
from ray.data._internal.execution.execution_callback import ExecutionCallback

from pipeline.storage import describe, filesystem, join, write_atomic

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers whose records go to the run's log. Ray's two have their own console handlers and do
# not propagate; everything else (the pipeline's own loggers included) reaches the root.
RAY_LOGGERS = ("ray", "ray.data")
# Seconds between progress lines where the output is not a terminal.
PLAIN_INTERVAL_S = 5.0

# Ray Core's line about Ray Data's own pool actors (see the module docstring), and nothing else:
# other actors, and every other line of the driver's standard error, pass through untouched.
FALSE_ALARM = re.compile(
    rb"^\[[^\]]*\] core_worker\.cc:\d+: Actor with class name: 'MapWorker\([^']*\)' and ID: "
    rb"'[0-9a-f]+' has constructor arguments in the object store and max_restarts > 0\."
)
# Ray Data's answer to `enable_progress_bars = False`, a setting this module makes on purpose.
_PROGRESS_OFF = "Progress bars disabled."


def log_uri(output: str, run_id: str) -> str:
    """Where a run's log lives: beside its results, under the output prefix."""
    return join(output, "logs", f"{run_id}.log")


# --- Ray's records to the run's log ----------------------------------------------------------


class _DemoteProgressOff(logging.Filter):
    """Ray Data logs at WARNING that its progress bars are off, which `Console` does because it
    draws its own: that one record becomes INFO (the log file keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith(_PROGRESS_OFF):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    from ray.data._internal.logging import SessionFileHandler  # Ray Data's own log file

    return [
        h for h in logger.handlers if not isinstance(h, (logging.FileHandler, SessionFileHandler))
    ]


class LogFile(logging.FileHandler):
    """The run's log file, opened at its first record (a run refused before it starts leaves
    none behind); in a temporary folder where `wanted` is None (an object store's URI) or cannot
    be written (the preflight check says why, in its one line)."""

    def __init__(self, wanted: str | None, name: str) -> None:
        self.wanted = wanted  # the path asked for; `baseFilename` is where it is written
        self.file_name = name
        super().__init__(wanted or os.path.join(tempfile.gettempdir(), name), "a", "utf-8", True)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.setLevel(logging.INFO)

    def _open(self) -> Any:
        if self.wanted:
            try:
                os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
                return super()._open()
            except OSError:
                pass
        folder = tempfile.mkdtemp(prefix="harmonize-log-")
        self.baseFilename = os.path.join(folder, self.file_name)
        return super()._open()

    @property
    def opened(self) -> bool:
        return self.stream is not None or os.path.exists(self.baseFilename)


@contextlib.contextmanager
def ray_logs_to(file_handler: logging.Handler, verbose: bool) -> Iterator[None]:
    """Send the records of Ray, Ray Data and the pipeline at INFO and above to `file_handler`;
    on the console keep WARNING and above (all of them with `verbose`). Ray Data's ERROR
    records (a failed run's traceback, a plea to report a Ray bug) stay off the console too:
    the command says what failed in one line."""
    loggers = [logging.getLogger(name) for name in ("", *RAY_LOGGERS)]
    consoles = [h for logger in loggers for h in _console_handlers(logger)]
    saved = [(h, h.level) for h in consoles]
    root = logging.getLogger()
    root_level = root.level
    demote = _DemoteProgressOff()
    progress_logger = logging.getLogger("ray.data._internal.progress")
    for logger in loggers:
        logger.addHandler(file_handler)
    root.setLevel(min(root_level or logging.WARNING, logging.INFO))
    data_consoles = _console_handlers(logging.getLogger("ray.data"))
    if not verbose:
        for handler in consoles:
            handler.setLevel(max(handler.level, logging.WARNING))
        for handler in data_consoles:
            handler.addFilter(_below_error)
    progress_logger.addFilter(demote)
    try:
        yield
    finally:
        progress_logger.removeFilter(demote)
        for handler in data_consoles:
            handler.removeFilter(_below_error)
        for handler, level in saved:
            handler.setLevel(level)
        root.setLevel(root_level)
        for logger in loggers:
            logger.removeHandler(file_handler)
        file_handler.close()


@dataclass
class RunLog:
    """The run's log at `uri`: written in place when that is a local path; otherwise written to
    a local temporary file and uploaded to `uri` when the run ends, failed or not."""

    uri: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    verbose: bool = False

    def __post_init__(self) -> None:
        fs, path = filesystem(self.uri, self.storage_options)
        local = path if isinstance(fs, LocalFileSystem) else None
        self.file = LogFile(local, posixpath.basename(path))
        self.discarded = False

    @property
    def path(self) -> str:
        """Where the log is being written on this machine."""
        return self.file.baseFilename

    def where(self) -> str:
        """The log's location as the header says it."""
        if self.file.wanted:  # there, or in a temporary folder where the output refused it
            return self.path
        return f"{self.uri} (when the run ends; until then {self.path})"

    def discard(self) -> None:
        """A run refused before any work (its one line says why) leaves no log behind."""
        self.discarded = True
        self.file.close()
        with contextlib.suppress(OSError):
            os.remove(self.path)
            os.rmdir(os.path.dirname(self.path))  # the logs/ folder, when it is empty

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        try:
            with ray_logs_to(self.file, self.verbose):
                yield
        finally:
            if self.file.wanted is None and self.file.opened and not self.discarded:
                with open(self.path, "rb") as file:
                    data = file.read()
                try:
                    write_atomic(self.uri, data, self.storage_options)
                except Exception as exc:  # the run's own outcome matters more than its log's
                    log.warning("the run's log stays at %s: %s", self.path, describe(exc))


# --- the driver's standard error -------------------------------------------------------------


@contextlib.contextmanager
def false_alarm_to_log() -> Iterator[None]:
    """While the block runs, read the process's standard error (file descriptor 2, where Ray's
    C++ core worker writes) through a pipe: the line `FALSE_ALARM` matches goes to the log at
    INFO; every other byte goes on to the real standard error at once.

    Enter it after `ray.init`: processes started inside the block would inherit the pipe."""
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward(data: bytes) -> None:
        try:
            while data:
                data = data[os.write(real, data) :]
        except OSError:  # a closed console: keep reading, so that no writer ever blocks
            pass

    def pump() -> None:
        pending, at_line_start = b"", True
        with open(read_end, "rb", buffering=0) as source:
            while chunk := source.read(65536):
                pending += chunk
                while pending:
                    if at_line_start and pending.startswith(b"["):
                        # A line of the core worker: held until it is whole, then judged.
                        end = pending.find(b"\n")
                        if end < 0:
                            break
                        line, pending = pending[: end + 1], pending[end + 1 :]
                        if FALSE_ALARM.match(line):
                            log.info(
                                "Ray Core (not shown on the console; Ray Data's own pool "
                                "actors, ray-project/ray#57733): %s",
                                line.decode(errors="replace").strip(),
                            )
                        else:
                            forward(line)
                        continue
                    # Anything else (Python's stderr, a part of a line) passes at once.
                    end = pending.find(b"\n")
                    cut = len(pending) if end < 0 else end + 1
                    forward(pending[:cut])
                    pending, at_line_start = pending[cut:], end >= 0
            forward(pending)

    thread = threading.Thread(target=pump, name="stderr-router", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer closes: the pump reads to the end and stops
        thread.join(timeout=5)
        os.close(real)


# --- progress --------------------------------------------------------------------------------


class Progress:
    """Samples done of `total`, images per second, ETA: a tqdm bar redrawn on a terminal, a
    plain line every `interval` seconds (and a last one) elsewhere. Thread-safe `update`."""

    def __init__(self, total: int, stream: TextIO, interval: float = PLAIN_INTERVAL_S) -> None:
        self.total = total
        self.stream = stream
        self.interval = interval
        self.done = 0
        self.start = time.monotonic()
        self._last_line = -interval
        self._last_shown = -1
        self._lock = threading.Lock()
        self._bar: Any = None
        if _is_terminal(stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, file=stream, unit=" images", leave=True,
                ncols=min(_width(stream) or 80, 120),  # 0: a terminal that does not say
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} samples "
                "[{elapsed}<{remaining}, {rate_fmt}]",
            )  # fmt: skip
        else:
            self._line()

    def update(self, done: int) -> None:
        with self._lock:
            if done <= self.done:
                return
            if done > self.total:  # ids done earlier but no longer in the manifest
                self.total = done
                if self._bar is not None:
                    self._bar.total = done
            if self._bar is not None:
                self._bar.update(done - self.done)
            self.done = done
            if self._bar is None and time.monotonic() - self._last_line >= self.interval:
                self._line()

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
            elif self._last_shown != self.done:  # the last count, once
                self._line()

    def text(self) -> str:
        from tqdm import tqdm

        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = tqdm.format_interval((self.total - self.done) / rate) if rate > 0 else "?"
        return (
            f"progress: {self.done}/{self.total} samples, {rate:.2f} images/s, ETA {eta}, "
            f"elapsed {tqdm.format_interval(elapsed)}"
        )

    def _line(self) -> None:
        self._last_line = time.monotonic()
        self._last_shown = self.done
        self.stream.write(self.text() + "\n")
        self.stream.flush()


def _width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return 0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False


def rows_to_sink(executor: Any) -> int | None:
    """Rows the streaming executor has handed towards its last operator (the sink): what the
    operator before it has produced. None where Ray Data's internals are not as expected."""
    topology = getattr(executor, "_topology", None)
    if not topology:
        return None
    last = list(topology)[-1]
    inputs = getattr(last, "input_dependencies", None) or [last]
    return int(inputs[0].metrics.rows_task_outputs_generated)


class ReportProgress(ExecutionCallback):
    """A Ray Data execution callback (`DataContext.custom_execution_callback_classes`) that
    reports each step's count to the `Progress` being drawn; it never fails the run. A class at
    module level: the DataContext travels to Ray's workers and names it there by reference."""

    current: ClassVar[Progress | None] = None  # the driver's; None anywhere else
    broken: ClassVar[bool] = False

    def on_execution_step(self, executor: Any) -> None:
        progress = ReportProgress.current
        if progress is None or ReportProgress.broken:
            return
        try:
            done = rows_to_sink(executor)
        except Exception as exc:  # a Ray Data that moved its internals: no count, a note
            ReportProgress.broken = True
            log.info("progress: cannot count rows (%s: %s)", type(exc).__name__, exc)
            return
        if done is not None:
            progress.update(done)

    def after_execution_succeeds(self, executor: Any) -> None:
        self.on_execution_step(executor)


# --- what a command gives a Ray job ----------------------------------------------------------


@dataclass
class Console:
    """What a command shows while a Ray job runs: `header` once, `executing(total)` around the
    Ray Data execution (progress, Ray's false alarm to the log), then the command's summary.
    `out` is for the header (stdout), `err` for the progress (stderr), as tqdm does."""

    log: RunLog
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    show_progress: bool = True

    def header(self, text: str) -> None:
        self.out.write(f"{text}; log: {self.log.where()}\n")
        self.out.flush()

    @contextlib.contextmanager
    def executing(self, total: int) -> Iterator[None]:
        from ray.data import DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False  # this console draws the one bar
        callbacks = list(context.custom_execution_callback_classes)
        # The progress goes to the real standard error, opened before fd 2 is routed.
        stream = os.fdopen(os.dup(self.err.fileno()), "w") if _has_fd(self.err) else self.err
        progress = Progress(total, stream) if self.show_progress else None
        if progress is not None:
            ReportProgress.current, ReportProgress.broken = progress, False
            context.custom_execution_callback_classes = [*callbacks, ReportProgress]
        try:  # --verbose: every line of Ray's as it came
            with contextlib.nullcontext() if self.log.verbose else false_alarm_to_log():
                yield
        finally:
            context.custom_execution_callback_classes = callbacks
            ReportProgress.current = None
            if progress is not None:
                progress.close()
            if stream is not self.err:
                stream.close()


def _has_fd(stream: TextIO) -> bool:
    try:
        stream.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False
    return True
