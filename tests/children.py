"""Child processes for the tests that need several dit-lens processes at once (racing writers, a
killed capture, a clean peak-memory count), started in a fraction of a second.

A fresh ``python script.py`` spends seconds importing torch, diffusers, transformers and nnsight
before it does anything, most of a multi-process test's time. Here every child is forked from one
server process (`multiprocessing`'s fork server, started once per test session, on one OpenMP
thread as the tests run) that has already made those imports (`warm_imports`). A child is still its
own OS process, with its own pid, file descriptors, file locks and memory, and it runs its script as
``python script.py args…`` would: ``__name__ == "__main__"``, ``sys.argv``, the exit status of
``sys.exit`` or 1 on an uncaught exception, death by a signal as a negative return code. Its stdout
and stderr go to files, read back by `Child.communicate`.

Examples:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "hello.py").write_text("import sys; print('hello', sys.argv[1]); sys.exit(3)")
    >>> child = start(folder / "hello.py", "world", env={"PATH": "/usr/bin"})
    >>> child.communicate(timeout=120), child.returncode
    (('hello world\\n', ''), 3)
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import subprocess
import sys
from pathlib import Path

__all__ = ["Child", "start"]

_CONTEXT: multiprocessing.context.BaseContext | None = None
_HERE = str(Path(__file__).resolve().parent)


def _context() -> multiprocessing.context.BaseContext:
    global _CONTEXT
    if _CONTEXT is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["warm_imports"])
        server_env = {"PYTHONPATH": os.pathsep.join(filter(None, [_HERE, os.environ.get("PYTHONPATH")])),
                      "OMP_NUM_THREADS": "1"}  # where it finds the preload; no OpenMP threads a fork would lose
        saved = {name: os.environ.get(name) for name in server_env}
        os.environ.update(server_env)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            for name, value in saved.items():
                os.environ.pop(name) if value is None else os.environ.update({name: value})
        _CONTEXT = context
    return _CONTEXT


def _run(script: str, args: tuple[str, ...], env: dict, stdout: str, stderr: str) -> None:
    """The child's body: the environment, stdout and stderr of a fresh process, then the script."""
    os.environ.clear()
    os.environ.update(env)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [script, *args]
    sys.path[:] = [str(Path(script).parent)] + [p for p in sys.path[1:] if p != _HERE]  # as `python script.py`
    runpy.run_path(script, run_name="__main__")


class Child:
    """A started child, with the parts of `subprocess.Popen` the tests use."""

    def __init__(self, process: multiprocessing.process.BaseProcess, stdout: Path, stderr: Path) -> None:
        self._process = process
        self.stdout_file, self.stderr_file = stdout, stderr  # what it has written so far, while it runs

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def kill(self) -> None:
        self._process.kill()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to end; its return code. Raises `subprocess.TimeoutExpired` after `timeout`."""
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(str(self.stdout_file.parent), timeout)
        return self._process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the child to end; its (stdout, stderr). Raises `subprocess.TimeoutExpired` after `timeout`."""
        self.wait(timeout)
        return self.stdout_file.read_text(), self.stderr_file.read_text()


def start(script: str | Path, *args: str, env: dict | None = None) -> Child:
    """Run `script` with `args` in a new child process, as ``python script args…`` with environment `env`
    (default: this process's). Its stdout and stderr are kept in files beside the script."""
    script = Path(script).resolve()
    env = dict(os.environ if env is None else env)
    number = 0
    while True:  # files of this child's own, made here before it starts
        stdout, stderr = (script.with_name(f"{script.stem}.{number}.{kind}") for kind in ("stdout", "stderr"))
        try:
            stdout.touch(exist_ok=False)
            break
        except FileExistsError:
            number += 1
    stderr.touch()
    process = _context().Process(target=_run, args=(str(script), args, env, str(stdout), str(stderr)), daemon=True)
    process.start()
    return Child(process, stdout, stderr)
