"""Train a small causal transformer whose sequence is sharded over ranks, with ring attention.

Runs on the CPU: ``--world`` processes joined by gloo on 127.0.0.1 (on GPUs, use NCCL and one
device per rank; nothing else changes)::

    python examples/ring_attention_train.py                 # 2 ranks, 30 steps
    python examples/ring_attention_train.py --check         # first compare one step with the unsharded model

Every rank holds the same model and a zig-zag shard of every sequence: its tokens, their global
positions (for the position embedding) and their targets. Attention is the only layer that mixes
positions, so it is the only one that talks to the other ranks; the loss of each rank covers its
own tokens, and summing the parameter gradients over the ranks gives the gradient of the whole
sequence's loss.
"""

from __future__ import annotations

import argparse
import copy
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import flash
from flash.distributed import positions, ring_attention, shard

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


class Layer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor, attend: Attend) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, width // self.heads).unbind(2)
        x = x + self.proj(attend(q, k, v).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, width: int, heads: int, layers: int, max_len: int) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Embedding(max_len, width)
        self.layers = nn.ModuleList(Layer(width, heads) for _ in range(layers))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor, position_ids: Tensor, attend: Attend) -> Tensor:
        x = self.embed(tokens) + self.position(position_ids)
        for layer in self.layers:
            x = layer(x, attend)
        return self.head(x)


def batch_of_sequences(batch: int, length: int, vocab: int, seed: int) -> Tensor:
    """Arithmetic progressions modulo ``vocab``: the next token is predictable from the context."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(vocab, (batch, 1), generator=gen)
    stride = torch.randint(1, 5, (batch, 1), generator=gen)
    return (start + stride * torch.arange(length + 1)) % vocab


def loss_and_grads(model: nn.Module, tokens: Tensor, position_ids: Tensor, targets: Tensor, total: int, attend: Attend):
    """This rank's share of the mean token loss, and its parameter gradients (not yet summed)."""
    model.zero_grad()
    logits = model(tokens, position_ids, attend)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / total
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def train(steps: int, check: bool = False, backend: str = "reference") -> list[float]:
    """``steps`` optimizer steps on this rank (the process group is up); the losses, on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model on every rank
    vocab, length, batch = 32, 16 * world, 4  # length: a multiple of 2 * world (zig-zag)
    model = TinyLM(vocab, width=32, heads=4, layers=2, max_len=length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def ring(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return ring_attention(q, k, v, causal=True, backend=backend)

    losses = []
    for step in range(steps):
        sequences = batch_of_sequences(batch, length, vocab, seed=step)
        inputs, targets = sequences[:, :-1], sequences[:, 1:]
        local = [shard(t, world, rank, dim=1) for t in (inputs, targets)]
        ids = positions(length, world, rank)
        if check and step == 0:
            reference = copy.deepcopy(model)  # the same step, unsharded, with single-process attention
            whole_loss, whole_grads = loss_and_grads(
                reference, inputs, torch.arange(length), targets, batch * length,
                lambda q, k, v: flash.attention(q, k, v, causal=True, backend=backend),
            )  # fmt: skip
        loss, grads = loss_and_grads(model, local[0], ids, local[1], batch * length, ring)
        for grad in grads:  # the whole sequence's gradient is the sum of the ranks' shares
            dist.all_reduce(grad)
        dist.all_reduce(loss)
        if check and step == 0:
            loss_diff = abs(loss.item() - whole_loss.item())
            grad_diff = max((g - w).abs().max().item() for g, w in zip(grads, whole_grads))
            if loss_diff > 1e-5 or grad_diff > 1e-5:
                raise RuntimeError(f"rank {rank}: sharded step differs: loss {loss_diff:.2e}, grads {grad_diff:.2e}")
            if rank == 0:
                print(f"sharded step matches the unsharded model: loss diff {loss_diff:.1e}, grad diff {grad_diff:.1e}")
        optimizer.step()
        losses.append(loss.item())
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    return losses


def run(rank: int, world: int, port: int, steps: int, check: bool, backend: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    train(steps, check, backend)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="number of ranks (processes)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--check", action="store_true", help="compare the first step with the unsharded model")
    parser.add_argument("--backend", default="reference", help="flash backend of the attention blocks")
    args = parser.parse_args(argv)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(args.world, port, args.steps, args.check, args.backend), nprocs=args.world)


if __name__ == "__main__":
    main()
