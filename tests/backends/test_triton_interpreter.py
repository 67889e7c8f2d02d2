"""The fixes flash-triton applies to Triton's CPU interpreter (:mod:`flash_triton.interpreter_patch`).

Each test runs a tiny kernel under ``TRITON_INTERPRET=1``. Where the Triton in use still has the bug,
a test also shows it on the unpatched interpreter, so the day an upgrade fixes it upstream the test
says so (it then skips that half) instead of silently keeping a patch nobody needs.
"""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from flash_triton import interpreter_patch, runtime

KERNELS = """
import triton
import triton.language as tl


@triton.jit
def dot_kernel(A, B, C, N: tl.constexpr):
    offs = tl.arange(0, N)
    a = tl.load(A + offs[:, None] * N + offs[None, :])
    b = tl.load(B + offs[:, None] * N + offs[None, :])
    tl.store(C + offs[:, None] * N + offs[None, :], tl.dot(a, b))


@triton.jit
def loop_kernel(Out, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    total = 0
    for i in range(0, pid * BLOCK + 1, BLOCK):  # bounds that depend on the program id
        total += 1
    tl.store(Out + pid, total)


@triton.jit
def cast_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, tl.load(X + offs).to(tl.bfloat16))


@triton.jit
def narrow_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, tl.load(X + offs).to(Y.dtype.element_ty))
"""


@pytest.fixture
def interpreted(monkeypatch: pytest.MonkeyPatch, tmp_path) -> types.ModuleType:
    """The kernels above, decorated under TRITON_INTERPRET=1 (a fresh module per test)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    path = tmp_path / "interp_kernels.py"
    path.write_text(KERNELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("interp_kernels", None)
    module = importlib.import_module("interp_kernels")
    yield module
    sys.modules.pop("interp_kernels", None)


@pytest.fixture
def unpatched(monkeypatch: pytest.MonkeyPatch):
    """The interpreter as Triton ships it, for the duration of a test."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    patched = ((builder, "create_dot"), (builder, "create_fp_trunc"), (builder, "create_fp_to_fp"),
               (interpreter, "_patch_lang_tensor"))  # fmt: skip
    for owner, name in patched:
        current = getattr(owner, name)
        monkeypatch.setattr(owner, name, getattr(current, "__wrapped__", current))
    assert not interpreter_patch.is_applied()


def test_apply_is_idempotent_and_reports() -> None:
    assert interpreter_patch.apply()
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot
    assert interpreter_patch.apply()
    assert interpreter.InterpreterBuilder.create_dot is dot
    assert interpreter_patch.is_applied()


def test_bf16_widening_is_exact() -> None:
    values = torch.randn(1000).to(torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(interpreter_patch.bf16_bits_to_float32(bits), values.float().numpy())


def test_rounding_matches_torch_round_to_nearest_even() -> None:
    x = torch.cat([torch.randn(10000) * 100, torch.tensor([float("inf"), -float("inf"), 3.4e38, 1e-40, 0.0])])
    ours = torch.from_numpy(interpreter_patch.float32_to_bf16_bits(x.numpy()).view(np.int16)).view(torch.bfloat16)
    assert torch.equal(ours, x.to(torch.bfloat16))
    nan = interpreter_patch.float32_to_bf16_bits(np.array([np.nan], dtype=np.float32))
    assert np.isnan(nan.view(np.uint16).astype(np.uint32).__lshift__(16).view(np.float32)).all()


def _dot(module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=gen).to(dtype) for _ in range(2))
    c = torch.empty(16, 16, dtype=torch.float32)
    module.dot_kernel[(1,)](a, b, c, N=16)
    return c, a.double() @ b.double()


def test_bf16_dot_is_right_once_patched(interpreted) -> None:
    interpreter_patch.apply()
    got, want = _dot(interpreted, torch.bfloat16)
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-5)


def test_bf16_dot_bug_on_the_unpatched_interpreter(interpreted, unpatched) -> None:
    got, want = _dot(interpreted, torch.bfloat16)
    if torch.allclose(got.double(), want, atol=1e-4, rtol=1e-5):
        pytest.skip("this Triton's interpreter computes bf16 dots correctly: the patch is no longer needed")
    fp16, fp16_want = _dot(interpreted, torch.float16)  # fp16 never had the problem
    assert torch.allclose(fp16.double(), fp16_want, atol=1e-2)


def test_loop_bounds_from_program_id(interpreted) -> None:
    interpreter_patch.apply()
    out = torch.zeros(4, dtype=torch.int32)
    interpreted.loop_kernel[(4,)](out, BLOCK=2)
    assert out.tolist() == [1, 2, 3, 4]


def test_loop_bounds_bug_on_the_unpatched_interpreter(interpreted, unpatched) -> None:
    out = torch.zeros(4, dtype=torch.int32)
    try:
        interpreted.loop_kernel[(4,)](out, BLOCK=2)
    except Exception as error:
        assert "0-dimensional" in str(error)
    else:
        pytest.skip("this Triton/numpy pair converts program-id loop bounds: the patch is no longer needed")


def test_bf16_cast_rounds_to_nearest_even(interpreted) -> None:
    interpreter_patch.apply()
    x = torch.randn(64) * 3
    y = torch.empty(64, dtype=torch.bfloat16)
    interpreted.cast_kernel[(1,)](x, y, N=64)
    assert torch.equal(y, x.to(torch.bfloat16))


FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _narrow(module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3)) * 3
    x[:4] = torch.tensor([1e6, -1e6, 1.96, -1.96])  # saturated; rounded up across a power of two
    y = torch.empty(4096, dtype=dtype)
    module.narrow_kernel[(1,)](x, y, N=4096)
    top = torch.finfo(dtype).max
    return y.float(), x.clamp(-top, top).to(dtype).float()


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_fp8_cast_rounds_to_nearest_even_and_saturates(interpreted, dtype: torch.dtype) -> None:
    interpreter_patch.apply()
    got, want = _narrow(interpreted, dtype)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_fp8_cast_bug_on_the_unpatched_interpreter(interpreted, unpatched, dtype: torch.dtype) -> None:
    got, want = _narrow(interpreted, dtype)
    if torch.equal(got, want):
        pytest.skip("this Triton's interpreter rounds fp8 casts correctly: the patch is no longer needed")
    assert got[2] == 1.0 and want[2] == 2.0  # the carry into the exponent is lost


def test_kernels_are_redecorated_when_the_mode_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels = runtime.kernels()
    assert kernels.forward.INTERPRETED and kernels.backward.INTERPRETED and kernels.decode.INTERPRETED
    assert type(kernels.forward.attention_forward_kernel).__name__ == "InterpretedFunction"
    assert interpreter_patch.is_applied()
    monkeypatch.delenv("TRITON_INTERPRET")
    kernels = runtime.kernels()
    assert not kernels.forward.INTERPRETED
    assert type(kernels.forward.attention_forward_kernel).__name__ == "JITFunction"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert runtime.kernels().backward.INTERPRETED
