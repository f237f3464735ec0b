"""The rank process of tests/test_accumulate.py's DDP test, in a module of its own so that the spawned ranks import
torch and the engine's step only."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qrepro.engine.fast import make_forward_loss
from qrepro.engine.loop import train_step
from qrepro.hooks import Context


def ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y, model = ddp_problem()
        ddp = DistributedDataParallel(model)
        calls = []

        def counting_allreduce(state, bucket):  # DDP's all-reduce (mean over ranks), counted
            calls.append(1)
            t = bucket.buffer().div_(world)
            return tdist.all_reduce(t, async_op=True).get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, counting_allreduce)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.3, momentum=0.9)
        fl = make_forward_loss(ddp, nn.functional.cross_entropy)
        ctx = Context(model=ddp, optimizer=opt)
        shard = slice(rank * 8, (rank + 1) * 8)  # each rank: its half of the global batch of 16
        for _ in range(2):
            train_step(ddp, fl, opt, None, x[shard], y[shard], ctx=ctx, accumulate=4)
        torch.save({"state": model.state_dict(), "allreduce_calls": len(calls)}, Path(out) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def ddp_problem():
    torch.manual_seed(3)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    return x, y, nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
