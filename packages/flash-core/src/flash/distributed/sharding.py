"""How a sequence is cut into chunks and dealt to the ranks of a ring.

The sequence (length ``N``) is cut into equal chunks; each rank holds some of them, concatenated
in increasing global order:

* ``"contiguous"``: ``W`` chunks, rank ``r`` holds chunk ``r``;
* ``"zigzag"``: ``2W`` chunks, rank ``r`` holds chunks ``r`` and ``2W - 1 - r``, so that under a
  causal mask every rank has the same amount of work (an early chunk sees few keys, its partner
  at the end sees many).

``N`` must be a multiple of the number of chunks; flash does not pad (pad the sequence and mask
or ignore the padded tokens yourself). One definition serves the ring, :func:`shard`,
:func:`unshard` and :func:`positions`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from flash.errors import InvalidInputError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

Sharding = Literal["zigzag", "contiguous"]
SHARDINGS: tuple[Sharding, ...] = ("zigzag", "contiguous")


def check_sharding(sharding: object) -> Sharding:
    """Validate a sharding name."""
    if sharding not in SHARDINGS:
        raise InvalidInputError("sharding", f"one of {SHARDINGS}", repr(sharding))
    return sharding  # type: ignore[return-value]


def chunks_per_rank(sharding: Sharding) -> int:
    """How many chunks each rank holds: 2 for zig-zag, 1 for contiguous."""
    return 2 if sharding == "zigzag" else 1


def rank_chunks(world_size: int, rank: int, sharding: Sharding) -> tuple[int, ...]:
    """Global indices of the chunks ``rank`` holds, in the order they sit in its shard (increasing)."""
    if sharding == "zigzag":
        return (rank, 2 * world_size - 1 - rank)
    return (rank,)


def _check_world(world_size: object, rank: object) -> tuple[int, int]:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise InvalidInputError("world_size", "an int >= 1", repr(world_size))
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise InvalidInputError("rank", f"an int in [0, {world_size})", repr(rank))
    return world_size, rank


def _check_dim(x: Tensor, dim: object) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise InvalidInputError("dim", f"an int in [{-x.dim()}, {x.dim()})", repr(dim))
    return dim % x.dim()


def check_divisible(name: str, length: int, multiple: int, what: str) -> None:
    """Refuse a length that the chunks cannot cut evenly, saying which multiple is needed."""
    if length % multiple:
        raise InvalidInputError(name, f"{what} that is a multiple of {multiple} (pad the sequence)", str(length))


def shard(x: Tensor, world_size: int, rank: int, *, dim: int = 1, sharding: Sharding = "zigzag") -> Tensor:
    """The piece of a full-sequence tensor that ``rank`` holds: its chunks, concatenated.

    Args:
        x: any tensor with the sequence along ``dim``: inputs ``(batch, seqlen, ...)`` (``dim=1``,
            the default), ``layout="bhsd"`` tensors (``dim=2``), position ids or labels
            ``(seqlen,)`` (``dim=0``).
        world_size, rank: the ring's size and this rank's place in it.
        dim: the sequence dimension.
        sharding: ``"zigzag"`` or ``"contiguous"`` (see :mod:`flash.distributed.sharding`).

    Returns:
        A new contiguous tensor, ``seqlen / world_size`` long along ``dim``. Differentiable.

    Raises:
        InvalidInputError: if the length along ``dim`` is not a multiple of the number of chunks
            (``2 * world_size`` for zig-zag, ``world_size`` for contiguous).
    """
    if not isinstance(x, Tensor):
        raise InvalidInputError("x", "a torch.Tensor", type(x).__name__)
    world_size, rank = _check_world(world_size, rank)
    sharding = check_sharding(sharding)
    dim = _check_dim(x, dim)
    n_chunks = world_size * chunks_per_rank(sharding)
    check_divisible("x", x.shape[dim], n_chunks, f"a length along dim {dim} ({sharding}, {world_size} ranks)")
    size = x.shape[dim] // n_chunks
    pieces = [x.narrow(dim, chunk * size, size) for chunk in rank_chunks(world_size, rank, sharding)]
    return torch.cat(pieces, dim=dim)


def unshard(x: Tensor, *, group: ProcessGroup | None = None, dim: int = 1, sharding: Sharding = "zigzag") -> Tensor:
    """The full-sequence tensor, from every rank's shard: the inverse of :func:`shard`.

    A collective (``all_gather`` over ``group``, default the world): every rank of the group must
    call it, with shards of one shape. For inspecting and evaluating results; it is not
    differentiable (gradients stay sharded: differentiate the sharded loss instead).
    """
    import torch.distributed as dist

    if not isinstance(x, Tensor):
        raise InvalidInputError("x", "a torch.Tensor", type(x).__name__)
    sharding = check_sharding(sharding)
    dim = _check_dim(x, dim)
    world_size = dist.get_world_size(group)
    per_rank = chunks_per_rank(sharding)
    check_divisible("x", x.shape[dim], per_rank, f"a shard length along dim {dim} ({sharding})")
    gathered = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world_size)]
    dist.all_gather(gathered, x.contiguous(), group=group)
    ordered: list[Tensor | None] = [None] * (world_size * per_rank)
    for rank, piece in enumerate(gathered):
        for chunk, part in zip(rank_chunks(world_size, rank, sharding), piece.chunk(per_rank, dim=dim)):
            ordered[chunk] = part
    return torch.cat([part for part in ordered if part is not None], dim=dim)


def positions(
    seqlen: int,
    world_size: int,
    rank: int,
    *,
    sharding: Sharding = "zigzag",
    device: torch.device | str | None = None,
) -> Tensor:
    """Global position ids (int64) of the tokens ``rank`` holds: what rotary or learned position
    embeddings need, since a shard's tokens are not ``0 .. seqlen / world_size - 1``."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 0:
        raise InvalidInputError("seqlen", "an int >= 0", repr(seqlen))
    return shard(torch.arange(seqlen, device=device), world_size, rank, dim=0, sharding=sharding)
