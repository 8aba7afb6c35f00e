"""Render the SLURM batch script of an N-node x G-process `accelerate launch` training job.

The script (one per submission, written into the run directory by dist-ssl-submit):
- allocates N nodes with one task each (``--ntasks-per-node=1``) and runs ONE ``srun`` task per
  node (``--kill-on-bad-exit=1``: a dead node ends the step instead of hanging the others);
- each task runs ``python -m dist_ssl.slurm.node_launch``, i.e. ``accelerate launch -m
  dist_ssl.engine.cli_train`` with
  ``--num_machines $SLURM_NNODES --machine_rank $SLURM_NODEID``, the allocation's first node as
  main address and a main port derived from the job id (two jobs sharing nodes do not collide;
  emulated nodes share one network namespace, so this matters even on one host);
- preemption: ``#SBATCH --signal=B:USR1@<s>`` signals the batch shell, which forwards USR1 to
  the step; the trainer checkpoints and exits 75 (dist_ssl.engine.preemption); the script then
  ``scontrol requeue``s its own job, at most ``max_requeues`` times (``SLURM_RESTART_COUNT``).
  Any other failure ends the job with that exit code and is never requeued.

Layout: ``<run>/slurm/job.sbatch`` (arrays: ``<parent>/slurm/array.sbatch`` with element ``i``
in ``<parent>/<i>/``), the log ``<run>/slurm/slurm-<jobid>.out`` (all attempts appended, lines
prefixed by node index) and ``<run>/slurm/node_exit/node<k>`` (node k's launcher exit code, this
attempt: srun reports whichever task it killed, the batch script needs the trainer's code).

Quoting: no value is spliced into shell code. Body values are single shell words
(``shlex.quote``); ``#SBATCH`` values are quoted for sbatch's own parser (double quotes, with a
backslash before ``\\`` and ``"``) and ``%`` is doubled in file names (SLURM's %j patterns).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dist_ssl.entry_points import NODE_LAUNCH_MODULE, TRAIN_MODULE

REQUEUE_EXIT_CODE = 75  # dist_ssl.engine.preemption.REQUEUE_EXIT_CODE (not imported: no torch here)
PORT_BASE, PORT_SPAN = 20000, 10000  # main port = PORT_BASE + job id % PORT_SPAN
_SBATCH_PLAIN = frozenset("-_.:/@,=+%")  # characters an #SBATCH value may show unquoted


@dataclass(frozen=True)
class Element:
    """One run of the job: its run directory and its own overrides (array: one per index);
    ``recipe`` replaces ``JobSpec.recipe`` for this element (arrays whose runs use different
    recipes, e.g. one experiment stage over several methods)."""
    run_dir: Path
    overrides: tuple[str, ...]
    recipe: Optional[Path] = None


@dataclass(frozen=True)
class JobSpec:
    recipe: Path                 # absolute recipe path
    elements: tuple[Element, ...]
    script_path: Path            # where the batch script is written
    nodes: int
    procs_per_node: int
    accelerate_config: Path
    python: str                  # interpreter on the compute nodes
    workdir: Path                # job working directory (relative recipe paths resolve here)
    job_name: str
    array: bool = False
    partition: Optional[str] = None
    time: Optional[str] = None
    gpus_per_node: int = 0
    cpus_per_node: Optional[int] = None
    signal_seconds: int = 300    # 0: no preemption warning signal
    max_requeues: int = 3
    env_file: Optional[Path] = None  # sourced before launching (modules, NCCL settings)
    array_indices: Optional[tuple[int, ...]] = None  # SLURM array task ids (default 0..n-1)
    output: Optional[str] = None  # --output pattern (default: in the run dir, see _header)
    rendered_by: str = "dist-ssl-submit"  # named in the script's first comment

    def indices(self) -> tuple[int, ...]:
        """The array task id of each element."""
        return self.array_indices if self.array_indices is not None else tuple(range(len(self.elements)))

    def per_element_recipes(self) -> bool:
        return any(el.recipe is not None for el in self.elements)

    def validate(self) -> None:
        if self.nodes < 1 or self.procs_per_node < 1:
            raise ValueError("nodes and procs-per-node must be >= 1")
        if not self.elements or (len(self.elements) > 1 and not self.array):
            raise ValueError("several elements need array=True")
        if not 0 <= self.signal_seconds <= 65535:
            raise ValueError(f"signal seconds must be in 0..65535, got {self.signal_seconds}")
        if self.max_requeues < 0:
            raise ValueError(f"max requeues must be >= 0, got {self.max_requeues}")
        if self.array_indices is not None:
            if not self.array or len(self.array_indices) != len(self.elements) or \
                    len(set(self.array_indices)) != len(self.array_indices) or min(self.array_indices) < 0:
                raise ValueError("array indices must be distinct, >= 0 and one per array element")
        for el in self.elements:
            if "\\" in str(el.run_dir):  # SLURM expands no %j pattern in a file name with one
                raise ValueError(f"run directory must not contain a backslash: {el.run_dir}")


def sbatch_value(value: object) -> str:
    """One argument of an ``#SBATCH`` line as sbatch's own parser reads it: outside quotes a
    blank ends the value and ``#`` starts a comment; inside double quotes only ``\\`` and
    ``"`` are special (each escaped with a backslash)."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError(f"a SLURM option value cannot contain a newline: {text!r}")
    if text and all(c.isalnum() or c in _SBATCH_PLAIN for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def slurm_filename(path: Path, pattern: str) -> str:
    """A log path for ``--output``: ``%`` in the directory doubled, ``pattern`` kept (%j...)."""
    return str(path).replace("%", "%%") + "/" + pattern


def log_dir(run_dir: Path) -> Path:
    return run_dir / "slurm"


def _header(spec: JobSpec) -> list[str]:
    if spec.output is not None:
        out = spec.output
    elif spec.array:
        # element i's log lands in its own run dir: <parent>/<i>/slurm/
        parent = spec.elements[0].run_dir.parent
        out = slurm_filename(parent, "%a/slurm/slurm-%A_%a.out")
    else:
        out = slurm_filename(log_dir(spec.elements[0].run_dir), "slurm-%j.out")
    opts = [("job-name", spec.job_name), ("nodes", spec.nodes), ("ntasks-per-node", 1)]
    if spec.gpus_per_node:
        opts.append(("gpus-per-node", spec.gpus_per_node))
    if spec.cpus_per_node:
        opts.append(("cpus-per-task", spec.cpus_per_node))  # the node's one task owns them all
    opts += [(k, v) for k, v in (("partition", spec.partition), ("time", spec.time)) if v]
    opts += [("chdir", spec.workdir), ("output", out), ("open-mode", "append"), ("requeue", None)]
    if spec.signal_seconds:
        opts.append(("signal", f"B:USR1@{spec.signal_seconds}"))
    if spec.array:
        ids = spec.indices()
        default = ids == tuple(range(len(spec.elements)))
        opts.append(("array", f"0-{len(spec.elements) - 1}" if default else ",".join(map(str, ids))))
    lines = ["#!/bin/bash",
             f"# dist_ssl training job rendered by {spec.rendered_by}; resubmit with `sbatch` on this file."]
    for key, value in opts:
        lines.append(f"#SBATCH --{key}" + ("" if value is None else "=" + sbatch_value(value)))
    return lines


def _words(items) -> str:
    return " ".join(shlex.quote(str(x)) for x in items)


def _element_lines(spec: JobSpec) -> list[str]:
    def assign(el: Element, indent: str) -> list[str]:
        lines = [f"{indent}RUN_DIR={shlex.quote(str(el.run_dir))}"]
        if spec.per_element_recipes():
            lines.append(f"{indent}RECIPE={shlex.quote(str(el.recipe or spec.recipe))}")
        return lines + [f"{indent}OVERRIDES=({_words(el.overrides)})"]

    if not spec.array:
        return assign(spec.elements[0], "")
    lines = ['case "${SLURM_ARRAY_TASK_ID:-}" in']
    for i, el in zip(spec.indices(), spec.elements):
        lines += [f"    {i})"] + assign(el, "        ") + ["        ;;"]
    lines += ["    *) echo \"[dist_ssl] unknown array index '${SLURM_ARRAY_TASK_ID:-}'\" >&2; exit 2 ;;",
              "esac"]
    return lines


def launch_lines(spec: JobSpec) -> list[str]:
    """The srun line: one task per node, each running accelerate launch via node_launch.py."""
    q = shlex.quote
    cont = " \\"
    recipe = '"$RECIPE"' if spec.per_element_recipes() else q(str(spec.recipe))
    return [
        'srun --kill-on-bad-exit=1 --label --nodes="$SLURM_NNODES" --ntasks-per-node=1' + cont,
        f'    "$PYTHON" -m {NODE_LAUNCH_MODULE} --status-dir "$STATUS_DIR" --' + cont,
        f"    --config_file {q(str(spec.accelerate_config))}" + cont,
        '    --num_machines "$SLURM_NNODES"' + cont,
        f'    --num_processes "$((SLURM_NNODES * {spec.procs_per_node}))"' + cont,
        '    --main_process_ip "$MAIN_ADDR"' + cont,
        '    --main_process_port "$MAIN_PORT"' + cont,
        f'    -m {TRAIN_MODULE} {recipe} "${{OVERRIDES[@]}}" &',
    ]


_PREAMBLE = """\
set -uo pipefail
echo "[dist_ssl] job ${SLURM_JOB_ID} attempt ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}: $(date -Is)"
"""

_TOPOLOGY = f"""\
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))  # from the job id: jobs sharing nodes differ
STATUS_DIR=$RUN_DIR/slurm/node_exit
mkdir -p "$STATUS_DIR" && rm -f "$STATUS_DIR"/node* || exit 1
echo "[dist_ssl] run dir $RUN_DIR; main process $MAIN_ADDR:$MAIN_PORT; $SLURM_NNODES node(s)"

# Preemption: SLURM signals this shell (--signal=B:USR1@s, or scancel -b --signal=USR1); srun
# forwards USR1 to its tasks, whose launcher turns it into SIGTERM for the trainers only.
PREEMPTED=0
SRUN_PID=
forward_preemption() {{
    PREEMPTED=1
    echo "[dist_ssl] USR1: asking the trainers to checkpoint and exit {REQUEUE_EXIT_CODE}"
    [ -z "$SRUN_PID" ] || kill -USR1 "$SRUN_PID" 2>/dev/null
}}
trap forward_preemption USR1
"""

_REQUEUE = f"""\
SRUN_PID=$!
[ "$PREEMPTED" = 0 ] || kill -USR1 "$SRUN_PID"  # signalled before srun started
while :; do
    wait "$SRUN_PID"; rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break  # still running: the wait was cut short by the trap
done
# srun reports whichever task it killed last; the launchers recorded the trainers' own codes:
# 75 from any node wins (its checkpoint is collective: the run can resume), else the lowest
# non-zero code (a 128+N signal code is usually the consequence, not the cause)
node_rc=$(grep -hsvx 0 "$STATUS_DIR"/node* | sort -n | head -n 1)
if grep -qsx {REQUEUE_EXIT_CODE} "$STATUS_DIR"/node*; then
    rc={REQUEUE_EXIT_CODE}
elif [ "$rc" -ne 0 ] && [ -n "$node_rc" ]; then
    rc=$node_rc
fi
echo "[dist_ssl] step finished with exit code $rc: $(date -Is)"
if [ "$rc" -eq {REQUEUE_EXIT_CODE} ]; then
    if [ "${{SLURM_RESTART_COUNT:-0}}" -lt "$MAX_REQUEUES" ]; then
        echo "[dist_ssl] checkpointed after preemption: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        echo "[dist_ssl] scontrol requeue failed" >&2
    else
        echo "[dist_ssl] preempted, but $MAX_REQUEUES requeue(s) are used up: not requeueing" >&2
    fi
fi
exit "$rc"
"""


def render(spec: JobSpec) -> str:
    """The whole batch script."""
    spec.validate()
    lines = _header(spec) + ["", _PREAMBLE.rstrip("\n")]
    lines.append(f"PYTHON={shlex.quote(spec.python)}")
    lines.append(f"MAX_REQUEUES={spec.max_requeues}")
    lines += _element_lines(spec)
    if spec.env_file is not None:
        lines += ["# per-cluster environment (modules, NCCL settings)",
                  f"set +u; source {shlex.quote(str(spec.env_file))} || exit 1; set -u"]
    lines += ["", _TOPOLOGY.rstrip("\n"), ""]
    lines += launch_lines(spec)
    lines.append(_REQUEUE.rstrip("\n"))
    return "\n".join(lines) + "\n"
