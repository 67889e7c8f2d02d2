"""The parameter kinds (flash_cuda.tensor_map.PARAM_KINDS) of a CUDA kernel, read off its C signature:
the launch code's parameter lists are checked against the kernels' own."""

from __future__ import annotations

C_KINDS = {"TensorMap": "map", "*": "ptr", "i64": "i64", "int": "i32", "float": "f32"}


def _parameters(text: str, name: str) -> list[str]:
    """Kernel ``name``'s parameter declarations, in order, from the source ``text`` that defines it."""
    start = text.index(name + "(")
    return text[text.index("(", start) + 1 : text.index(") {", start)].split(",")


def parameter_kinds(text: str, name: str) -> list[str]:
    """The kinds of kernel ``name``'s parameters, in order."""
    kinds = []
    for param in _parameters(text, name):
        words = param.replace("__restrict__", "").replace("const", "").replace("__grid_constant__", "").split()
        c_type = " ".join(words[:-1]).split("::")[-1]
        kinds.append(next(kind for c, kind in C_KINDS.items() if c in c_type))
    return kinds


def parameter_names(text: str, name: str) -> list[str]:
    """The names of kernel ``name``'s parameters, in order."""
    return [param.split()[-1] for param in _parameters(text, name)]
