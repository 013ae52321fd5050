"""benchmarks.timing: the machine's GEMM limit is the fastest provider of each round."""

import pytest
import torch

from benchmarks.timing import ONEDNN_DTYPES, WIDENED_DTYPES, Timings, limit_candidates, limit_gflops


def test_limit_is_the_fastest_provider_of_each_round():
    timings = Timings({"matmul": [2.0, 1.0, 4.0], "onednn": [1.0, 2.0, 8.0], "model": [9.0, 9.0, 9.0]})
    assert limit_gflops(timings, ["matmul", "onednn"], 8e9) == [8.0, 8.0, 2.0]
    assert limit_gflops(timings, ["matmul"], 8e9) == [4.0, 8.0, 2.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
def test_every_cpu_provider_computes_the_same_product(dtype):
    candidates, flops = limit_candidates(size=64, dtype=dtype)
    assert flops == 2 * 64**3
    expected_providers = {"matmul"}
    if dtype in ONEDNN_DTYPES and torch.backends.mkldnn.is_available():
        expected_providers.add("onednn")
    if dtype in WIDENED_DTYPES:
        expected_providers.add("float32")  # the product widened to float32, rounded back
    assert set(candidates) == expected_providers
    products = [call().clone() for call in candidates.values()]
    assert all(product.dtype == dtype for product in products)
    if dtype in WIDENED_DTYPES:
        # Every provider accumulates in float32 and rounds once: about one unit in the last
        # place of dtype apart (64-term sums of products of magnitude about 1).
        for product in products[1:]:
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(product, products[0], rtol=eps, atol=8 * eps)
        return
    for product in products[1:]:
        torch.testing.assert_close(product, products[0], rtol=1e-5, atol=1e-4)
