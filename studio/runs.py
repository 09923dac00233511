"""Run directories: how the CLI, background jobs and the studio talk (``runs/<id>/``).

Layout: ``spec.json`` (what was asked), ``events.jsonl`` (appended progress/metrics), ``results.json``,
``status.json``, ``plan.json``, ``export/`` and checkpoints. Every whole-file write is atomic (temp + rename),
so a reader never sees half a file and a crash never leaves one.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import Cancelled, StudioError
from .events import Event

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudioError(f"{path} does not exist.") from None
    except json.JSONDecodeError as e:
        raise StudioError(
            f"{path} is not valid JSON (line {e.lineno}: {e.msg}). Fix or regenerate it."
        ) from None


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def new_run_id(prefix: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{prefix}"


# What the job launcher (studio.jobs) writes into a run folder before the command itself runs: a folder holding
# only these is a run being started, not somebody else's output.
JOB_FILE, PID_FILE, EXIT_FILE, STDOUT, STDERR = "job.json", "job.pid", "exit_code", "stdout.log", "stderr.log"
LAUNCHER_FILES = frozenset({JOB_FILE, PID_FILE, EXIT_FILE, STDOUT, STDERR, "status.json", "exit_code.tmp"})


class RunDir:
    """One run's folder. Safe to open from several processes: readers tolerate a partial last event line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not _RUN_ID.match(self.path.name):
            raise StudioError(
                f"Run name '{self.path.name}' is not allowed: use letters, digits, '-', '_' or '.' (at most 100)."
            )

    @classmethod
    def create(cls, path: str | Path, spec: dict[str, Any], *, exist_ok: bool = False) -> RunDir:
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise StudioError(f"{run.path} is a file, not a folder: give --out a new folder, e.g. runs/NAME.")
        if (
            run.path.is_dir()
            and any(p.name not in LAUNCHER_FILES for p in run.path.iterdir())
            and not exist_ok
        ):
            # write-once: a non-empty folder may hold another run's plan and export, or the user's files
            what = "another run" if (run.path / "spec.json").exists() else "files"
            raise StudioError(
                f"{run.path} already exists and holds {what}: pick a new --out (runs are written once), or "
                "delete it first."
            )
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            write_json(run.spec_file, spec)
        except OSError as e:
            raise StudioError(
                f"Cannot write the run folder {run.path} ({e.strerror}): pick a writable --out."
            ) from None
        return run

    # files
    @property
    def spec_file(self) -> Path:
        return self.path / "spec.json"

    @property
    def events_file(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def results_file(self) -> Path:
        return self.path / "results.json"

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def cancel_file(self) -> Path:
        return self.path / "CANCEL"

    @property
    def plan_file(self) -> Path:
        return self.path / "plan.json"

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    @property
    def checkpoint_file(self) -> Path:
        return self.path / "checkpoint.pt"  # torch.save payload, read back with weights_only=True

    def checkpoints(self) -> list[Path]:
        """Every resume checkpoint of the run: ``checkpoint.pt`` (retrain, SLS) and the phase or series files
        of multi-phase flows (``p3b_prune.pt``, ``p3b_finetune.pt``, ``splora-<series>*.pt``)."""
        return sorted(p for p in self.path.glob("*.pt") if p.is_file())

    @property
    def has_checkpoint(self) -> bool:
        """Whether the run holds a checkpoint to resume from (any flow's; see :meth:`checkpoints`)."""
        return bool(self.checkpoints())

    def spec(self) -> dict[str, Any]:
        return read_json(self.spec_file)

    def results(self) -> dict[str, Any] | None:
        return read_json(self.results_file) if self.results_file.exists() else None

    def write_results(self, results: dict[str, Any]) -> None:
        write_json(self.results_file, results)

    def status(self) -> dict[str, Any]:
        return read_json(self.status_file) if self.status_file.exists() else {"state": "created"}

    def set_status(self, state: str, **extra: Any) -> None:
        write_json(self.status_file, {"state": state, "time": time.time(), **extra})

    @contextmanager
    def tracking(self, **extra: Any) -> Iterator[RunDir]:
        """Mark the run ``running`` (with this process's pid and start time), then ``done``, ``cancelled`` or
        ``failed``.

        The run's end may be impossible to record (the folder turned read-only or the disk filled up mid-job):
        then the work's own error still propagates (not the failed status write), a line on stderr says why
        ``status.json`` stayed ``running``, and readers (:func:`studio.jobs.job_status`) see a ``running`` whose
        process is gone, or is another process by now (the recorded start time differs), and report it failed.
        """

        pid = os.getpid()
        self.set_status("running", pid=pid, pid_start=process_start_time(pid), **extra)
        try:
            yield self
        except Cancelled:
            self._final_status("cancelled", resumable=self.has_checkpoint)
            raise
        except BaseException as e:
            error = (str(e) or type(e).__name__)[:500]
            self._final_status("failed", error=error, resumable=self.has_checkpoint)
            raise
        if not self._final_status("done"):
            raise StudioError(
                f"The run finished but its folder {self.path} is no longer writable, so its end could not be "
                "recorded; make it writable again and rerun it."
            )

    def _final_status(self, state: str, **extra: Any) -> bool:
        """Record the run's end; False (and a line on stderr) when the folder can no longer be written."""
        try:
            self.set_status(state, **extra)
        except OSError as e:
            print(
                f"warning: cannot record the run's end ({state}) in {self.status_file}: {e.strerror or e}",
                file=sys.stderr,
            )
            return False
        return True

    # events
    def log_event(self, event: Event) -> None:
        """Append one event as a JSON line (a callback: ``callbacks=[run.log_event]``)."""
        line = json.dumps(event.to_dict(), default=_json_default)
        with open(self.events_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.events_file.exists():
            return []
        out = []
        for line in self.events_file.read_text(encoding="utf-8").splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
            if kind is None or ev.get("kind") == kind:
                out.append(ev)
        return out


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or None off Linux:
    a pid with another start time is another process that reuses the number."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def list_runs(root: str | Path) -> list[RunDir]:
    """Every run folder under ``root`` (newest first)."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [
        RunDir(p)
        for p in root.iterdir()
        if p.is_dir() and (p / "spec.json").exists() and _RUN_ID.match(p.name)
    ]
    return sorted(runs, key=lambda r: r.spec_file.stat().st_mtime, reverse=True)


# ------------------------------------------------------------------------------------------ event logging
class RunLogger:
    """The job side of the run folder: append events to ``events.jsonl``, thinned, with resource readings.

    ``progress`` events are kept at most every ``progress_every`` seconds and ``max_points`` times per task (and
    the last one of each task), so a 300-epoch run writes a few thousand lines, not one per step, and the studio
    can re-read the curves every two seconds; every ``resource_every`` seconds a ``resource`` event records
    resident memory and, on CUDA, allocated GPU memory.
    """

    def __init__(
        self,
        run: RunDir,
        *,
        progress_every: float = 0.5,
        max_points: int = 2000,
        resource_every: float = 5.0,
    ) -> None:
        self.run = run
        self.progress_every, self.max_points, self.resource_every = progress_every, max_points, resource_every
        self._last_progress: dict[str, tuple[float, int]] = {}
        self._last_resource = 0.0

    def __call__(self, event: Event) -> None:
        now = event.time
        if event.kind == "progress":
            task = str(event.data.get("task", ""))
            done, total = int(event.data.get("done", 0)), int(event.data.get("total") or 0)
            last_time, last_done = self._last_progress.get(task, (0.0, -(10**12)))
            if done != total and (
                now - last_time < self.progress_every or done - last_done < total / self.max_points
            ):
                return
            self._last_progress[task] = (now, done)
        self.run.log_event(event)
        if now - self._last_resource >= self.resource_every:
            self._last_resource = now
            self.run.log_event(Event("resource", resource_usage()))


def resource_usage() -> dict[str, Any]:
    """Resident memory of this process and, when CUDA is in use, its GPU memory."""
    out: dict[str, Any] = {}
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        out["rss_mb"] = round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        import resource

        out["rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_mem_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        out["gpu_max_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
