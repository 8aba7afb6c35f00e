"""Backends through the real `accelerate launch` (2 CPU processes, gloo) + the launcher configs.

One launch per backend (tests/dist/_backend_worker.py), two at a time, shared by one small test
per property: it must really be the requested backend with 2 processes, train like one process
on the full batch, and round-trip a checkpoint.
DeepSpeed compiles a comm op on first use (35 s to a few minutes on 2 cores), cached under
TORCH_EXTENSIONS_DIR (default here: ~/.cache/dist_ssl/torch_extensions).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_ssl.parallel import collectives as C
from dist_ssl.parallel.accelerator import (
    build_accelerator,
    launcher_backend,
    prepare_model_and_optimizer,
    resolve_backend,
)
from dist_ssl.parallel.config import ParallelConfig

sys.path.insert(0, str(Path(__file__).parent))
from _backend_worker import SHARD_OF_RANK_1  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "accelerate"
WORKER = Path(__file__).with_name("_backend_worker.py")
# backend -> (launcher config, seconds allowed; DeepSpeed's first run compiles)
LAUNCHES = {
    "ddp": ("cpu_2proc.yaml", 240),
    "fsdp2": ("fsdp2.yaml", 240),
    "zero1": ("zero1.yaml", 540),
    "zero2": ("zero2.yaml", 540),
    "zero3": ("zero3.yaml", 540),
}


# ----------------------------------------------------------------- no launcher needed


def test_collectives_world_size_1_without_process_group():
    assert not C.is_dist() and C.get_rank() == 0 and C.get_world_size() == 1
    t = torch.tensor([1, 2, 3])
    m = C.all_reduce_mean(t)
    assert m.dtype == torch.float32 and m.tolist() == [1.0, 2.0, 3.0]
    x = torch.randn(3, 2, requires_grad=True)
    g = C.all_gather_cat(x)
    assert torch.equal(g, x) and not g.requires_grad and g.data_ptr() != x.data_ptr()
    C.all_gather_with_grad(x).pow(2).sum().backward()
    assert torch.allclose(x.grad, 2 * x)
    assert C.broadcast_object({"a": 1}) == {"a": 1}
    assert C.all_gather_object(5) == [5]
    C.barrier()


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_launcher_config_is_valid_for_accelerate_launch(name, monkeypatch):
    """Parse each file the way `accelerate launch --config_file` does and check what it will start."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    for k in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(k)
    path = CONFIGS / name
    cfg = load_config_from_file(str(path))
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    assert str(args.mixed_precision) == "no"  # precision belongs to the recipe
    stem = path.stem
    if stem == "cpu_2proc":  # multi_gpu launcher = torchrun with 2 workers (--cpu would start one)
        assert args.multi_gpu and not args.cpu and args.num_processes == 2 and cfg.use_cpu
    elif stem == "ddp":
        assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    elif stem == "fsdp2":
        assert args.use_fsdp and int(args.fsdp_version) == 2 and cfg.fsdp_config["fsdp_version"] == 2
        assert str(args.fsdp_cpu_ram_efficient_loading).lower() == "false"
    else:
        stage = int(stem[-1])
        assert stem == f"zero{stage}" and args.use_deepspeed and int(args.zero_stage) == stage
        assert args.offload_optimizer_device is None  # offload is the recipe's parallel.zero_offload
    assert args.num_processes >= 2


def test_resolve_backend_rules(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_backend("auto", None, 2) == "ddp"
    assert resolve_backend("auto", None, 1) == "single"
    assert resolve_backend("auto", "zero3", 2) == "zero3"
    assert resolve_backend("ddp", None, 1) == "single"
    assert resolve_backend("fsdp2", "fsdp2", 4) == "fsdp2"
    with pytest.raises(ValueError, match="recipe asks for 'fsdp2' but the launcher .* asks for 'zero2'"):
        resolve_backend("fsdp2", "zero2", 2)
    with pytest.raises(ValueError, match="fsdp1"):
        resolve_backend("auto", "fsdp1", 2)
    with pytest.raises(ValueError, match="needs a launcher"):
        resolve_backend("zero2", None, 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_backend("zero2", None, 1) == "zero2"


def test_launcher_env_detection_and_conflict_error(monkeypatch):
    for k in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(k)
    assert launcher_backend() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert launcher_backend() == "fsdp2"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert launcher_backend() == "zero3"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="'ddp' but the launcher"):  # raised before any Accelerator exists
        build_accelerator(ParallelConfig(backend="ddp"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ValueError, match="mixed_precision: launcher 'bf16' vs recipe 'no'"):
        build_accelerator(ParallelConfig(backend="zero3"), train_micro_batch_size=4)


def test_parallel_config_fields_and_validation():
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(ParallelConfig))
    ParallelConfig().validate()
    for bad, field_name in [
        (dict(backend="zero4"), "backend"),
        (dict(mixed_precision="fp8"), "mixed_precision"),
        (dict(grad_accum_steps=0), "grad_accum_steps"),
        (dict(backend="ddp", zero_offload=True), "zero_offload"),
        (dict(backend="zero2", fsdp_wrap_classes="Block"), "fsdp_wrap_classes"),
    ]:
        with pytest.raises(ValueError, match=f"^{field_name}: "):
            ParallelConfig(**bad).validate()


def test_prepare_rejects_parameters_outside_the_data_parallel_module():
    from accelerate.state import AcceleratorState, GradientState

    acc = build_accelerator(ParallelConfig())
    try:
        dp, local = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        opt = torch.optim.SGD([{"params": dp.parameters()}, {"params": local.parameters()}], lr=0.1)
        with pytest.raises(ValueError, match="2 parameter\\(s\\) do not belong to the data-parallel module"):
            prepare_model_and_optimizer(acc, dp, opt)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


# ----------------------------------------------------------------- real 2-process launches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """One real `accelerate launch` of the worker, started at construction; ``result()`` waits."""

    def __init__(self, backend: str, tmp_path: Path):
        config, self.timeout = LAUNCHES[backend]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dist_ssl" / "torch_extensions"))
        env["OMP_NUM_THREADS"] = "1"
        self.backend, self.out, self.log = backend, tmp_path / "result.json", tmp_path / "launch.log"
        cmd = [
            str(Path(sys.executable).with_name("accelerate")), "launch",
            "--config_file", str(CONFIGS / config),
            "--num_processes", "2",
            "--main_process_port", str(_free_port()),
            str(WORKER), "--backend", backend, "--out", str(self.out), "--run-dir", str(tmp_path / "run"),
        ]  # fmt: skip
        with open(self.log, "w") as f:  # the child keeps its own copy of the descriptor
            # a session of its own: stop() ends the launcher, torchrun and both workers together
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.deadline = time.monotonic() + self.timeout

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self) -> dict:
        try:
            rc = self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{self.backend}: launch timed out after {self.timeout}s\n{self.log.read_text()[-4000:]}")
        assert rc == 0 and self.out.is_file(), f"{self.backend}: rc={rc}\n{self.log.read_text()[-4000:]}"
        return json.loads(self.out.read_text())

    def stop(self) -> None:
        if self.running():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _rel_close(a: float, b: float, rtol: float = 1e-5) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b))


EXPECTED = {  # backend -> (distributed_type, checkpoint entry only this backend writes)
    "ddp": ("MULTI_CPU", "model.safetensors"),
    "fsdp2": ("FSDP", "pytorch_model_fsdp_0/.metadata"),
    "zero1": ("DEEPSPEED", "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    "zero2": ("DEEPSPEED", "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    "zero3": ("DEEPSPEED", "pytorch_model/zero_pp_rank_1_mp_rank_00_model_states.pt"),
}


# A launch keeps ~1.35 of 2 cores busy (imports, rendezvous, barriers, checkpoint files), so two
# at a time overlap: 5 launches 70 s -> 50 s here, and no launch runs twice.
PARALLEL_LAUNCHES = 2


def _selected_backends(request) -> list[str]:
    """Backends of the selected tests of this module that use a launch (-k may deselect some)."""
    chosen = {item.callspec.params["backend"] for item in request.session.items
              if item.module is request.module and "launched" in item.fixturenames}
    return [b for b in LAUNCHES if b in chosen]


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory):
    """backend -> the worker's result. Each selected backend is launched once for the module,
    PARALLEL_LAUNCHES at a time in LAUNCHES order; a failed launch fails every test of it."""
    wanted, started = _selected_backends(request), {}
    results: dict[str, dict] = {}
    failures: dict[str, str] = {}

    def start(backend: str) -> None:
        if backend not in started:
            started[backend] = Launch(backend, tmp_path_factory.mktemp(f"launch_{backend}"))

    def top_up() -> None:
        for backend in wanted:
            if sum(launch.running() for launch in started.values()) >= PARALLEL_LAUNCHES:
                return
            start(backend)

    def result(backend: str) -> dict:
        if backend not in results and backend not in failures:
            start(backend)
            top_up()
            try:
                results[backend] = started[backend].result()
            except (AssertionError, pytest.fail.Exception) as err:
                failures[backend] = str(err)
            top_up()  # the next launches run while this backend's tests read its result
        if backend in failures:
            pytest.fail(f"the {backend} launch failed: {failures[backend][:4000]}", pytrace=False)
        return results[backend]

    yield result
    for launch in started.values():
        launch.stop()


def per_backend(test):
    """A real 2-process launch per backend, shared by every test of this module (the first test
    of a backend waits for its launch; each test's time limit covers that wait)."""
    marks = (pytest.mark.dist, pytest.mark.timeout(600), pytest.mark.parametrize("backend", list(LAUNCHES)))
    for mark in marks:
        test = mark(test)
    return test


# 1. it really is that backend with 2 processes (accelerate falls back silently)
@per_backend
def test_it_really_is_the_requested_backend_with_two_processes(backend, launched):
    r = launched(backend)
    want = {"distributed_type": EXPECTED[backend][0], "num_processes": 2, "backend": backend, "mixed_precision": "no"}
    assert r["describe"] == want
    assert r["env_world_size"] == "2" and r["device"].startswith("cpu")


@per_backend
def test_launcher_backend_is_detected_and_a_contradicting_recipe_refused(backend, launched):
    r = launched(backend)
    assert r["launcher_backend"] == (None if backend == "ddp" else backend)
    if r["launcher_backend"]:
        assert "the launcher" in r["conflict_error"]


@per_backend
def test_model_is_wrapped_or_sharded_as_the_backend_says(backend, launched):
    s = launched(backend)["sharding"]
    if backend == "ddp":
        assert s["wrapper"] == "DistributedDataParallel"
    elif backend == "fsdp2":
        assert s["dtensor_params"] == s["n_params"] > 0
    else:
        assert s["zero_stage"] == int(backend[-1])
        assert s["zero3_partitioned_params"] == (s["n_params"] if backend == "zero3" else 0)


@per_backend
def test_weight_decay_schedule_reaches_the_optimizer_that_steps(backend, launched):
    set_wd, back = launched(backend)["weight_decay_seen"]  # through accelerate / DeepSpeed wrappers
    assert set_wd and set(set_wd) == {0.123} and set(back) == {0.05}, (set_wd, back)


# 2. finite, decreasing, and equal to one process on the full batch (fp32, even split)
@per_backend
def test_losses_are_finite_and_decrease(backend, launched):
    losses = launched(backend)["losses"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


@per_backend
def test_losses_equal_one_process_on_the_full_batch(backend, launched):
    r = launched(backend)
    losses, ref = r["losses"], r["reference"]
    assert len(losses) == len(ref) - 1 and all(_rel_close(a, b) for a, b in zip(losses, ref)), (losses, ref)


@per_backend
def test_momentum_teacher_and_model_ema_read_the_full_parameters(backend, launched):
    r = launched(backend)
    assert max(r["teacher_error"].values()) < 1e-5, r["teacher_error"]
    # ZeRO-3's partitioned parameters were there to gather at the update (and nowhere else)
    assert r["partitioned_at_update"] == (r["sharding"]["n_params"] if backend == "zero3" else 0)


# 3. checkpoint round trip: exact parameters, trainer state, RNG; resume continues the reference
@per_backend
def test_checkpoint_restores_the_exact_parameters(backend, launched):
    r = launched(backend)
    assert r["digest_loaded"] == r["digest_saved"] != r["digest_perturbed"]


@per_backend
def test_checkpoint_restores_the_trainer_state_and_is_the_latest(backend, launched):
    r = launched(backend)
    assert r["state_out"] == {**r["state_in"], "step": 4}
    assert r["latest"] == r["saved_path"] and r["saved_path"].endswith("step_00000004")


@per_backend
def test_checkpoint_restores_the_rng_of_every_rank(backend, launched):
    assert launched(backend)["rng_match_all_ranks"]


@per_backend
def test_resumed_step_continues_the_reference(backend, launched):
    r = launched(backend)
    assert _rel_close(r["resumed_loss"], r["reference"][4]), (r["resumed_loss"], r["reference"][4])


@per_backend
def test_checkpoint_holds_the_backend_files_and_the_common_ones(backend, launched):
    files = launched(backend)["ckpt_files"]
    assert EXPECTED[backend][1] in files and "COMPLETE" in files
    assert {"rng_state_0.safetensors", "rng_state_1.safetensors", "trainer_state.json"} <= set(files)


@per_backend
def test_no_checkpoint_file_runs_code_when_resumed(backend, launched):
    # each file replaced by an exploit (manifest rewritten to match) is refused on every rank,
    # naming it, or not needed at all
    r = launched(backend)
    ex = r["exploits"]
    assert not ex["ran"] and set(ex["outcomes"]) == set(r["ckpt_files"]), ex
    ignored = {rel for rel, o in ex["outcomes"].items() if o == "ignored"}
    assert ignored <= {"COMPLETE", "zero_to_fp32.py", "zero_to_torch.py"}, ex  # never read (nor run)
    assert all(o in ("refused", "ignored") for o in ex["outcomes"].values()), ex


@per_backend
def test_a_truncated_shard_is_refused_on_every_rank_naming_it(backend, launched):
    errors, shard = launched(backend)["corrupt_errors"], SHARD_OF_RANK_1[backend]
    assert len(errors) == 2 and all(shard in (m or "") for m in errors), errors


@pytest.mark.dist
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["ddp"])
def test_collectives_across_two_processes(backend, launched):
    c = launched(backend)["collectives"]
    assert (c["rank"], c["world"], c["mean"]) == (0, 2, 1.5)
    assert c["gather_cat"] == [0.0, 1.0, 10.0, 11.0, 12.0]  # uneven: 2 rows + 3 rows
    assert c["grad_max_err"] < 1e-6
    assert c["broadcast"] == {"from": 0} and c["gather_object"] == [0, 10]
