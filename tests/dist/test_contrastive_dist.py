"""Contrastive / self-distillation methods in 2 real gloo processes vs one process.

The global batch of 8 images is split 4 + 4 over two DDP ranks (tests/dist/_contrastive_worker.py);
the reference runs the same method on all 8 in this process (no process group). Equal results
mean: negatives / keys gathered across ranks (SimCLR, SupCon, MoCo v3) with gradients flowing
back to the producing rank, a MoCo v2 queue that receives the keys of BOTH ranks, a DINO center
averaged over ranks, and teacher updates through the DDP wrapper (and FSDP2's DTensor shards,
for DINO) that leave every rank's state identical. The losses alone are also checked on an
uneven 3 + 5 split, and on 4 + 4 declared equal (``equal_batches``: no rank-offset gather).
Processes are spawned once for the whole file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import _contrastive_worker as W  # noqa: E402

from dist_ssl.methods.momentum import teacher_forward  # noqa: E402

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("contrastive_dist")
    mp.start_processes(W.run, args=(str(out / "init"), str(out)), nprocs=W.WORLD, join=True,
                       start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(W.WORLD)]


def reference(name: str):
    method = W.make_method(name)
    batch = W.global_batch(method)
    return method, batch, W.one_step(method, batch, list(method.student.named_parameters()))


def reference_float64(name: str) -> dict:
    """Single-process gradients of the whole batch in float64."""
    method = W.make_method(name).double()
    batch = W.global_batch(method)
    batch["views"] = [v.double() for v in batch["views"]]
    return W.one_step(method, batch, list(method.student.named_parameters()))["grads"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(W.CONFIGS) + ["dino_fsdp2"])
def test_split_batch_equals_single_process(ranks, name):
    _, _, ref = reference(name.removesuffix("_fsdp2"))
    r0, r1 = ranks[0][name], ranks[1][name]
    assert "error" not in r0, r0.get("error")
    if name.endswith("_fsdp2"):  # really sharded: every student parameter is a DTensor
        assert r0["dtensor_params"] == r0["n_params"] > 0
    if name.endswith("_bn"):  # the heads' BatchNorms (student, and teacher for MoCo v3) were converted
        assert ranks[0][f"{name}:global_bn"] >= 1
    # loss of the global batch = mean of the ranks' losses (equal shard sizes)
    assert (r0["loss"] + r1["loss"]) / 2 == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7)
    # DDP-averaged gradients = single-process gradients of the whole batch
    assert r0["grads"].keys() == ref["grads"].keys() and ref["grads"]
    if name.endswith("_bn"):
        # BatchNorm's backward over 16 rows amplifies fp32 rounding: the fp32 single-process
        # gradients themselves are up to ~6e-5 off the float64 ones. So the ranks are held to
        # the float64 reference, within a few times the fp32 reference's own error per tensor
        # (per-process BN instead of global BN misses by orders of magnitude: loss 4.54 vs 3.67).
        ref64 = reference_float64(name)
        for key, g64 in ref64.items():
            own = (ref["grads"][key].double() - g64).abs().max().item()
            err = (r0["grads"][key].double() - g64).abs().max().item()
            assert err <= 4 * own + 1e-6, f"{key}: {err:.2e} from float64, fp32 reference {own:.2e}"
            assert torch.equal(r0["grads"][key], r1["grads"][key]), key
    else:
        for key, g in ref["grads"].items():
            torch.testing.assert_close(r0["grads"][key], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
            assert torch.equal(r0["grads"][key], r1["grads"][key]), key
    # method state after the step: identical on both ranks, equal to the reference
    assert r0["state"].keys() == r1["state"].keys() == ref["state"].keys()
    for key, v in ref["state"].items():
        assert torch.equal(r0["state"][key], r1["state"][key]), f"{key} differs between ranks"
        torch.testing.assert_close(r0["state"][key], v, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_moco_v2_queue_receives_keys_from_both_ranks(ranks):
    method = W.make_method("mocov2")
    batch = W.global_batch(method)
    keys = F.normalize(teacher_forward(method.teacher, batch["views"][1:2]), dim=1)  # [8, P], rank order
    for r in range(W.WORLD):
        state = ranks[r]["mocov2"]["state"]
        assert int(state["queue_ptr"]) == W.GLOBAL_B
        torch.testing.assert_close(state["queue"][:4], keys[:4], rtol=1e-5, atol=1e-6)  # rank 0's images
        torch.testing.assert_close(state["queue"][4:8], keys[4:], rtol=1e-5, atol=1e-6)  # rank 1's images
        assert torch.equal(state["queue"][8:], method.queue[8:])  # the rest untouched


def test_dino_center_is_averaged_over_ranks(ranks):
    method = W.make_method("dino")
    batch = W.global_batch(method)
    teacher_out = teacher_forward(method.teacher, batch["views"][:2])  # [2 * 8, K]
    expected = 0.1 * teacher_out.mean(0, keepdim=True)
    for r in range(W.WORLD):
        torch.testing.assert_close(ranks[r]["dino"]["state"]["loss.center"], expected, rtol=1e-5, atol=1e-7)
    half = W.rank_slice(batch, 0, W.WORLD)
    local_only = 0.1 * teacher_forward(method.teacher, half["views"][:2]).mean(0, keepdim=True)
    assert not torch.allclose(local_only, expected, atol=1e-5)  # the check can tell them apart


@pytest.mark.parametrize("name", ["nt_xent", "supcon", "global_info_nce"])
def test_losses_with_uneven_shards_equal_single_process(ranks, name):
    """3 + 5 rows: summed losses and the gradients reaching each rank's own rows match."""
    total, grads = _single_process(name)
    assert all("error" not in ranks[r]["uneven"] for r in range(W.WORLD)), ranks[0]["uneven"]
    got = [ranks[r]["uneven"][name] for r in range(W.WORLD)]
    assert sum(g["sum"] for g in got) == pytest.approx(total.item(), rel=1e-5)
    _assert_rank_grads_equal(got, grads)


@pytest.mark.parametrize("name", ["nt_xent", "supcon", "global_info_nce"])
def test_losses_with_declared_equal_batches_skip_the_offset_gather(ranks, name):
    """4 + 4 rows with ``equal_batches``: the same sums and gradients as one process, and two
    all_gathers fewer than with the sizes gathered (rank_offset's: the sizes' sizes, the sizes)."""
    total, grads = _single_process(name)
    assert all("error" not in ranks[r]["equal"] for r in range(W.WORLD)), ranks[0]["equal"]
    for mode in ("gathered", "declared"):
        got = [ranks[r]["equal"][mode][name] for r in range(W.WORLD)]
        assert sum(g["sum"] for g in got) == pytest.approx(total.item(), rel=1e-5), mode
        _assert_rank_grads_equal(got, grads)
    for r in range(W.WORLD):
        gathered, declared = (ranks[r]["equal"][mode][name]["all_gathers"] for mode in ("gathered", "declared"))
        assert declared == gathered - 2, (gathered, declared)


def _single_process(name: str):
    """The loss summed over all rows in one process and its input gradients (grad_x, grad_y)."""
    x, y = W.loss_inputs()
    x.requires_grad_(True)
    y.requires_grad_(True)
    total = W.loss_sums()[name](x, y, slice(None))
    total.backward()
    return total, {"grad_x": x.grad, "grad_y": y.grad}


def _assert_rank_grads_equal(got: list, grads: dict) -> None:
    """The ranks' gradients of their own rows, in rank order, equal the single-process ones."""
    for key, ref in grads.items():
        if ref is None:  # keys of MoCo v3 carry no gradient
            assert all(g[key] is None for g in got)
            continue
        torch.testing.assert_close(torch.cat([g[key] for g in got]), ref, rtol=1e-4, atol=1e-6)
