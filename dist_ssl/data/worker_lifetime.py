"""DataLoader workers that die with the training process, even when it is killed with SIGKILL.

With the forkserver start method a worker's parent is the forkserver, not the trainer, and torch's
own watchdog only checks that parent. After ``kill -9`` of the trainer the workers, the forkserver
and the resource tracker used to live on forever (~1 GB per killed trainer): each worker holds the
forkserver's "alive" pipe, so the forkserver waits for the workers while they wait for it.

Here (Linux) the forkserver asks for SIGKILL when the trainer dies (``PR_SET_PDEATHSIG``, armed
when the forkserver imports this module through the loader's preload list), and so does every
worker when its parent dies; every worker also watches the trainer itself, with a daemon thread
waiting on a pidfd of the trainer (elsewhere: polling its pid once a second), which covers any
start method and a forkserver that shut down normally. With both gone, the resource tracker sees
its pipe close and exits.
"""
from __future__ import annotations

import ctypes
import functools
import os
import select
import signal
import sys
import threading
import time

__all__ = ["die_with_this_process", "watch_trainer"]

_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the pid watch below still ends the worker
        pass


def _wait_for_exit(pid: int) -> None:
    """Return once process ``pid`` has ended."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): poll
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            time.sleep(1.0)
    try:
        select.select([fd], [], [])  # a pidfd becomes readable when the process exits
    finally:
        os.close(fd)


def watch_trainer(trainer_pid: int, worker_id: int = 0) -> None:  # noqa: ARG001 - worker_init_fn signature
    """DataLoader ``worker_init_fn``: end this worker as soon as ``trainer_pid`` has ended."""
    _set_parent_death_signal()

    def watch() -> None:
        _wait_for_exit(trainer_pid)
        os._exit(1)  # no cleanup to do: the trainer that would read our output is gone

    threading.Thread(target=watch, name="dist_ssl-trainer-watch", daemon=True).start()


def _in_forkserver_preload() -> bool:
    """True while ``multiprocessing.forkserver.main`` imports its preload modules (this one among them)."""
    forkserver = sys.modules.get("multiprocessing.forkserver")
    frame = sys._getframe()
    while forkserver is not None and frame is not None:
        if frame.f_code is forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


def die_with_this_process() -> dict:
    """DataLoader keyword arguments that make its workers end with the calling process."""
    return {"worker_init_fn": functools.partial(watch_trainer, os.getpid())}


if _in_forkserver_preload():  # the forkserver's parent is the trainer that started it
    _set_parent_death_signal()
