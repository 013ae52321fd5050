"""benchmarks.profile: op names land in the right groups, and shares add up."""

from __future__ import annotations

import pytest

from benchmarks.profile import group_of, shares


@pytest.mark.parametrize(
    "name, group",
    [
        ("aten::addmm", "GEMM"),
        ("aten::addmm_", "GEMM"),
        ("aten::mm", "GEMM"),
        ("mkldnn::_linear_pointwise", "GEMM"),
        ("xclip_ext::frame_attention", "attention"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::native_layer_norm", "LayerNorm"),
        ("aten::copy_", "copies, casts, allocation"),
        ("aten::_to_copy", "copies, casts, allocation"),
        ("aten::silu_", "elementwise"),
        ("aten::add", "elementwise"),
        ("aten::some_new_op", "other"),
    ],
)
def test_group_of(name, group):
    assert group_of(name) == group


def test_shares_sum_to_one_largest_first():
    rows = shares({"aten::addmm": 3.0, "mkldnn::_linear_pointwise": 3.0, "aten::native_layer_norm": 1.0,
                   "aten::add": 2.0})
    assert [row[0] for row in rows] == ["GEMM", "elementwise", "LayerNorm"]
    assert rows[0][1] == 6.0
    assert sum(row[2] for row in rows) == pytest.approx(1.0)
    assert shares({}) == []
