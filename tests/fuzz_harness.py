"""Run `megatron-ext <argv>` in a forked child with a time bound and a memory bound, for the fuzz tests of hostile
inputs (issue 30): every generated case must end cleanly, fast and small.

    from fuzz_harness import run_cli_bounded, assert_clean_ending   # tests/ is on sys.path, as for train_checks
    outcome = run_cli_bounded(["train", "--config", str(path)], cwd=tmp_path, seconds=20, memory_mb=2048)
    assert_clean_ending(outcome, "train")

Each case is a fork of a zygote: a fresh `python` started once per test session (on the first call), with one
OpenMP/MKL thread, that does the heavy imports (megatron_ext.cli's parser, torch, megatron-core, the training/eval/
convert/preprocess code) and nothing else, and serves the cases over a pipe. A case costs milliseconds, not a torch
import, and it does not depend on what the test process did before: forking the pytest process itself once made the
cases segfault (exit -11 in megatron's gloo group creation) after a test module had run a gloo world in it (the
`single_rank` fixture): a fork copies one thread of a process whose gloo and OpenMP threads hold locks and state the
child then uses. The zygote never starts a thread (zygote_threads() tells), so each fork is a whole process.
So a monkeypatch in the test process does not reach a case: `patch` replaces functions in the child instead.
In the child, before megatron_ext.cli.main(argv) runs:
- the environment is the test process's at the call (os.environ then) plus `env`, and the working directory `cwd`
  (the test process's when None);
- RLIMIT_AS caps the address space at what the zygote had mapped when it forked plus `memory_mb` (a torch process
  already maps a few GiB of address space it never touches; the bound is on what the case adds);
- stdout and stderr (the file descriptors, so C-level output too) go to temporary files, read back by the zygote;
- logging is reset to what a fresh process has, so the command's own log lines reach stderr as they would;
- an uncaught exception prints its traceback to the captured stderr and exits 1, as Python would; a MemoryError
  (or torch's "can't allocate memory") is reported as over_memory.
The zygote kills the child (SIGKILL to its process group) when `seconds` pass: timed_out.

`stop_before` replaces functions in the child with one that ends the case with exit 0 and `reached` set: a fuzz
of `train` checks everything the command checks before any work, and stops where the training itself would begin.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import json
import os
import pickle
import resource
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback

# imported once in the parent (before the first fork): what the commands import when they run
PRELOAD = (
    "megatron_ext.cli",
    "megatron_ext.config",
    "megatron_ext.training.cli",
    "megatron_ext.training.start",
    "megatron_ext.training.train",
    "megatron_ext.eval.cli",
    "megatron_ext.convert.cli",
    "megatron_ext.data.cli",
    "megatron_ext.launch.cli",
    "megatron_ext.launch.workload",
)

MEMORY_EXIT = 86  # the child's exit code for "ran out of its address space" (a MemoryError reached the top)
ALLOCATION_FAILURES = ("MemoryError", "can't allocate memory", "std::bad_alloc", "Cannot allocate memory")


@dataclasses.dataclass
class Outcome:
    """How one bounded run of the CLI ended."""

    argv: list[str]
    exit_code: int | None  # None when killed for the time bound; -N when killed by signal N
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool
    over_memory: bool
    reached: str | None = None  # the stop_before function the run got to (it did no work past that point)

    def describe(self) -> str:
        tail = "\n".join(self.stderr.splitlines()[-15:])
        return (f"megatron-ext {' '.join(self.argv)}: exit {self.exit_code} in {self.seconds:.2f} s "
                f"(timed_out={self.timed_out}, over_memory={self.over_memory}, reached={self.reached})\n"
                f"--- stderr (last lines) ---\n{tail}\n--- stdout (last 2000 chars) ---\n{self.stdout[-2000:]}")


class _ReachedWork(BaseException):
    """Raised in the child by a stop_before stand-in: the command got to the work, having checked everything."""


def preload(modules=PRELOAD) -> None:
    """Import `modules` in the zygote (starting it), once, so that forked cases start with them loaded."""
    _zygote().ask(dict(op="preload", modules=list(modules)))


def zygote_threads() -> int:
    """The number of threads of the zygote (the process each case is forked from): 1, or a fork is not safe."""
    return _zygote().ask(dict(op="threads"))


def run_cli_bounded(argv, *, cwd=None, seconds: float = 20, memory_mb: int = 2048, stop_before=(),
                    env: dict | None = None, preload_modules=PRELOAD, patch: dict | None = None) -> Outcome:
    """Run megatron_ext.cli.main(argv) in a child forked from the zygote, bounded by `seconds` (wall clock) and
    `memory_mb` (address space beyond the zygote's at the fork); return how it ended.

    stop_before: "module:function" names replaced in the child by a stand-in that stops the run with exit 0 and
    Outcome.reached = that name (e.g. "megatron_ext.training.train:train"). env: variables set in the child only.
    patch: {"module:function": "module:function"}: the first replaced in the child by the second (what a
    monkeypatch of the test process did when cases were forks of it; the stand-in's module must be importable).
    """
    argv = [str(a) for a in argv]
    request = dict(op="run", argv=argv, cwd=str(cwd) if cwd is not None else os.getcwd(), seconds=float(seconds),
                   memory_mb=int(memory_mb), stop_before=list(stop_before), patch=dict(patch or {}),
                   environ={**os.environ, **{k: str(v) for k, v in (env or {}).items()}},
                   preload=list(preload_modules) + [name.split(":")[0] for name in (*stop_before, *(patch or {}))])
    ended = _zygote().ask(request, wait=float(seconds) + 120)
    return Outcome(argv=argv, **ended)


class _Zygote:
    """The parent's side of the zygote: a `python` process serving length-prefixed pickled requests on its stdin
    and answering on its stdout; its own log (import warnings, crashes) goes to a file, quoted when it fails."""

    def __init__(self):
        self.log = tempfile.NamedTemporaryFile(prefix="fuzz_harness_zygote_", suffix=".log", delete=False)
        boot = ("import json, os, sys; sys.path[:] = json.loads(os.environ.pop('FUZZ_HARNESS_SYS_PATH')); "
                "import fuzz_harness; fuzz_harness._serve()")
        environ = dict(os.environ, FUZZ_HARNESS_SYS_PATH=json.dumps([os.path.dirname(__file__), *sys.path]),
                       OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        # its own session: a Ctrl-C of the tests reaches the test process, which then ends the zygote
        self.process = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, env=environ, start_new_session=True)

    def ask(self, request: dict, wait: float = 600):
        try:
            _send(self.process.stdin.fileno(), request)
            answer = _receive(self.process.stdout.fileno(), deadline=time.monotonic() + wait)
        except BaseException as error:  # a dead or stuck zygote, or an interrupt between request and answer
            self.close()  # (its answers would be out of step with the requests)
            if isinstance(error, KeyboardInterrupt):
                raise
            raise RuntimeError(f"fuzz harness zygote failed ({error!r}); its log:\n{self.log_tail()}") from error
        if answer["error"] is not None:
            raise RuntimeError(f"fuzz harness zygote: {request['op']} failed:\n{answer['error']}")
        return answer["value"]

    def log_tail(self) -> str:
        with open(self.log.name, "rb") as f:
            return f.read().decode("utf-8", "replace")[-4000:]

    def close(self) -> None:
        global _running
        if _running is self:
            _running = None
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.log.close()
        os.unlink(self.log.name)


_running: _Zygote | None = None


def _zygote() -> _Zygote:
    global _running
    if _running is None or _running.process.poll() is not None:
        _running = _Zygote()
        atexit.register(_running.close)
    return _running


def _send(fd: int, message) -> None:
    data = pickle.dumps(message)
    view = memoryview(struct.pack("!Q", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _receive(fd: int, deadline: float | None = None):
    (size,) = struct.unpack("!Q", _read_exactly(fd, 8, deadline))
    return pickle.loads(_read_exactly(fd, size, deadline))


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes:
    chunks, left = [], size
    while left:
        if deadline is not None:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("no answer in time")
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the pipe closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _serve() -> None:
    """The zygote's loop: requests on fd 0, answers on fd 1 (both moved aside first, so that nothing an import
    prints can mix with the answers, and no child holds them open)."""
    requests, answers = os.dup(0), os.dup(1)
    os.set_inheritable(requests, False)
    os.set_inheritable(answers, False)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    imported: set[str] = set()
    while True:
        try:
            request = _receive(requests)
        except EOFError:
            os._exit(0)  # the test process ended
        value, error = None, None
        try:
            _import(request.get("modules", ()) if request["op"] == "preload" else request.get("preload", ()), imported)
            if request["op"] == "threads":
                value = len(os.listdir("/proc/self/task"))
            elif request["op"] == "run":
                value = _run_one(requests, answers, **{k: v for k, v in request.items() if k not in ("op", "preload")})
        except Exception:
            error = traceback.format_exc()
        _send(answers, dict(value=value, error=error))


def _import(modules, imported: set) -> None:
    import warnings

    for name in modules:
        if name not in imported:
            with warnings.catch_warnings():  # megatron-core's notes that TE/apex are missing, once per module
                warnings.simplefilter("ignore")
                importlib.import_module(name)
            imported.add(name)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)  # as the tests' conftest has it; no thread pool is started here


def _run_one(requests, answers, argv, cwd, seconds, memory_mb, stop_before, patch, environ) -> dict:
    with tempfile.TemporaryDirectory(prefix="fuzz_harness_") as scratch:
        out_path, err_path, note_path = (os.path.join(scratch, n) for n in ("stdout", "stderr", "note"))
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(requests)
            os.close(answers)
            _child(argv, cwd, seconds, memory_mb, tuple(stop_before), patch, environ, out_path, err_path, note_path)
        try:
            os.setpgid(pid, pid)  # also here (whichever runs first): the group exists before any kill
        except OSError:
            pass
        status, timed_out = _wait(pid, seconds)
        elapsed = time.monotonic() - start
        stdout, stderr, note = (_read(p) for p in (out_path, err_path, note_path))
    if timed_out:
        code = None
    elif os.WIFSIGNALED(status):
        code = -os.WTERMSIG(status)
    else:
        code = os.WEXITSTATUS(status)
    over_memory = code == MEMORY_EXIT and note.startswith("over_memory")
    if code == 1 and any(marker in stderr for marker in ALLOCATION_FAILURES):
        over_memory = True  # an allocation failure turned into another exception on its way up
    reached = note[len("reached "):].strip() if note.startswith("reached ") else None
    return dict(exit_code=code, stdout=stdout, stderr=stderr, seconds=elapsed, timed_out=timed_out,
                over_memory=over_memory, reached=reached)


def assert_clean_ending(outcome: Outcome, command: str) -> None:
    """A clean ending: exit 0 (success, or stopped before the work by stop_before), or exit 2 whose last stderr
    line is the one-line error `megatron-ext <command>: ...`; never a traceback, a timeout, a memory blow-up, a
    signal or another exit code. Lines before the error are the command's own log lines (INFO notes, warnings)
    and may not themselves be errors of ours."""
    assert not outcome.timed_out, f"timed out:\n{outcome.describe()}"
    assert not outcome.over_memory, f"over the memory bound:\n{outcome.describe()}"
    assert "Traceback (most recent call last)" not in outcome.stderr, f"traceback:\n{outcome.describe()}"
    assert outcome.exit_code in (0, 2), f"exit code {outcome.exit_code}:\n{outcome.describe()}"
    if outcome.exit_code == 2:
        lines = [line for line in outcome.stderr.splitlines() if line.strip()]
        prefix = f"megatron-ext {command}: "
        assert lines and lines[-1].startswith(prefix), f"exit 2 without a one-line error:\n{outcome.describe()}"
        errors = [line for line in lines if line.startswith("megatron-ext")]
        assert len(errors) == 1, f"more than one error line:\n{outcome.describe()}"
        assert len(lines[-1]) > len(prefix) + 10, f"an empty error message:\n{outcome.describe()}"


def _wait(pid: int, seconds: float) -> tuple[int, bool]:
    """(the child's wait status, whether it was killed for running past `seconds`)."""
    deadline = time.monotonic() + seconds
    delay = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            try:
                os.killpg(pid, signal.SIGKILL)  # anything the command started and left behind
            except (ProcessLookupError, PermissionError):
                pass
            return status, False
        if time.monotonic() >= deadline:
            try:
                os.killpg(pid, signal.SIGKILL)  # the child and anything it started
            except (ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return status, True
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _address_space() -> int:
    """Bytes of address space this process has mapped now (VmSize)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(argv, cwd, seconds, memory_mb, stop_before, patch, environ, out_path, err_path, note_path) -> None:
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: the parent's kill reaches whatever the command starts
        out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
        sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr
        _fresh_process_state()
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        for name in stop_before:
            _install_stop(name, note_path)
        for name, stand_in in patch.items():
            _install_patch(name, stand_in)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(seconds) + 2)  # a second bound, should the parent die
        limit = _address_space() + int(memory_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        import megatron_ext.cli

        try:
            code = megatron_ext.cli.main(list(argv))
        except SystemExit as exit_:
            code = _exit_code(exit_.code)
        code = 0 if code is None else int(code)
    except _ReachedWork:
        code = 0
    except MemoryError:
        _note(note_path, "over_memory")
        code = MEMORY_EXIT
        try:
            sys.stderr.write("MemoryError\n")
        except BaseException:
            pass
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message") prints it and exits 1
    return 1


def _fresh_process_state() -> None:
    """Logging as a new process has it (pytest's capture handlers removed), so configure_logging takes effect."""
    import logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def _install_stop(name: str, note_path: str) -> None:
    module_name, function = name.split(":")
    module = importlib.import_module(module_name)
    getattr(module, function)  # a misspelled stop point fails here, not silently

    def stop(*args, **kwargs):
        _note(note_path, f"reached {name}")
        raise _ReachedWork(name)

    setattr(module, function, stop)


def _install_patch(name: str, stand_in: str) -> None:
    module_name, function = name.split(":")
    module = importlib.import_module(module_name)
    getattr(module, function)  # a misspelled target fails here, not silently
    source, replacement = stand_in.split(":")
    setattr(module, function, getattr(importlib.import_module(source), replacement))


def _note(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
