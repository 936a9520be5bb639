"""Layout ops: every apply is a zero-copy view, every reverse rebuilds the input exactly."""

from __future__ import annotations

import pytest
import torch

from moe_unfuse.base.layout import Layout, Split, Transpose, Unbind, Unflatten, layout_for


def shares_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


@pytest.mark.parametrize(
    "op, x",
    [
        (Transpose(1, 2), torch.randn(3, 4, 5)),
        (Unflatten(0, (3, -1)), torch.randn(12, 5)),
    ],
)
def test_shape_ops_are_views_and_reverse_exactly(op, x):
    y = op.apply(x)
    assert shares_storage(y, x)
    assert torch.equal(op.reverse(y), x)


@pytest.mark.parametrize("packing", ["concatenated", "interleaved"])
def test_split_views_and_reverse(packing):
    x = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    gate, up = Split(1, 2, packing).apply(x)
    assert shares_storage(gate, x) and shares_storage(up, x)
    if packing == "concatenated":
        assert torch.equal(gate, x[:, :3]) and torch.equal(up, x[:, 3:])
    else:
        assert torch.equal(gate, x[:, ::2]) and torch.equal(up, x[:, 1::2])
    assert torch.equal(Split(1, 2, packing).reverse([gate, up]), x)


def test_split_reports_indivisible_axis():
    assert Split(1, 2).check(7) is not None and Split(1, 2).check(8) is None


def test_unbind_reverse():
    x = torch.randn(4, 3, 2)
    parts = Unbind(0).apply(x)
    assert len(parts) == 4 and all(shares_storage(p, x) for p in parts)
    assert torch.equal(Unbind(0).reverse(parts), x)


@pytest.mark.parametrize(
    "axes, shape, packing, expect_gate",
    [
        (("expert", "out", "in"), (4, 10, 6), "concatenated", lambda t, e: t[e, :5, :]),
        (("expert", "in", "out"), (4, 6, 10), "concatenated", lambda t, e: t[e, :, :5].T),
        (("expert", "in", "out"), (4, 6, 10), "interleaved", lambda t, e: t[e, :, ::2].T),
        (("expert*out", "in"), (40, 6), "concatenated", lambda t, e: t.view(4, 10, 6)[e, :5]),
        (("expert*in", "out"), (40, 6), "concatenated", lambda t, e: t.view(4, 10, 6)[e].T[:3]),
    ],
)
def test_layout_round_trip(axes, shape, packing, expect_gate):
    fused = torch.randn(*shape)
    layout = layout_for(axes, 2, packing, {"expert": 4})
    parts = layout.unfuse(fused)
    assert len(parts) == 2 and len(parts[0]) == 4
    for e in range(4):
        assert torch.equal(parts[0][e], expect_gate(fused, e))
        assert shares_storage(parts[0][e], fused)
    assert layout.aliases(fused, parts)
    copies = [[t.clone() for t in part] for part in parts]
    assert not layout.aliases(fused, copies)
    rebuilt = layout.refuse(copies)
    assert torch.equal(rebuilt, fused) and rebuilt.shape == fused.shape and rebuilt.is_contiguous()


def test_layout_rejects_unknown_axes():
    with pytest.raises(ValueError):
        layout_for(("out", "expert", "in"), 1, "concatenated")
    assert isinstance(layout_for(("expert", "out", "in"), 1, "concatenated"), Layout)
