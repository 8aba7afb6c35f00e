"""The command line of a stage run, exactly as `run` executes it and prints it.

Training: 1 process -> ``python -m dist_ssl.engine.cli_train RECIPE overrides...``; more ->
``accelerate launch --config_file C --num_processes P --main_process_port PORT -m dist_ssl.engine.cli_train ...``
(a free port per launch: other jobs on the machine may hold accelerate's default 29500).
Evaluation: ``python -m dist_ssl.eval.cli_eval ...`` in one process. Module paths, not files of
a checkout: the same commands work with the package installed. The environment of the experiment's
``launch.env`` is added (and printed as ``K=V`` before the command).
"""
from __future__ import annotations

import shlex
import socket
import sys
from pathlib import Path

from dist_ssl.entry_points import EVAL_MODULE, TRAIN_MODULE
from dist_ssl.experiments.cells import StageRun
from dist_ssl.experiments.spec import Launch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_executable() -> str:
    """The venv's `accelerate` next to this interpreter, else whatever PATH finds."""
    exe = Path(sys.executable).with_name("accelerate")
    return str(exe) if exe.is_file() else "accelerate"


def stage_argv(stage: StageRun, launch: Launch, port: int | None = None) -> list[str]:
    if stage.is_eval:
        return [sys.executable, "-m", EVAL_MODULE, *stage.args]
    script = ["-m", TRAIN_MODULE, str(stage.recipe), *stage.args]
    if launch.processes == 1:
        return [sys.executable, *script]
    config = Path(launch.accelerate_config).resolve()
    return [accelerate_executable(), "launch", "--config_file", str(config),
            "--num_processes", str(launch.processes),
            "--main_process_port", str(port if port is not None else free_port()), *script]


def stage_env(launch: Launch) -> dict[str, str]:
    return dict(launch.env)


def shell_line(argv: list[str], env: dict[str, str]) -> str:
    """One copy-pasteable shell line: ``K=V ... command args``."""
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return (prefix + " " if prefix else "") + shlex.join(argv)
