"""Background jobs: long work (retraining, P3B, SPLoRA, SLS, prune runs) as separate processes on a run directory.

A job is a spec submitted with :func:`submit`: its ``spec.json`` is written into a new run folder and
``python -m studio run runs/NAME`` is started with :func:`start_job`: a small ``/bin/sh`` wrapper in a session
of its own (it survives the Streamlit script, a closed tab or a page reload) starts the trainer in *another*
new session, waits for it and records its exit code. The trainer's own pid is its session and process group
(``setsid``), so ``job.json`` and ``jobs status`` show the trainer (not the wrapper), killing the wrapper does not
make a live trainer look gone (so no second trainer is ever resumed beside it), and a forced cancel signals the
trainer's whole group (torchrun and its workers) while the wrapper lives on to record how it ended. stdout/stderr
go to ``stdout.log``/``stderr.log`` in the run folder; the trainer's pid to ``job.pid``; pids, command and
device to ``job.json``. Everything else is read back from the folder, so any tab, a later
session or the CLI (``python -m studio jobs list|status|cancel|logs``) sees the same state:

- :func:`job_status` combines ``job.json``, the command's own ``status.json`` and whether the process is still
  alive. A process that is gone without having reported an end (killed, out of memory) is ``failed`` with the
  last error found in its stderr or events, never ``running`` forever.
- :func:`cancel_job` creates the run's ``CANCEL`` file, which the training loop checks every step (it saves a
  checkpoint and stops cleanly); ``force`` adds SIGTERM to the process group as a fallback.
- :func:`resume_job` re-runs the same command with ``--resume``.
- Ownership: runs and jobs are shared by every browser session of one studio server, so a job started from the
  web UI records its owner: the SHA-256 digest (:func:`owner_id`) of a random token of the browser session that
  started it (:func:`studio.ui.jobs.session_token`, kept in the session and the page URL's ``?owner=``; the URL
  is the capability: whoever has it acts as that session). :func:`cancel_job` and :func:`resume_job` given an
  ``owner`` token refuse a job recorded under another one, or under none (a CLI job), and the pages offer Cancel
  and Resume only to the owner; others see the run read-only. The CLI is the machine's local user: it passes no
  token and may cancel or resume any job.
- One job per device on the machine: a lock file per device in a per-user folder (``$STUDIO_LOCK_DIR``, else
  ``$XDG_RUNTIME_DIR/pruning-studio/locks``, else ``<tmp>/pruning-studio-<uid>/locks``) holds the pid of the
  trainer using it, whatever folder its run lives in, and a second job on a busy device is refused with a
  message naming the running one, or, submitted with ``queue=True`` (the pages do), waits as ``queued``
  (``queued.json`` in its folder) until :func:`dispatch` starts it: each job's launcher runs ``jobs dispatch``
  as its trainer exits, so the queue moves on with no page open. A lock whose process is gone is stale and
  taken over. A training command run in the foreground (``retrain``, ``run``) takes the same lock for its
  duration.
- With ``nproc > 1`` the command runs under ``torchrun --standalone --nproc_per_node N`` (one process per GPU,
  DistributedDataParallel, see :mod:`studio.distributed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import StudioError
from .flows import Spec, create_run
from .plan import PrunePlan
from .runs import EXIT_FILE, JOB_FILE, PID_FILE, STDERR, STDOUT, RunDir, read_json, write_json, write_text
from .threads import SERVER_ENV, job_threads

# sh -c _WRAPPER EXIT_FILE PID_FILE cmd...: start the trainer, write its pid, ignore the signals meant for it,
# wait and record its exit code atomically (so a status poll from any process learns how it ended)
# then, its device now free, start the jobs queued for it (``jobs dispatch``) before exiting with the code
_WRAPPER = (
    'pidf=$1; shift; "$@" & child=$!; echo "$child" > "$pidf"; trap "" TERM INT; wait "$child"; code=$?; '
    'echo "$code" > "$0.tmp"; mv "$0.tmp" "$0"; q="$STUDIO_DISPATCH_ROOT"; '
    'if [ -n "$q" ] && ls "$q"/*/queued.json >/dev/null 2>&1; then '
    '"$STUDIO_PYTHON" -m studio jobs dispatch "$q" >/dev/null 2>&1; fi; exit "$code"'
)
# the trainer's first step: a session and process group of its own (pid = pgid = sid), then the command itself;
# the pid is kept across exec, so the pid the wrapper records is the trainer's
_SETSID = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"
# set in a job's environment: its launcher holds the device lock, the trainer must not take it again
JOB_LOCK_ENV = "STUDIO_JOB_LOCKED"
FINAL_STATES = ("done", "failed", "cancelled")
ACTIVE_STATES = ("queued", "starting", "running", "cancelling")
QUEUE_FILE = (
    "queued.json"  # a job waiting for its device: how to start it (argv, device, nproc, threads, owner)
)
LOCK_DIR_ENV = "STUDIO_LOCK_DIR"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class DeviceBusy(StudioError):
    """The device a job needs runs another job (``holder``: that job's run folder)."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of one run as a job (everything read from its folder and ``/proc``).

    Attributes:
        state: ``created`` (never started as a job), ``queued`` (waiting for its device), ``starting``,
            ``running``, ``cancelling``, ``done``, ``failed`` or ``cancelled``.
        error: for ``failed``: the last error the job reported (or why it is considered failed).
        progress: the last ``progress`` event's data (``task``, ``done``, ``total``, ``epoch``, ``loss``).
        eta_s: seconds left for the current task, from the rate of this attempt's progress events.
        rss_mb: resident memory of the job's processes now (Linux), or the last one it reported.
        resumable: a checkpoint exists and the run did not finish.
        epochs: the number of epochs the training loop was asked for (from its status event).
        waiting_for: for ``queued``: the run folder of the job holding the device.
    """

    run: str
    name: str
    state: str
    command: list[str]
    device: str
    nproc: int
    pid: int | None
    started: float | None
    ended: float | None
    error: str | None
    progress: dict[str, Any] | None
    eta_s: float | None
    rss_mb: float | None
    gpu_mem_mb: float | None
    resumable: bool
    attempt: int
    epochs: int | None = None
    owner: str | None = None  # :func:`owner_id` of the browser session that started it; None: the CLI
    waiting_for: str | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _has_checkpoint(run: RunDir) -> bool:
    """Any flow's checkpoint (recovery's checkpoint.pt, P3B's and SPLoRA's own files)."""
    return run.has_checkpoint


# ------------------------------------------------------------------------------------------------ devices
def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def devices() -> list[str]:
    """Devices a job can be given: ``cpu`` and each visible GPU."""
    return ["cpu", *(f"cuda:{i}" for i in range(gpu_count()))]


def _job_devices(device: str, nproc: int) -> list[str]:
    """The devices a job occupies (the lock names)."""
    if device in ("", "auto"):
        device = "cuda:0" if gpu_count() else "cpu"
    if device == "cpu":
        return ["cpu"]
    if not device.startswith("cuda"):
        raise StudioError(f"Unknown device '{device}'. Use cpu, cuda or cuda:N.")
    first = int(device.partition(":")[2] or 0)
    n = gpu_count()
    if first + nproc > n:
        raise StudioError(
            f"{nproc} GPU(s) from {device} were asked for but {n} are visible. Pick fewer processes or cpu."
        )
    return [f"cuda:{first + i}" for i in range(nproc)]


# ------------------------------------------------------------------------------------------- processes
def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state is [0], start time is [19])."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    st = _proc_stat(pid)
    return int(st[19]) if st else None


def _reap(pid: int) -> int | None:
    """The exit code if ``pid`` is our child and has ended (reaping it), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        return None
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _read_exit_code(run: Path, since: float | None = None) -> int | None:
    """The exit code the wrapper recorded, if it was recorded after ``since`` (this attempt's start): the
    wrapper of a cancelled attempt can write its code late, after a resumed attempt has started."""
    f = run / EXIT_FILE
    try:
        if since is not None and f.stat().st_mtime < since - 1.0:
            return None
        return int(f.read_text().strip())
    except (OSError, ValueError):
        return None


def _wait_for_wrapper(job: dict[str, Any], timeout: float = 15.0) -> None:
    """Let an earlier attempt's wrapper record its exit code before a new attempt starts (so it cannot
    overwrite the new attempt's record afterwards)."""
    pid = job.get("wrapper_pid")
    end = time.time() + timeout
    while pid and _alive(pid, job.get("wrapper_start")) and time.time() < end:
        _reap(pid)
        time.sleep(0.1)


def _alive(pid: int | None, start_time: int | None = None) -> bool:
    """True if process ``pid`` runs (not a zombie, and the same process: its start time matches)."""
    if not pid:
        return False
    st = _proc_stat(pid)
    if st is not None:
        if st[0] in ("Z", "X"):
            return False
        return start_time is None or int(st[19]) == start_time
    if Path("/proc/self/stat").exists():  # Linux, and the process has no entry: gone
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _session_rss_mb(sid: int) -> float | None:
    """Resident memory of every process in session ``sid`` (a job and, under torchrun, its workers)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    page_kb = os.sysconf("SC_PAGE_SIZE") / 1024
    total_kb, found = 0.0, False
    for p in proc.iterdir():
        if not p.name.isdigit():
            continue
        st = _proc_stat(int(p.name))
        if st is None or st[3] != str(sid):  # [3] is the session id
            continue
        try:
            total_kb += int((p / "statm").read_text().split()[1]) * page_kb
            found = True
        except (OSError, IndexError, ValueError):
            continue
    return round(total_kb / 1024, 1) if found else None


# ------------------------------------------------------------------------------------------------- locks
def lock_dir(root: str | Path | None = None) -> Path:
    """Where device locks live: one folder per user on the machine, whatever folder the runs are in.

    ``$STUDIO_LOCK_DIR`` (tests, or several studios sharing devices on purpose), else
    ``$XDG_RUNTIME_DIR/pruning-studio/locks``, else ``<tmp>/pruning-studio-<uid>/locks``. Keyed by the device
    only: two jobs on one GPU collide even when their run folders have different parents. ``root`` is accepted
    for the callers that still pass their runs folder; it does not change the answer.
    """
    del root  # the lock is the device's, not the runs folder's
    if os.environ.get(LOCK_DIR_ENV):
        return Path(os.environ[LOCK_DIR_ENV])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir() and os.access(runtime, os.W_OK):
        return Path(runtime) / "pruning-studio" / "locks"
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"pruning-studio-{uid}" / "locks"


def _lock_folder() -> Path:
    """:func:`lock_dir`, created private to this user (a shared /tmp must not let others take or fake locks)."""
    folder = lock_dir()
    if not os.environ.get(LOCK_DIR_ENV):
        folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        owner = folder.parent.stat().st_uid
        if hasattr(os, "getuid") and owner != os.getuid():
            raise StudioError(
                f"The device-lock folder {folder.parent} belongs to another user; remove it, or set "
                f"${LOCK_DIR_ENV} to a folder of your own."
            )
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def _lock_path(folder: Path, device: str) -> Path:
    return folder / f"{device.replace(':', '_')}.lock"


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def device_holder(device: str, root: str | Path | None = None) -> dict[str, Any] | None:
    """The live job holding ``device`` on this machine (``{"run", "pid", ...}``), or None if it is free."""
    path = _lock_path(lock_dir(root), device)
    holder = _read_lock(path)
    if holder is None:
        return None
    return holder if _alive(holder.get("pid"), holder.get("pid_start")) else None


def _acquire(devs: Sequence[str], run: Path, folder: Path | None = None) -> list[Path]:
    """Take the lock of every device in ``devs`` for ``run``, held by this process (a job's launcher then writes
    its trainer's pid into them)."""
    folder = folder or _lock_folder()
    held: list[Path] = []
    me = {"run": str(run), "pid": os.getpid(), "pid_start": _start_time(os.getpid()), "time": time.time()}
    try:
        for dev in devs:
            path = _lock_path(folder, dev)
            for _ in range(3):
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    holder = _read_lock(path)
                    if holder is None and time.time() - path.stat().st_mtime < 5:
                        time.sleep(0.2)  # being written by another launcher right now
                        continue
                    if holder is not None and _alive(holder.get("pid"), holder.get("pid_start")):
                        raise DeviceBusy(
                            f"Device {dev} is busy: job {Path(holder['run']).name} (pid {holder['pid']}) runs "
                            "on it. Wait for it to finish, queue this one behind it, cancel it (Runs page, or "
                            f"python -m studio jobs cancel {holder['run']}), or pick another device.",
                            str(holder["run"]),
                        ) from None
                    path.unlink(missing_ok=True)  # stale: its job is gone
                    continue
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({**me, "device": dev}, f)
                held.append(path)
                break
            else:
                raise StudioError(f"Could not take the lock of device {dev} ({path}); try again.")
    except BaseException:
        for p in held:
            p.unlink(missing_ok=True)
        raise
    return held


@contextlib.contextmanager
def device_lock(device: str, run: str | Path) -> Iterator[None]:
    """Hold ``device``'s machine-wide lock while a training command runs in the foreground.

    A job's trainer does not take it (its launcher holds it in the trainer's name: ``$STUDIO_JOB_LOCKED``), nor do
    the ranks of a ``torchrun`` group started by hand (they share their devices by design).
    """
    if os.environ.get(JOB_LOCK_ENV) or os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        yield
        return
    locks = _acquire(_job_devices(device, 1), Path(run).resolve())
    try:
        yield
    finally:
        for p in locks:
            p.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------------- start
def _command(argv: Sequence[str], device: str, nproc: int) -> list[str]:
    args = list(argv)
    if "--device" not in args:
        args += ["--device", device if nproc == 1 else device.partition(":")[0]]
    if nproc == 1:
        return [sys.executable, "-m", "studio", *args]
    # torchrun's argparse reads a later --run as an abbreviation of its own --run-path and stops
    args = ["--run-dir" if a == "--run" else a for a in args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "studio",
        *args,
    ]


def start_job(
    argv: Sequence[str],
    run_dir: str | Path,
    *,
    device: str = "cpu",
    nproc: int = 1,
    threads: int | None = None,
    env: Mapping[str, str] | None = None,
    owner: str | None = None,
) -> JobStatus:
    """Start ``python -m studio *argv`` in the background on ``run_dir`` and return its first status.

    Args:
        argv: the command after ``python -m studio`` (it must write into ``run_dir``: ``--out``/``--run``).
        device: ``cpu``, ``cuda`` or ``cuda:N`` (appended as ``--device`` unless ``argv`` has one).
        nproc: processes under torchrun (GPUs from ``device`` on; with ``cpu``: gloo processes).
        threads: ``OMP_NUM_THREADS`` of each process (default: inherited, else cores / nproc).
        env: extra environment variables.
        owner: the :func:`owner_id` recorded in ``job.json`` (None: a CLI job, owned by the local user).

    Raises:
        StudioError: the run is already running, or its device is busy with another job.
    """
    if nproc < 1:
        raise StudioError("A job needs at least one process.")
    run = RunDir(Path(run_dir).resolve())
    current = job_status(run.path) if (run.path / JOB_FILE).exists() else None
    if current is not None and current.active:
        raise StudioError(f"Run {run.path.name} is already running (pid {current.pid}); cancel it first.")
    devs = _job_devices(device, nproc)
    launch_device = devs[0] if nproc == 1 else ("cuda" if devs[0] != "cpu" else "cpu")
    cmd = _command(argv, launch_device, nproc)
    run.path.mkdir(parents=True, exist_ok=True)
    if (run.path / JOB_FILE).exists():
        _wait_for_wrapper(_job(run.path))
    locks = _acquire(devs, run.path)
    _sweep_leftovers(run.path)
    # the thread policy (studio.threads): the cores left by the server (when it runs) and the running jobs
    running = [
        int(_job(Path(j.run)).get("threads") or 1) * int(_job(Path(j.run)).get("nproc") or 1)
        for j in list_jobs(run.path.parent)
        if j.state in ("starting", "running") and Path(j.run) != run.path
    ]
    n_threads = job_threads(running, server=os.environ.get(SERVER_ENV) == "1", nproc=nproc, asked=threads)
    job_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    job_env.update(
        OMP_NUM_THREADS=str(n_threads),
        MKL_NUM_THREADS=str(n_threads),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        **{JOB_LOCK_ENV: "1", "STUDIO_DISPATCH_ROOT": str(run.path.parent), "STUDIO_PYTHON": sys.executable},
        **dict(env or {}),
    )
    if nproc > 1 and devs[0] != "cpu":  # torchrun's workers take GPUs 0..N-1: make those the locked ones
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        index = [int(d.partition(":")[2]) for d in devs]
        job_env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] if visible else str(i) for i in index)
    attempt = (current.attempt if current is not None else 0) + 1
    try:
        with (
            open(run.path / STDOUT, "ab") as out,
            open(run.path / STDERR, "ab") as err,
        ):
            err.write(
                f"=== attempt {attempt} at {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n".encode()
            )
            err.flush()
            run.set_status("starting", attempt=attempt)
            (run.path / EXIT_FILE).unlink(missing_ok=True)
            (run.path / PID_FILE).unlink(missing_ok=True)  # an earlier attempt's trainer
            wrapped = (
                [
                    "/bin/sh",
                    "-c",
                    _WRAPPER,
                    str(run.path / EXIT_FILE),
                    str(run.path / PID_FILE),
                    sys.executable,
                    "-c",
                    _SETSID,
                    *cmd,
                ]
                if os.name == "posix"
                else cmd
            )
            proc = subprocess.Popen(
                wrapped,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=job_env,
                start_new_session=True,
            )
    except BaseException:
        for p in locks:
            p.unlink(missing_ok=True)
        raise
    pid = _trainer_pid(proc, run.path / PID_FILE) if os.name == "posix" else proc.pid
    pid_start = _start_time(pid)
    job = {
        "command": list(argv),
        "cmd": cmd,
        "pid": pid,  # the trainer: its own session and process group (pgid == pid)
        "pid_start": pid_start,
        "pgid": pid,
        "wrapper_pid": proc.pid,  # the shell that waits for it and records its exit code
        "wrapper_start": _start_time(proc.pid),
        "device": devs[0] if nproc == 1 else ",".join(devs),
        "devices": devs,
        "nproc": nproc,
        "threads": n_threads,
        "started": time.time(),
        "attempt": attempt,
        "locks": [str(p) for p in locks],
        "owner": owner,
    }
    write_json(run.path / JOB_FILE, job)
    (run.path / QUEUE_FILE).unlink(missing_ok=True)
    if os.name != "posix":
        write_text(run.path / PID_FILE, f"{pid}\n")
    for p in locks:
        write_json(
            p,
            {
                "run": str(run.path),
                "pid": pid,
                "pid_start": pid_start,
                "time": time.time(),
                "device": p.stem,
            },
        )
    return job_status(run.path)


def _sweep_leftovers(run: Path) -> None:
    """Remove what a killed attempt left half-written: atomic writes' temporary files (``.NAME.*.tmp``) and export
    staging folders (``.export.*``). Called with the run's device locked and no trainer alive, so nothing is
    writing them; the files they were to replace are whole (written by rename only)."""
    for p in run.glob(".*"):
        with contextlib.suppress(OSError):
            if p.is_file() and p.name.endswith(".tmp"):
                p.unlink()
            elif p.is_dir() and p.name.startswith(".export."):
                shutil.rmtree(p)


def _trainer_pid(proc: subprocess.Popen, pid_file: Path, timeout: float = 10.0) -> int:
    """The trainer's pid, as the wrapper writes it to ``job.pid`` a moment after it starts (its own pid if the
    wrapper ended first or never wrote it)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        with contextlib.suppress(OSError, ValueError):
            return int(pid_file.read_text().strip())  # empty while the wrapper is writing it
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    return proc.pid


def submit(
    spec: Spec,
    run_dir: str | Path,
    *,
    device: str = "cpu",
    nproc: int = 1,
    threads: int | None = None,
    env: Mapping[str, str] | None = None,
    owner: str | None = None,
    queue: bool = False,
) -> JobStatus:
    """Validate ``spec``, write it as the new run folder's ``spec.json`` and start ``python -m studio run RUN``.

    The one way work becomes a job: nothing builds command-line arguments from a spec. A refused spec (bad
    combination, busy device) raises :class:`StudioError` and leaves no run folder behind. ``owner`` is the
    starting browser session's token (only its digest is stored; see the module docstring), None from the CLI.
    ``queue``: on a busy device, wait for it instead of refusing: the job is ``queued`` and starts when the
    jobs before it on that device have ended (:func:`dispatch`, run by each job's launcher as it exits).
    """
    run = Path(run_dir).resolve()
    spec.validate()
    _job_devices(device, nproc)  # an unknown device is refused before the folder exists
    fresh = not run.exists()
    create_run(spec, run)
    how = {
        "argv": ["run", str(run)],
        "device": device,
        "nproc": nproc,
        "threads": threads,
        "env": dict(env or {}),
        "owner": None if owner is None else owner_id(owner),
    }
    try:
        return _start_queued(run, how)
    except DeviceBusy as e:
        if not queue:
            if fresh:
                shutil.rmtree(run, ignore_errors=True)
            raise
        write_json(run / QUEUE_FILE, {**how, "queued_at": time.time(), "behind": e.holder})
        RunDir(run).set_status("queued", behind=e.holder)
        return job_status(run)
    except StudioError:
        if fresh:
            shutil.rmtree(run, ignore_errors=True)
        raise


def _start_queued(run: Path, how: Mapping[str, Any]) -> JobStatus:
    return start_job(
        list(how["argv"]),
        run,
        device=str(how["device"]),
        nproc=int(how["nproc"]),
        threads=how.get("threads"),
        env=how.get("env") or None,
        owner=how.get("owner"),
    )


def dispatch(root: str | Path) -> list[str]:
    """Start the queued jobs under ``root`` whose device is free, oldest first; returns the runs started.

    Each job's launcher runs this as its trainer exits (``python -m studio jobs dispatch ROOT``), so a queue
    moves on without the studio open; a page following a queued job runs it too. A queued job that can no
    longer start (its spec or device went away) is marked failed with the reason.
    """
    root = Path(root)
    queued = []
    for f in root.glob(f"*/{QUEUE_FILE}"):
        try:
            queued.append((float(read_json(f).get("queued_at", 0)), f.parent))
        except StudioError:
            continue
    started = []
    for _, run in sorted(queued):
        try:
            how = read_json(run / QUEUE_FILE)
            _start_queued(run, how)
            started.append(run.name)
        except DeviceBusy:
            continue  # still busy: it keeps its place
        except (StudioError, OSError) as e:
            (run / QUEUE_FILE).unlink(missing_ok=True)
            RunDir(run).set_status("failed", error=f"the queued job could not start: {e}")
    return started


# ------------------------------------------------------------------------------------------------- status
def _job(run: Path) -> dict[str, Any]:
    path = run / JOB_FILE
    if not path.exists():
        return {}
    try:
        return dict(read_json(path))
    except StudioError:
        return {}


def tail(path: Path, n: int = 50, max_bytes: int = 64_000) -> list[str]:
    """The last ``n`` lines of a text file (reading at most ``max_bytes`` from its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = [ln.rstrip() for ln in data.replace("\r", "\n").split("\n")]
    return [ln for ln in lines if ln.strip()][-n:]


def recent_events(run_dir: str | Path, max_bytes: int = 256_000) -> list[dict[str, Any]]:
    """The events at the end of ``events.jsonl`` (at most ``max_bytes`` of it): a status poll stays cheap."""
    path = RunDir(Path(run_dir)).events_file
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []
    if size > max_bytes:
        lines = lines[1:]  # the first line is cut
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return out


def last_error(run_dir: str | Path) -> str | None:
    """The most telling error line of a job: the CLI's ``error: ...``, else the end of a traceback."""
    run = Path(run_dir)
    lines = tail(run / STDERR, 200)
    for ln in reversed(lines):
        if ln.startswith("=== attempt"):
            break
        if ln.startswith("error:"):
            return ln.removeprefix("error:").strip()
    for ln in reversed(lines):
        if ln.startswith("=== attempt"):
            break
        if ln.startswith(("Traceback", " ")) or "%|" in ln:
            continue  # traceback frames and progress bars
        if ln.split(":", 1)[0].endswith(("Error", "Exception", "Interrupt")) or ln.startswith("cancelled"):
            return ln
    for ev in reversed([e for e in recent_events(run) if e.get("kind") == "log"][-20:]):
        msg = str(ev.get("data", {}).get("message", ""))
        if "error" in msg.lower():
            return msg
    return None


def _progress(events: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, float | None, dict[str, Any]]:
    """(last progress data, ETA seconds, facts: the training status event's device/epochs + last resources)."""
    start, training = 0, {}
    for i, ev in enumerate(events):
        if ev.get("kind") == "status" and ev.get("data", {}).get("state") == "training":
            start, training = i, ev["data"]
    prog = [ev for ev in events[start:] if ev.get("kind") == "progress"]
    res = {**training, **next((ev["data"] for ev in reversed(events) if ev.get("kind") == "resource"), {})}
    if not prog:
        return None, None, res
    last = prog[-1]["data"]
    same = [ev for ev in prog if ev["data"].get("task") == last.get("task")]
    eta = None
    if len(same) >= 2:
        d0, d1 = same[0]["data"].get("done", 0), last.get("done", 0)
        dt = same[-1]["time"] - same[0]["time"]
        if d1 > d0 and dt > 0:
            eta = max(0.0, (last.get("total", d1) - d1) * dt / (d1 - d0))
    return last, eta, res


def job_status(run_dir: str | Path) -> JobStatus:
    """The state of a run started as a job (or of any run folder), with progress, ETA and memory."""
    run = RunDir(Path(run_dir).resolve())
    job = _job(run.path)
    try:
        status = run.status()
    except StudioError:
        status = {"state": "created"}
    reported = str(status.get("state", "created"))
    # a run started from a shell has no job.json, but the retrain command records its pid in status.json
    pid = job.get("pid") or (status.get("pid") if reported in ACTIVE_STATES else None)
    # the start time tells a pid reused by another process from the trainer (status.json records it too)
    alive = _alive(pid, job.get("pid_start") if job.get("pid") else status.get("pid_start"))
    unwritable = False
    exit_code = job.get("exit_code")
    if pid and not alive and exit_code is None and job:
        exit_code = _read_exit_code(run.path, job.get("started"))
        # the wrapper's own status when we are its parent (frees the zombie); job.json files older than the
        # trainer's own pid named the wrapper as "pid"
        reaped = _reap(int(job.get("wrapper_pid") or pid))
        exit_code = exit_code if exit_code is not None else reaped
        if exit_code is not None:
            job.update(exit_code=exit_code, ended=time.time())
            try:
                write_json(run.path / JOB_FILE, job)
            except OSError:
                unwritable = True  # a read-only folder must not break the status poll (nor the Runs page)
    error = None
    queued = (run.path / QUEUE_FILE).exists() and not alive
    if queued:
        state = "queued"
    elif alive:
        state = "cancelling" if run.cancel_file.exists() else "running"
    elif reported in FINAL_STATES:
        state = reported
        error = status.get("error") if state == "failed" else None
    elif exit_code == 0 or (exit_code is None and run.results_file.exists()):
        state = "done"  # a command that writes no status.json of its own
    elif exit_code == 130:
        state = "cancelled"
    elif not pid:  # a folder written by a foreground command, or prepared and never started
        state = reported
    else:
        state = "failed"
        why = last_error(run.path)
        signum = -exit_code if exit_code is not None and exit_code < 0 else None
        if exit_code is not None and exit_code > 128:
            signum = exit_code - 128
        if signum is not None:
            name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
            ended = f"the job was killed by {name}"
        else:
            ended = (
                f"the job exited with code {exit_code}"
                if exit_code is not None
                else f"the job's process (pid {pid}) is gone without reporting an end (killed or crashed)"
            )
        if reported in ACTIVE_STATES:  # it never recorded its end: often a folder that turned unwritable
            unwritable = unwritable or not os.access(run.path, os.W_OK)
            ended += f"; its status.json still said '{reported}'" + (
                " (its run folder is not writable)" if unwritable else ""
            )
        error = f"{ended}; last error: {why}" if why else ended
    if state == "failed" and not error:
        error = last_error(run.path) or "the job failed without an error message (see its stderr log)"
    events = recent_events(run.path)
    prog, eta, res = _progress(events)
    rss = _session_rss_mb(int(job.get("pgid") or pid)) if alive and pid else None
    return JobStatus(
        run=str(run.path),
        name=run.path.name,
        state=state,
        command=list(job.get("command", [])),
        device=str(
            job.get("device") or res.get("device") or (_queued_how(run.path).get("device") if queued else "")
        ),
        nproc=int(job.get("nproc", 1)),
        pid=pid,
        started=job.get("started"),
        ended=None if alive or queued else job.get("ended") or status.get("time"),
        error=error,
        progress=prog,
        eta_s=eta if alive else None,
        rss_mb=rss if rss is not None else res.get("rss_mb"),
        gpu_mem_mb=res.get("gpu_mem_mb"),
        epochs=res.get("epochs"),
        resumable=state in ("cancelled", "failed") and _has_checkpoint(run),
        attempt=int(job.get("attempt", 0)),
        owner=_queue_owner(run.path, job),
        waiting_for=_waiting_for(run.path) if queued else None,
    )


def _queued_how(run: Path) -> dict[str, Any]:
    """A queued job's ``queued.json`` (how to start it), or {} when there is none."""
    try:
        return dict(read_json(run / QUEUE_FILE)) if (run / QUEUE_FILE).exists() else {}
    except StudioError:
        return {}


def _queue_owner(run: Path, job: Mapping[str, Any]) -> str | None:
    owner = job.get("owner") or _queued_how(run).get("owner")  # a queued job has no job.json yet
    return owner if isinstance(owner, str) else None


def _waiting_for(run: Path) -> str | None:
    """The run holding the device a queued job waits for (the live lock holder), else the one it queued behind."""
    how = _queued_how(run)
    if not how:
        return None
    for dev in _job_devices(str(how.get("device", "cpu")), int(how.get("nproc", 1))):
        holder = device_holder(dev)
        if holder is not None:
            return str(holder.get("run"))
    return how.get("behind")


def list_jobs(root: str | Path) -> list[JobStatus]:
    """Every run under ``root`` (started as a job or not), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if (
            not p.is_dir()
            or p.name.startswith(".")
            or not ((p / JOB_FILE).exists() or (p / "spec.json").exists())
        ):
            continue
        try:
            out.append(job_status(p))
        except StudioError:
            continue  # a folder name that is not a run name
    return sorted(out, key=lambda s: s.started or Path(s.run).stat().st_mtime, reverse=True)


# ------------------------------------------------------------------------------------- cancel and resume
def owner_id(token: str) -> str:
    """What ``job.json`` records of a browser session's token: its SHA-256 digest (the token itself, which
    grants cancel and resume, is never written to disk)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def owned_by(status: JobStatus, token: str | None) -> bool:
    """Whether the holder of ``token`` may cancel or resume the job: its browser session started it. ``None`` is
    the CLI (the local user), which may act on any job."""
    return token is None or (status.owner is not None and hmac.compare_digest(status.owner, owner_id(token)))


def _check_owner(status: JobStatus, token: str | None, action: str) -> None:
    if not owned_by(status, token):
        who = "another browser session" if status.owner else "the command line"
        raise StudioError(
            f"Run {status.name} was started from {who}, so only it can {action} it here; from a shell on the "
            f"server: python -m studio jobs {action} {status.run}."
        )


def cancel_job(run_dir: str | Path, *, force: bool = False, owner: str | None = None) -> JobStatus:
    """Ask a job to stop: create its ``CANCEL`` file (checkpoint + clean stop); ``force`` also sends SIGTERM.

    SIGTERM goes to the job's whole process group (torchrun and its workers); the retrain command turns it
    into the same clean stop, other commands end at once. ``owner``: the browser session's token (the UI);
    a job started by another session (or the CLI) is refused. None (the CLI) may cancel any job.
    """
    run = RunDir(Path(run_dir).resolve())
    st = job_status(run.path)
    _check_owner(st, owner, "cancel")
    if not st.active:
        raise StudioError(f"Run {run.path.name} is not running (it is {st.state}); nothing to cancel.")
    if st.state == "queued":  # it never started: take it out of the queue
        (run.path / QUEUE_FILE).unlink(missing_ok=True)
        run.set_status("cancelled", reason="cancelled while queued")
        return job_status(run.path)
    write_text(run.cancel_file, f"cancel requested at {time.time()}\n")
    if force and st.pid:
        _terminate(int(_job(run.path).get("pgid") or st.pid), int(st.pid))
    return job_status(run.path)


def _terminate(pgid: int, pid: int) -> None:
    """SIGTERM to the trainer's process group (torchrun and its workers); to the trainer alone in the few
    milliseconds before it has made its group (then the CANCEL file, already written, stops it as well)."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def resume_job(
    run_dir: str | Path,
    *,
    device: str | None = None,
    nproc: int | None = None,
    threads: int | None = None,
    owner: str | None = None,
) -> JobStatus:
    """Run a cancelled or failed job's command again with ``--resume`` (same device unless given, same owner).

    ``owner`` as for :func:`cancel_job`: the UI passes its session's token, the CLI none."""
    run = RunDir(Path(run_dir).resolve())
    job = _job(run.path)
    if not job.get("command"):
        raise StudioError(f"Run {run.path.name} was not started as a job: resume it with its CLI command.")
    st = job_status(run.path)
    _check_owner(st, owner, "resume")
    if st.active:
        raise StudioError(f"Run {run.path.name} is still running.")
    if st.state == "done":
        raise StudioError(f"Run {run.path.name} finished; start a new run instead of resuming it.")
    argv = list(job["command"])
    if "--resume" not in argv:
        argv.append("--resume")  # a spec run: ``run RUN --resume``
    devs = job.get("devices") or ["cpu"]
    return start_job(
        argv,
        run.path,
        device=device or devs[0],
        nproc=nproc or int(job.get("nproc", 1)),
        threads=threads or job.get("threads"),
        owner=job.get("owner"),  # a resumed attempt stays its session's
    )


def read_log(run_dir: str | Path, stream: str = "stderr", lines: int = 200) -> str:
    """The end of a job's ``stderr.log`` or ``stdout.log``."""
    if stream not in ("stderr", "stdout"):
        raise StudioError(f"Log stream must be stderr or stdout, not '{stream}'.")
    return "\n".join(tail(Path(run_dir) / (STDERR if stream == "stderr" else STDOUT), lines, 256_000))


def curves(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """What a job's charts draw: ``steps`` (step, epoch, loss) and ``epochs`` (the per-epoch records)."""
    events = RunDir(Path(run_dir)).events()
    steps = [
        {"step": ev["data"]["done"], "epoch": ev["data"].get("epoch"), "loss": ev["data"]["loss"]}
        for ev in events
        if ev.get("kind") == "progress" and ev.get("data", {}).get("task") == "train" and "loss" in ev["data"]
    ]
    epochs: dict[int, dict[str, Any]] = {}
    for ev in events:
        d = ev.get("data", {})
        if ev.get("kind") == "metric" and "epoch" in d and "train_loss" in d:
            epochs[int(d["epoch"])] = d  # a resumed run repeats no epoch, but keep the latest if it does
    return {"steps": steps, "epochs": [epochs[k] for k in sorted(epochs)]}


# ------------------------------------------------------------------------------------------- run history
def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """One row of the run history: kind, method, budget, accuracy, params, MACs, throughput, status."""
    run = RunDir(Path(run_dir))
    try:
        spec = run.spec() if run.spec_file.exists() else {}
    except StudioError:
        spec = {}
    try:
        res = run.results() or {}
    except StudioError:
        res = {}
    st = job_status(run.path)
    after = res.get("after") or {}
    summary = res.get("summary") or {}
    params = spec.get("params") or {}
    budget = None
    if params.get("target_macs") is not None:
        budget = f"MACs ≤ {float(params['target_macs']):.0%}"
    elif params.get("ratio") is not None:
        budget = f"ratio {float(params['ratio']):g}"
    elif summary.get("macs_fraction") is not None:
        budget = f"MACs {float(summary['macs_fraction']):.0%}"
    tput = after.get("throughput") or {}
    big = max(tput, key=lambda k: int(k), default=None) if tput else None
    kind = spec.get("kind") or (st.command[0] if st.command else "run")
    return {
        "run": run.path.name,
        "kind": kind,
        "method": res.get("method") or spec.get("method") or "",
        "budget": budget,
        "top1": after.get("top1", res.get("top1")),
        "params": after.get("params"),
        "macs": after.get("macs"),
        "throughput": tput[big]["images_per_s"] if big is not None else None,
        "throughput_bs": int(big) if big is not None else None,
        "status": st.state,
        "error": st.error,
        "started": st.started or run.path.stat().st_mtime,
        "path": str(run.path),
        "has_plan": run.plan_file.exists() or bool(summary),
        "has_export": (run.export_dir / "manifest.json").exists(),
        "owner": st.owner,  # owner_id of the browser session that started it (None: the CLI, or not a job)
    }


def run_plan(run_dir: str | Path) -> Any:
    """The :class:`~studio.plan.PrunePlan` of a run (its ``plan.json``, else its export's), or None."""

    run = RunDir(Path(run_dir))
    if run.plan_file.exists():
        return PrunePlan.load(run.plan_file)
    manifest = run.export_dir / "manifest.json"
    if manifest.exists():
        plan = read_json(manifest).get("plan")
        return None if plan is None else PrunePlan.from_dict(plan)
    return None


def run_table(root: str | Path) -> list[dict[str, Any]]:
    """:func:`run_summary` of every run under ``root``, newest first."""
    return [run_summary(s.run) for s in list_jobs(root)]


def exports(root: str | Path) -> list[dict[str, Any]]:
    """Finished runs with an exported model (what the retrain page offers), newest first."""
    return [r for r in run_table(root) if r["has_export"]]
