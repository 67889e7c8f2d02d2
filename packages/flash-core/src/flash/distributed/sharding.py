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

A packed batch of sequences (``cu_seqlens``) is sharded sequence by sequence: every sequence is
cut into the same number of chunks (its length a multiple of it), and a rank's shard holds, for
each of its chunks in turn, that chunk of every sequence, packed: the *regions* of
:func:`shard_varlen`. Each region is itself a packed batch with offsets ``cu_seqlens //
number_of_chunks``.
"""

from __future__ import annotations

import itertools
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
    return sharding


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


def packed_lengths(cu_seqlens: object, multiple: int, name: str = "cu_seqlens") -> list[int]:
    """The offsets of a packed batch as a list (one device-to-host copy), refusing sequences whose
    length is not a multiple of ``multiple``."""
    if not isinstance(cu_seqlens, Tensor):
        raise InvalidInputError(name, "a torch.Tensor of offsets", type(cu_seqlens).__name__)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        raise InvalidInputError(name, "a 1-D integer tensor of batch + 1 offsets", f"{tuple(cu_seqlens.shape)}")
    offsets = [int(x) for x in cu_seqlens.tolist()]
    if offsets[0] != 0:
        raise InvalidInputError(name, "first offset 0", str(offsets[0]))
    for index, (start, end) in enumerate(itertools.pairwise(offsets)):
        if end < start:
            raise InvalidInputError(name, "non-decreasing offsets", f"{start} then {end} at index {index}")
        check_divisible(name, end - start, multiple, f"sequence lengths (sequence {index})")
    return offsets


def _packed_index(offsets: list[int], world_size: int, rank: int, sharding: Sharding) -> Tensor:
    """Indices of the packed batch's tokens that ``rank`` holds, in its shard's (region-major) order."""
    count = world_size * chunks_per_rank(sharding)
    pieces = []
    for chunk in rank_chunks(world_size, rank, sharding):
        for start, end in itertools.pairwise(offsets):
            size = (end - start) // count
            pieces.append(torch.arange(start + chunk * size, start + (chunk + 1) * size))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


def shard_varlen(
    x: Tensor, cu_seqlens: Tensor, world_size: int, rank: int, *, dim: int = 0, sharding: Sharding = "zigzag"
) -> Tensor:
    """The piece of a packed batch that ``rank`` holds (for :func:`~flash.distributed.ring_attention_varlen`).

    Args:
        x: packed tokens along ``dim``: q/k/v ``(total, heads, head_dim)``, labels ``(total,)``.
        cu_seqlens: the batch's offsets (``batch + 1`` of them); every sequence's length must be
            a multiple of ``2 * world_size`` (zig-zag) or ``world_size`` (contiguous).
        world_size, rank, sharding: as :func:`shard`.

    Returns:
        A new tensor of ``total / world_size`` tokens along ``dim``: for each chunk the rank holds,
        that chunk of every sequence. Differentiable.
    """
    if not isinstance(x, Tensor):
        raise InvalidInputError("x", "a torch.Tensor", type(x).__name__)
    world_size, rank = _check_world(world_size, rank)
    sharding = check_sharding(sharding)
    dim = _check_dim(x, dim)
    offsets = packed_lengths(cu_seqlens, world_size * chunks_per_rank(sharding))
    if offsets[-1] != x.shape[dim]:
        raise InvalidInputError("cu_seqlens", f"a last offset equal to x's {x.shape[dim]} tokens", str(offsets[-1]))
    return x.index_select(dim, _packed_index(offsets, world_size, rank, sharding).to(x.device))


def unshard_varlen(
    x: Tensor, cu_seqlens: Tensor, *, group: ProcessGroup | None = None, dim: int = 0, sharding: Sharding = "zigzag"
) -> Tensor:
    """The whole packed batch from every rank's :func:`shard_varlen` piece (a collective, like
    :func:`unshard`; not differentiable)."""
    import torch.distributed as dist

    if not isinstance(x, Tensor):
        raise InvalidInputError("x", "a torch.Tensor", type(x).__name__)
    sharding = check_sharding(sharding)
    dim = _check_dim(x, dim)
    world_size = dist.get_world_size(group)
    offsets = packed_lengths(cu_seqlens, world_size * chunks_per_rank(sharding))
    if offsets[-1] != world_size * x.shape[dim]:
        expected = f"a last offset of world size x local tokens = {world_size * x.shape[dim]}"
        raise InvalidInputError("cu_seqlens", expected, str(offsets[-1]))
    gathered = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world_size)]
    dist.all_gather(gathered, x.contiguous(), group=group)
    index = torch.cat([_packed_index(offsets, world_size, rank, sharding) for rank in range(world_size)])
    return torch.cat(gathered, dim=dim).index_select(dim, torch.argsort(index).to(x.device))


def positions_varlen(cu_seqlens: Tensor, world_size: int, rank: int, *, sharding: Sharding = "zigzag") -> Tensor:
    """Position of each of ``rank``'s tokens within its own sequence (int64, on ``cu_seqlens``'s device)."""
    world_size, rank = _check_world(world_size, rank)
    sharding = check_sharding(sharding)
    offsets = packed_lengths(cu_seqlens, world_size * chunks_per_rank(sharding))
    index = _packed_index(offsets, world_size, rank, sharding)
    starts = torch.tensor(offsets[:-1], dtype=torch.int64)
    sequence = torch.searchsorted(torch.tensor(offsets[1:], dtype=torch.int64), index, right=True)
    return (index - starts[sequence]).to(cu_seqlens.device)
