"""Flat parameter arena: views, tied weights, frozen params, state_dict, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hybrid_triton.arena import ARENA_ALIGN, ArenaError, FlatArena


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.frozen = nn.Linear(5, 3)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("running", torch.randn(4))

    def forward(self, idx):
        h = self.emb(idx)
        return self.head(h).sum() + self.frozen(self.norm(self.lin(h))).sum()


def test_parameters_become_views_and_values_are_kept():
    m = Tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    arena = FlatArena.from_module(m)
    after = m.state_dict()
    assert list(before) == list(after)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    g = arena.group
    for p, seg in zip(g.params, g.table):
        assert p.data_ptr() == g.flat[seg.offset :].data_ptr()
        assert seg.offset % ARENA_ALIGN == 0


def test_tied_counted_once_frozen_and_buffers_left_alone():
    m = Tiny()
    arena = FlatArena.from_module(m)
    names = [s.name for s in arena.group.table]
    assert "emb.weight" in names and "head.weight" not in names
    assert arena.group.segment("head.weight").name == "emb.weight"
    assert not any(n.startswith("frozen") for n in names)
    expected = sum(
        p.numel() for p in {id(p): p for p in m.parameters() if p.requires_grad}.values()
    )
    assert arena.param_numel == expected
    assert m.running.data_ptr() != arena.group.flat.data_ptr()


def test_forward_backward_unchanged():
    torch.manual_seed(0)
    m1 = Tiny()
    m2 = Tiny()
    m2.load_state_dict(m1.state_dict())
    FlatArena.from_module(m2)
    idx = torch.randint(0, 11, (3, 4))
    m1(idx).backward()
    m2(idx).backward()
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        if p1.grad is not None:
            assert torch.equal(p1.grad, p2.grad), n


def test_writing_the_flat_buffer_moves_the_parameters():
    m = Tiny()
    arena = FlatArena.from_module(m)
    arena.group.flat.add_(1.0)
    seg = arena.group.segment("lin.bias")
    assert torch.equal(m.lin.bias.detach(), arena.group.flat[seg.offset : seg.end])


def test_state_buffers_have_the_layout_and_foreign_ones_are_rejected():
    a1 = FlatArena.from_module(Tiny())
    a2 = FlatArena.from_module(nn.Linear(3, 3))
    st = a1.group.new_state(torch.float32)
    assert st.numel() == a1.group.numel and st.dtype == torch.float32
    views = a1.group.views(st)
    assert [tuple(v.shape) for v in views] == [s.shape for s in a1.group.table]
    with pytest.raises(ArenaError, match="does not belong to this arena"):
        a2.group.views(st)
    m = Tiny()
    with pytest.raises(ArenaError, match="another module"):
        a1.check_module(m)


def test_mixed_dtypes_make_groups_and_no_params_is_an_error():
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3).to(torch.float64))
    arena = FlatArena.from_module(m)
    assert len(arena.groups) == 2
    with pytest.raises(ArenaError, match="2 groups"):
        _ = arena.group
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ArenaError, match="no trainable parameters"):
        FlatArena.from_module(frozen)


def test_group_from_params_views_and_rejects_mixed_lists():
    from hybrid_triton.arena import ArenaGroup

    a, b = nn.Linear(3, 4), nn.Linear(4, 2)
    params = [a.weight, b.bias]
    before = [p.detach().clone() for p in params]
    group = ArenaGroup.from_params(params, [["a.weight"], ["b.bias"]])
    for p, seg, old in zip(params, group.table, before):
        assert torch.equal(p.detach(), old)
        assert p.data_ptr() == group.flat[seg.offset :].data_ptr()
    assert group.segment("b.bias").numel == 2
    with pytest.raises(ArenaError, match="mix dtypes"):
        ArenaGroup.from_params([a.weight, nn.Linear(2, 2).double().weight])
    with pytest.raises(ArenaError, match="no parameters"):
        ArenaGroup.from_params([])
