"""The CUDA driver through ctypes: TMA tensor maps and kernel launches with by-value struct arguments.

``cuTensorMapEncodeTiled`` builds the 128-byte descriptor that the Hopper kernel's TMA loads read;
``cuLaunchKernel`` passes it by value (a ``__grid_constant__`` parameter), which CuPy's kernel call
cannot. Only ``libcuda`` is needed (the driver that torch and CuPy already loaded in this process);
nothing here imports CuPy or torch.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import threading
from collections.abc import Sequence

#: CUtensorMapDataType values (cuda.h); fp8 tensors move as bytes.
DATA_TYPES = {"u8": 0, "fp16": 6, "bf16": 9}
ELEMENT_BYTES = {"u8": 1, "fp16": 2, "bf16": 2}
#: CUtensorMapSwizzle values by swizzle span in bytes.
SWIZZLES = {0: 0, 32: 1, 64: 2, 128: 3}
#: CUtensorMapL2promotion values by promotion size in bytes.
L2_PROMOTIONS = {0: 0, 64: 1, 128: 2, 256: 3}
MAX_RANK = 5
MAX_BOX = 256
MAX_STRIDE = 1 << 40
#: CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
MAX_DYNAMIC_SHARED = 8


class TensorMap(ctypes.Array):
    """The 128-byte descriptor (CUtensorMap), passed to the kernel by value."""

    _type_ = ctypes.c_uint64
    _length_ = 16


class DriverError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the driver's error."""


@functools.cache
def driver() -> ctypes.CDLL:
    """libcuda, with the argument types of the calls used here."""
    last: OSError | None = None
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as error:
            last = error
    else:
        raise DriverError(f"libcuda not loadable ({last}); is an NVIDIA driver installed?")
    u32p, u64p, vp = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p
    lib.cuTensorMapEncodeTiled.argtypes = [
        vp, ctypes.c_int, ctypes.c_uint32, vp, u64p, u64p, u32p, u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_int,
    ]  # fmt: skip
    lib.cuLaunchKernel.argtypes = [
        vp, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
        vp, ctypes.POINTER(vp), ctypes.POINTER(vp),
    ]  # fmt: skip
    lib.cuFuncSetAttribute.argtypes = [vp, ctypes.c_int, ctypes.c_int]
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    if hasattr(lib, "cuFuncGetParamInfo"):  # drivers of CUDA 12.4 and newer
        sizep = ctypes.POINTER(ctypes.c_size_t)
        lib.cuFuncGetParamInfo.argtypes = [vp, ctypes.c_size_t, sizep, sizep]
    return lib


def _check(code: int, what: str) -> None:
    if code:
        name = ctypes.c_char_p()
        driver().cuGetErrorName(code, ctypes.byref(name))
        raise DriverError(f"{what} failed: {name.value.decode() if name.value else code}")


def encode_tiled(
    address: int,
    dtype: str,
    dims: Sequence[int],
    strides: Sequence[int],
    box: Sequence[int],
    swizzle: int,
    l2_promotion: int = 256,
) -> TensorMap:
    """A tiled tensor map: ``dims`` innermost first, ``strides`` in bytes of dims 1.. (dim 0 is
    contiguous), ``box`` the tile one TMA load moves, ``swizzle`` its shared-memory swizzle span in
    bytes. Out-of-bounds elements load as zeros."""
    rank = len(dims)
    problems = tensor_map_problems(address, dims, strides, box, swizzle, element_bytes=ELEMENT_BYTES[dtype])
    if problems:
        raise DriverError("cuTensorMapEncodeTiled would reject this tensor: " + "; ".join(problems))
    out = TensorMap()
    c_dims = (ctypes.c_uint64 * rank)(*dims)
    c_strides = (ctypes.c_uint64 * max(1, rank - 1))(*strides)
    c_box = (ctypes.c_uint32 * rank)(*box)
    c_steps = (ctypes.c_uint32 * rank)(*([1] * rank))
    code = driver().cuTensorMapEncodeTiled(
        ctypes.byref(out), DATA_TYPES[dtype], rank, ctypes.c_void_p(address), c_dims, c_strides, c_box, c_steps,
        0, SWIZZLES[swizzle], L2_PROMOTIONS[l2_promotion], 0,
    )  # fmt: skip
    _check(code, f"cuTensorMapEncodeTiled(dims={list(dims)}, strides={list(strides)}, box={list(box)})")
    return out


def tensor_map_problems(
    address: int, dims: Sequence[int], strides: Sequence[int], box: Sequence[int], swizzle: int, element_bytes: int
) -> list[str]:
    """What the driver's documented limits say against a tiled tensor map (empty if none)."""
    problems = []
    if not 1 <= len(dims) <= MAX_RANK or len(box) != len(dims) or len(strides) != len(dims) - 1:
        problems.append(f"rank {len(dims)}: dims, strides and box disagree or exceed {MAX_RANK}")
    if address % 16:
        problems.append("base address not 16-byte aligned")
    if any(not 1 <= d <= 2**32 for d in dims):
        problems.append(f"dims {list(dims)} outside [1, 2^32]")
    if any(s % 16 or not 0 < s < MAX_STRIDE for s in strides):
        problems.append(f"strides {list(strides)} bytes: each must be a positive multiple of 16 below 2^40")
    if any(not 1 <= b <= MAX_BOX for b in box):
        problems.append(f"box {list(box)} outside [1, {MAX_BOX}]")
    if box and (box[0] * element_bytes) % 16:
        problems.append("box rows not a multiple of 16 bytes")
    if swizzle and box and box[0] * element_bytes > swizzle:
        problems.append(f"box rows of {box[0] * element_bytes} bytes exceed the {swizzle}-byte swizzle")
    return problems


def set_max_dynamic_shared(function: int, nbytes: int) -> None:
    _check(
        driver().cuFuncSetAttribute(ctypes.c_void_p(function), MAX_DYNAMIC_SHARED, nbytes),
        f"cuFuncSetAttribute(max dynamic shared memory = {nbytes})",
    )


#: Parameter kinds of :class:`ParamLayout`: (struct code, bytes).
PARAM_KINDS = {"map": ("128s", 128), "ptr": ("Q", 8), "i64": ("q", 8), "i32": ("i", 4), "f32": ("f", 4)}


class ParamLayout:
    """A kernel's parameters, in order, packed back to back by one ``struct`` format: ``kinds`` are
    :data:`PARAM_KINDS` names (a tensor map's value is its 128 bytes). The buffer is the host's copy
    only: the driver reads each value through its own pointer and places it where the kernel wants it."""

    def __init__(self, kinds: Sequence[str]) -> None:
        self.kinds = tuple(kinds)
        self.format = struct.Struct("<" + "".join(PARAM_KINDS[kind][0] for kind in kinds))
        self.sizes = [PARAM_KINDS[kind][1] for kind in kinds]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(kinds))]
        self.size = self.format.size


class PackedLaunch:
    """Launches of one kernel whose parameters a :class:`ParamLayout` packs into a buffer that
    ``cuLaunchKernel`` reads through a pointer array made once per thread: a launch costs one
    ``pack_into`` and one driver call, not a ctypes object per parameter. Where the driver can say
    (``cuFuncGetParamInfo``, CUDA 12.4+), the parameters' sizes are checked against the compiled
    kernel's, once.
    """

    def __init__(self, function: int, layout: ParamLayout) -> None:
        self.function = function
        self.layout = layout
        self._local = threading.local()
        self._check_layout()

    def _check_layout(self) -> None:
        """The kernel's parameters have the sizes the layout packs. (The driver reads each value through
        its own pointer and places it at the kernel's offset, which need not be the buffer's: the
        kernel's first tensor map sits at offset 48 on an H200.) Whether the kernel takes more
        parameters is not asked here: the driver answers a parameter index past the end with an
        error, which compute-sanitizer reports; the CPU tier checks the count against the kernels'
        C signatures."""
        lib, sizes = driver(), self.layout.sizes
        if not hasattr(lib, "cuFuncGetParamInfo"):
            return
        offset, size = ctypes.c_size_t(), ctypes.c_size_t()
        function = ctypes.c_void_p(self.function)
        for index, want in enumerate(sizes):
            _check(lib.cuFuncGetParamInfo(function, index, ctypes.byref(offset), ctypes.byref(size)),
                   f"cuFuncGetParamInfo(parameter {index})")  # fmt: skip
            if size.value != want:
                raise DriverError(f"kernel parameter {index} is {size.value} bytes; the launch packs {want}")

    def _slot(self) -> tuple[ctypes.Array, ctypes.Array]:
        """This thread's parameter buffer and the pointer array into it (cuLaunchKernel copies the
        values before it returns, so one buffer per thread serves every launch)."""
        slot = getattr(self._local, "slot", None)
        if slot is None:
            buffer = (ctypes.c_char * self.layout.size)()
            base = ctypes.addressof(buffer)
            params = (ctypes.c_void_p * len(self.layout.offsets))(*[base + off for off in self.layout.offsets])
            slot = self._local.slot = (buffer, params)
        return slot

    def __call__(self, grid: int, block: int, smem: int, stream: int, values: Sequence[object]) -> None:
        """One launch of a 1-D grid on ``stream`` in the current context; ``values`` in parameter order."""
        buffer, params = self._slot()
        self.layout.format.pack_into(buffer, 0, *values)
        code = driver().cuLaunchKernel(self.function, grid, 1, 1, block, 1, 1, smem, stream, params, None)
        if code:
            _check(code, f"cuLaunchKernel(grid={grid}, block={block}, smem={smem}; is the kernel's device current?)")


@functools.lru_cache(maxsize=256)
def packed_launch(function: int, layout: ParamLayout) -> PackedLaunch:
    """The :class:`PackedLaunch` of a kernel (its parameters checked once per function and layout)."""
    return PackedLaunch(function, layout)
