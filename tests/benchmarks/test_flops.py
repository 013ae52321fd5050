"""The analytic MAC count: the paper's column, the JSON interface, and FlopCounterMode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import xclip
import xclip_kernels as xk
from xclip_kernels import gemm
from benchmarks.flops import PAPER_ROWS, paper_table, xclip_macs
from xclip_kernels.flop_formulas import frame_attention_flops, message_attention_backward_flops, message_attention_flops

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_paper_column_within_one_percent():
    table = paper_table()
    assert set(table) == set(PAPER_ROWS)
    for key, paper in PAPER_ROWS.items():
        assert abs(table[key] - paper) / paper < 0.01, (key, table[key], paper)


def test_json_interface():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.flops", "--json"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    table = json.loads(result.stdout)
    for key in ["xclip-b32-8f", "xclip-b32-16f", "xclip-b16-8f", "xclip-b16-16f", "xclip-b16-32f",
                "xclip-l14-8f", "xclip-l14-336-16f"]:
        assert isinstance(table[key], float) and table[key] > 0


def _uncounted_cpu_sdpa_macs(config: xclip.XCLIPConfig, text_tokens: int) -> int:
    """torch's counter has no formula for the CPU SDPA kernel: the text, MIT and prompt attentions."""
    text = config.text_layers * 2 * text_tokens * text_tokens * config.text_width
    mit = config.mit_layers * 2 * config.num_frames**2 * config.embed_dim
    prompts = config.prompt_layers * 2 * config.grid_size**2 * config.embed_dim
    return text + mit + prompts


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize(("grad", "gemm_provider"), [(False, "matmul"), (False, "onednn"), (True, None)],
                         ids=["inference-matmul", "inference-onednn", "training"])
def test_flop_counter_on_the_real_model_matches_the_executed_count(backend, grad, gemm_provider):
    """Every GEMM route is counted: which provider inference takes is measured per machine, so
    each is forced in turn (training GEMMs always take matmul)."""
    if xk.get_backend(backend).unavailable_reasons():
        pytest.skip(f"{backend}: {xk.get_backend(backend).unavailable_reasons()}")
    if gemm_provider == "onednn" and not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN linear op")
    torch.manual_seed(0)
    model = xclip.build_model("xclip-b32", backend=backend).eval()
    text = xclip.tokenize(["playing basketball"])
    video = torch.randn(1, 8, 3, 224, 224)
    gemm.set_provider(gemm_provider)
    try:
        with torch.no_grad():
            model(video, text)  # loads the backend (and registers its formulas) before counting
        tokens = int(text.argmax()) + 1
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
            model(video, text)
    finally:
        gemm.set_provider(None)
        gemm.clear()
    counted = counter.get_total_flops() // 2
    expected = xclip_macs(model.config, executed=True, text_tokens=tokens)["total"]
    assert counted + _uncounted_cpu_sdpa_macs(model.config, tokens) == expected


def test_executed_count_is_below_the_official_one():
    config = xclip.VARIANTS["xclip-b16"]
    official = xclip_macs(config)["total"]
    executed = xclip_macs(config, executed=True)["total"]
    # No message query row and the patch projection after the temporal mean: about 1% less.
    assert 0.97 * official < executed < official


def test_custom_op_formulas_are_what_the_counter_reports():
    if xk.get_backend("cpp").unavailable_reasons():
        pytest.skip("cpp extension not built")
    q, k, v = torch.randn(2, 50, 3, 4, 64).unbind(2)
    msg_k, msg_v = torch.randn(2, 4, 64), torch.randn(2, 4, 64)
    xk.frame_attention(q, k, v, msg_k, msg_v, backend="cpp")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, msg_k, msg_v)]
    with FlopCounterMode(display=False) as counter:
        out = xk.frame_attention(*leaves, backend="cpp")
        out.sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts["xclip_ext.frame_attention"] == frame_attention_flops(q.shape) == 4 * 2 * 4 * 50 * 51 * 64
    assert counts["xclip_ext.frame_attention_backward"] == frame_attention_flops(q.shape) * 5 // 2
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            messages = [torch.randn(16, 128), torch.ones(128), torch.zeros(128), torch.randn(384, 128),
                        torch.zeros(384), torch.randn(128, 128), torch.zeros(128)]
            xk.message_attention(*messages, num_frames=8, num_heads=2, backend="cpp")
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts["xclip_ext.message_attention"] == message_attention_flops((16, 128), 8, 2)
    with FlopCounterMode(display=False) as counter:
        leaves = [t.requires_grad_(True) for t in messages]
        xk.message_attention(*leaves, num_frames=8, num_heads=2, backend="cpp").sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    forward = message_attention_flops((16, 128), 8, 2)
    assert counts["xclip_ext.message_attention_backward"] == message_attention_backward_flops((16, 128), 8, 2)
    assert message_attention_backward_flops((16, 128), 8, 2) == 2 * forward + 2 * 16 * 128 * 384 + 4 * 16 * 8 * 128


def test_prepacked_onednn_linear_is_counted_like_linear():
    if not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN linear op")
    import xclip_kernels.fused  # noqa: F401  (registers the GEMM formulas)

    x, residual = torch.randn(2, 5, 48), torch.randn(2, 5, 32)
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(32, 48), None)
    bias = torch.randn(32)
    with FlopCounterMode(display=False) as plain:
        torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    with FlopCounterMode(display=False) as with_residual:
        torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")
    assert plain.get_total_flops() == with_residual.get_total_flops() == 2 * 10 * 48 * 32


def test_flop_counter_under_fake_tensors_matches_the_executed_count():
    """FLOPs counted without running (FakeTensorMode, as torch's counter documents): all 77
    text positions (the end token cannot be read from fake data, so none are skipped)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    model = xclip.build_model("xclip-b32").eval()
    text = xclip.tokenize(["playing basketball"])
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
        video = fake_mode.from_tensor(torch.empty(1, 8, 3, 224, 224))
        with FlopCounterMode(display=False) as counter:
            model(video, text)
    counted = counter.get_total_flops() // 2
    tokens = model.config.context_length
    expected = xclip_macs(model.config, executed=True, text_tokens=tokens)["total"]
    assert counted + _uncounted_cpu_sdpa_macs(model.config, tokens) == expected


def test_first_forward_of_a_fresh_process_counts_the_attention_ops():
    """FlopCounterMode reads the FLOP formulas when it is entered; building the model loads the
    automatic backend (and so registers its formulas), so a counter around the very first
    forward of a process counts our attention ops too."""
    if xk.get_backend("cpp").unavailable_reasons():
        pytest.skip(f"cpp: {xk.get_backend('cpp').unavailable_reasons()}")
    code = (
        "import torch, xclip\n"
        "from torch.utils.flop_counter import FlopCounterMode\n"
        "tiny = xclip.XCLIPConfig(image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=2,"
        " embed_dim=64, text_width=64, text_layers=1, text_heads=1, num_frames=3, mit_heads=1, prompt_heads=1)\n"
        "model = xclip.build_model(tiny).eval()\n"
        "with torch.no_grad(), FlopCounterMode(display=False) as counter:\n"
        "    model(torch.randn(1, 3, 3, 32, 32), xclip.tokenize(['a']))\n"
        "print(sorted(str(op) for op in counter.get_flop_counts()['Global']))\n"
    )
    env = {name: value for name, value in os.environ.items() if name != "XCLIP_KERNELS_BACKEND"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "xclip_ext.frame_attention" in result.stdout and "xclip_ext.message_attention" in result.stdout, result.stdout
