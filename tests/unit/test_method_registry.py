"""Every registered method, one step on a tiny deterministic ViT, against a table of what it is.

The tests are parametrized over ``method_names()``: a method is smoke-tested the moment it is
registered (finite loss, every trainable parameter gets a gradient, the teacher is never trained,
``after_step`` changes exactly the state it should, that state round-trips, the backbone exports
as timm names it). ``EXPECT`` says per method what it needs and what it owns; a registered method
without a row fails (naming the method), and so does a row for a method that is not registered.
Method-specific numerics (losses against references, queues, masks, CutMix) live in the
per-method test files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import timm
import torch
from _tiny_methods import NUM_CLASSES, build_tiny, tiny_batch, trainable

from dist_ssl.methods import method_names

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Expect:
    """What a method is, at the tiny settings of _tiny_methods.TINY."""

    views: tuple[tuple[int, int], ...]   # crop groups the loader must produce: (views, pixels)
    logs: frozenset[str]                 # names of the logged loss parts
    reads: frozenset[str] = frozenset()  # batch keys besides "views" the loss depends on
    local_modules: tuple[str, ...] = ()  # rank-local modules (outside data-parallel gradient sync)
    momentum: Optional[float] = None     # EMA teacher <- student: the momentum after step 1
    moves: tuple[str, ...] = ()          # method state (extra_state_dict prefixes) after_step changes
    fixed: tuple[str, ...] = ()          # method state a training step must leave as it is
    frozen: tuple[str, ...] = ()         # student parameters that are never trained
    exports_head: bool = False           # head.safetensors beside the backbone
    classifies: bool = False             # classify() gives semantic-class logits


SIMCLR_VIEWS = ((2, 28),)
MIM_FIXED = ("tokenizer.",)  # a data-only tokenizer: its codebook is state, never trained
EXPECT: dict[str, Expect] = {
    "simclr": Expect(SIMCLR_VIEWS, frozenset({"nt_xent"})),
    "supcon": Expect(SIMCLR_VIEWS, frozenset({"supcon"}), reads=frozenset({"label"})),
    "mocov2": Expect(SIMCLR_VIEWS, frozenset({"info_nce"}), momentum=0.999,
                     moves=("teacher.", "queue", "queue_ptr")),
    "mocov3": Expect(((1, 28), (1, 28)), frozenset({"momentum"}), momentum=0.99, moves=("teacher.",),
                     frozen=("student.backbone.patch_embed.proj.weight", "student.backbone.patch_embed.proj.bias")),
    "dino": Expect(((1, 28), (1, 28), (2, 12)), frozenset({"teacher_temp"}), momentum=0.996,
                   moves=("teacher.", "loss.center")),
    "beit": Expect(((1, 28),), frozenset({"mim_ce", "mim_acc"}), reads=frozenset({"index"}), fixed=MIM_FIXED),
    "splitmask": Expect(((1, 28),), frozenset({"mim_ce", "mim_acc", "info_nce"}), reads=frozenset({"index"}),
                        fixed=MIM_FIXED),
    "mae": Expect(((1, 28),), frozenset({"mse"}), reads=frozenset({"index"})),
    "idmm": Expect(((2, 28), (2, 12)), frozenset({"ce_global", "ce_local", "lam"}), reads=frozenset({"index"}),
                   local_modules=("classifier",)),
    "supervised": Expect(((1, 28),), frozenset({"ce", "train_acc"}), reads=frozenset({"label"}),
                         exports_head=True, classifies=True),
}


def expect(name: str) -> Expect:
    if name not in EXPECT:
        pytest.fail(f"method {name!r} is registered but has no row in EXPECT ({__file__}): "
                    f"add what it needs and owns", pytrace=False)
    return EXPECT[name]


def test_every_registered_method_has_a_row():
    missing = sorted(set(method_names()) - set(EXPECT))
    assert not missing, f"registered methods without a row in EXPECT: {missing}"


def test_every_row_is_a_registered_method():
    unknown = sorted(set(EXPECT) - set(method_names()))
    assert not unknown, f"rows of EXPECT naming no registered method: {unknown}"


@pytest.mark.parametrize("name", method_names())
def test_one_step_gives_every_trainable_parameter_a_gradient(name):
    want = expect(name)
    method = build_tiny(name)
    out = method(tiny_batch(method), step=0)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"]), out["loss"]
    assert set(out["logs"]) == want.logs
    for key, value in out["logs"].items():
        value = torch.as_tensor(value)
        assert not value.requires_grad and torch.isfinite(value).all(), key
    out["loss"].backward()
    params = trainable(method)
    silent = [n for n, p in params if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0]
    assert not silent, f"no (finite, non-zero) gradient: {silent}"
    frozen = [n for n, p in method.named_parameters() if not p.requires_grad and not n.startswith("teacher.")]
    assert tuple(frozen) == want.frozen
    local = {id(p) for m in method.local_modules() for p in m.parameters()}
    assert not local & {id(p) for p in method.student.parameters()}  # never inside the wrapped student


@pytest.mark.parametrize("name", method_names())
def test_views_and_batch_keys_the_loss_reads(name):
    want = expect(name)
    method = build_tiny(name, drop_path=0.0)
    assert tuple((g.count, g.size) for g in method.train_views().groups) == want.views

    def loss(batch):
        # a fresh build each time: a second call at the same step would be the next
        # gradient-accumulation micro-batch (IDMM draws a new CutMix for it)
        return build_tiny(name, drop_path=0.0)(batch, step=0)["loss"].detach()

    batch = tiny_batch(method)
    reference = loss(batch)
    assert torch.equal(loss(batch), reference)  # deterministic: a change below is the key's doing
    changed = {"label": batch["label"].roll(1), "index": batch["index"].flip(0)}
    read = {key for key, value in changed.items() if not torch.equal(loss({**batch, key: value}), reference)}
    assert read == want.reads


def _teacher(method) -> Optional[torch.nn.Module]:
    return getattr(method, "teacher", None)


@pytest.mark.parametrize("name", method_names())
def test_teacher_is_an_ema_of_the_student_and_never_trained(name):
    want, method = expect(name), build_tiny(name)
    teacher = _teacher(method)
    assert (teacher is not None) == (want.momentum is not None)
    if teacher is None:
        return
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in method.student.parameters()}
    assert not any(p.requires_grad for p in teacher.parameters())
    method(tiny_batch(method), step=0)["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    with torch.no_grad():
        for _, p in trainable(method):
            p.sub_(0.5 * p.grad)  # an optimizer step
    method.after_step(1)
    m, student = want.momentum, dict(method.student.named_parameters())
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, m * before[n] + (1 - m) * student[n], rtol=1e-5, atol=1e-7, msg=n)


def _top_level(keys) -> set[str]:
    return {k.split(".")[0] for k in keys}


@pytest.mark.parametrize("name", method_names())
def test_after_step_changes_exactly_the_declared_state(name):
    want, method = expect(name), build_tiny(name)
    before = {k: v.clone() for k, v in method.extra_state_dict().items()}
    assert not any(k.startswith("student.") for k in before)
    assert _top_level(before) == _top_level(want.moves + want.fixed), "undeclared method state"
    method(tiny_batch(method), step=0)["loss"].backward()
    with torch.no_grad():
        for _, p in trainable(method):
            p.sub_(0.5 * p.grad)
    method.after_step(1)
    after = method.extra_state_dict()
    assert after.keys() == before.keys()
    for prefix in want.moves:
        keys = [k for k in before if k.startswith(prefix)]
        assert any(not torch.equal(before[k], after[k]) for k in keys), f"{prefix} did not change"
    for prefix in want.fixed:
        for k in (k for k in before if k.startswith(prefix)):
            assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("name", method_names())
def test_method_state_round_trips(name):
    want, method = expect(name), build_tiny(name)
    state = method.extra_state_dict()
    assert list(method.named_local_modules()) == list(want.local_modules)
    fresh = build_tiny(name, seed=123)
    if not state:
        return
    if want.momentum is not None:  # a different init: loading must really overwrite
        assert any(not torch.equal(v, fresh.extra_state_dict()[k]) for k, v in state.items())
    fresh.load_extra_state_dict(state)
    for k, v in fresh.extra_state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(KeyError, match="method state mismatch"):
        fresh.load_extra_state_dict(dict(list(state.items())[1:]))


@pytest.mark.parametrize("name", method_names())
def test_backbone_exports_as_timm_names_it(name):
    want, method = expect(name), build_tiny(name)
    assert type(method).exports_head == want.exports_head
    backbone = method.backbone()
    num_classes = NUM_CLASSES if want.exports_head else 0  # the head travels only when exported
    ref = timm.create_model("vit_pico_patch4_28", in_chans=1, num_classes=num_classes)
    assert type(backbone) is type(ref) and backbone.state_dict().keys() == ref.state_dict().keys()
    x = tiny_batch(method)["views"][0]
    logits = method.classify(x)
    assert (logits is not None) == want.classifies
    if logits is not None:
        assert logits.shape == (x.shape[0], NUM_CLASSES)
