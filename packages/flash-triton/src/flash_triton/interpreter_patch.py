"""Four fixes for Triton's CPU interpreter (``TRITON_INTERPRET=1``), seen in Triton 3.6.0 and 3.9.0.

1. **bfloat16 ``tl.dot``.** The interpreter stores bfloat16 tensors as their raw ``uint16`` bit
   patterns (numpy has no bfloat16). ``InterpreterBuilder.create_dot``
   (``triton/runtime/interpreter.py``) converts only 8-bit float operands before ``np.matmul``,
   so a bf16 dot multiplies the bit patterns as integers: the result is garbage. fp16 and fp32
   operands are unaffected. The fix widens bfloat16 operands to float32 before the product. The
   widening is exact (a bfloat16 is the top half of the float32 with the same value), so the
   patched dot computes what the GPU's bf16 x bf16 -> fp32 dot computes, up to summation order.

2. **Loop bounds under numpy >= 2.4.** ``tl.program_id`` yields a one-element 1-D array, and the
   interpreter turns a tensor used as a ``range`` bound into an int with ``int(array)``, which
   numpy 2.4 refuses for arrays that are not 0-D ("only 0-dimensional arrays can be converted to
   Python scalars"; triton-lang/triton#9171, fixed upstream after 3.6 by squeezing the array).
   Any loop whose bounds depend on the program id fails. The fix makes the patched
   ``tensor.__index__`` take the single element with ``.item()``, which every numpy accepts.

3. **float32 -> bfloat16 rounding.** ``x.to(tl.bfloat16)`` rounds to nearest even on the GPU
   (Triton's default for narrowing float casts), but the interpreter's ``create_fp_trunc`` drops
   the low 16 bits (rounds toward zero). Every P tile a kernel feeds to a bf16 dot is then biased
   low, so interpreter results are visibly less accurate than the GPU's. The fix rounds to
   nearest even with the usual integer trick (NaN stays NaN, overflow goes to infinity).

4. **float -> fp8 rounding.** ``create_fp_to_fp`` (``_convert_float``) rounds a narrowing cast to
   fp8 by adding one to the truncated mantissa when the first dropped bit is set, without carrying
   into the exponent: a value that rounds up across a power of two (1.96 -> 2 in e4m3) comes out
   as half of it (1.0), and values past the largest finite fp8 are not saturated. The GPU rounds
   to nearest even and saturates to the largest finite value (``cvt.rn.satfinite``). The fix casts
   through torch's float8 types, which round to nearest even, after the same saturation.

:func:`apply` installs all four, once, only when flash-triton runs its kernels under the
interpreter. Each fix leaves the interpreter alone where it is not needed (a bf16 operand that
no longer arrives as ``uint16``; a 0-D array converts the same either way).
"""

from __future__ import annotations

import functools

import numpy as np

_MARK = "_flash_triton_bf16_dot_fix"


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact widening of bfloat16 bit patterns (uint16) to float32 values."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _widen(handle, tl):
    if handle.dtype == tl.bfloat16 and handle.data.dtype == np.uint16:
        return type(handle)(bf16_bits_to_float32(handle.data), tl.float32)
    return handle


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as uint16 bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    quiet_nan = ((bits >> 16) | 0x0040).astype(np.uint16)
    return np.where(np.isnan(values), quiet_nan, rounded)


def _fp8_torch_dtype(tl, dtype):
    import torch

    return {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}.get(dtype)


def float_to_fp8_bits(values: np.ndarray, torch_dtype) -> np.ndarray:
    """float32 values rounded to nearest even in ``torch_dtype`` (an fp8 type), saturated to its largest
    finite value as the GPU's ``satfinite`` conversion does (NaN stays NaN), as uint8 bit patterns."""
    import torch

    wide = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    top = torch.finfo(torch_dtype).max
    wide = torch.where(torch.isnan(wide), wide, wide.clamp(-top, top))
    return wide.to(torch_dtype).view(torch.uint8).numpy()


def _widen_to_float32(handle, tl) -> np.ndarray:
    if handle.dtype.scalar == tl.bfloat16:
        return bf16_bits_to_float32(handle.data)
    return handle.data.astype(np.float32)


def _index(self) -> int:
    return int(self.handle.data.item())


def apply() -> bool:
    """Install the four fixes (once). Returns True when they are in place."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original_dot = builder.create_dot
    if not getattr(original_dot, _MARK, False):

        @functools.wraps(original_dot)
        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            return original_dot(self, _widen(a, tl), _widen(b, tl), d, input_precision, max_num_imprecise_acc)

        setattr(create_dot, _MARK, True)
        builder.create_dot = create_dot

    original_trunc = builder.create_fp_trunc
    if not getattr(original_trunc, _MARK, False):

        @functools.wraps(original_trunc)
        def create_fp_trunc(self, src, dst_type):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                return type(src)(float32_to_bf16_bits(src.data), tl.bfloat16)
            return original_trunc(self, src, dst_type)

        setattr(create_fp_trunc, _MARK, True)
        builder.create_fp_trunc = create_fp_trunc

    original_fp_to_fp = builder.create_fp_to_fp
    if not getattr(original_fp_to_fp, _MARK, False):

        @functools.wraps(original_fp_to_fp)
        def create_fp_to_fp(self, src, dst_type, rounding_mode):
            target = _fp8_torch_dtype(tl, dst_type.scalar)
            wide = src.dtype.scalar in (tl.float32, tl.float16, tl.bfloat16)
            if target is not None and wide and rounding_mode in (None, interpreter._ir.ROUNDING_MODE.RTNE):
                return type(src)(float_to_fp8_bits(_widen_to_float32(src, tl), target), dst_type.scalar)
            return original_fp_to_fp(self, src, dst_type, rounding_mode)

        setattr(create_fp_to_fp, _MARK, True)
        builder.create_fp_to_fp = create_fp_to_fp

    original_patch = interpreter._patch_lang_tensor
    if not getattr(original_patch, _MARK, False):

        @functools.wraps(original_patch)
        def patch_lang_tensor(tensor, scope):
            original_patch(tensor, scope)
            scope.set_attr(tensor, "__index__", _index)  # restored with the interpreter's own patches

        setattr(patch_lang_tensor, _MARK, True)
        interpreter._patch_lang_tensor = patch_lang_tensor
    return is_applied()


def is_applied() -> bool:
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    patched = (builder.create_dot, builder.create_fp_trunc, builder.create_fp_to_fp, interpreter._patch_lang_tensor)
    return all(getattr(fn, _MARK, False) for fn in patched)
