"""SyncBatchNormReLU2d across 2 processes (gloo, CPU) against one process on the whole batch."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastres

BATCHES = (3, 2)  # per process: batch sizes may differ
C, H, W = 5, 4, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(BATCHES), C, H, W, generator=gen) * 3 + 2
    r = torch.randn(x.shape, generator=gen)
    grad = torch.randn(x.shape, generator=gen)
    return x, r, grad


def _worker(rank, world, port, interpret, channels_last, out_dir):
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, r, grad = _data()
        start = sum(BATCHES[:rank])
        part = slice(start, start + BATCHES[rank])
        bn = fastres.nn.SyncBatchNormReLU2d(C)
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 1.5, C)), bn.bias.copy_(torch.linspace(-0.2, 0.2, C))
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        results = []
        for _ in range(2):  # two steps: the running statistics accumulate
            xl = x[part].contiguous(memory_format=fmt).requires_grad_()
            rl = r[part].clone().requires_grad_()
            out = bn(xl, rl)
            out.backward(grad[part])
            results.append({"out": out.detach(), "dx": xl.grad, "dr": rl.grad})
        dw, db = bn.weight.grad.clone(), bn.bias.grad.clone()
        dist.all_reduce(dw), dist.all_reduce(db)  # what DDP would do (as a sum here)
        torch.save(
            {"steps": results, "dw": dw / 2, "db": db / 2, "buffers": dict(bn.named_buffers())},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.barrier()  # neither process tears gloo down while the other still talks to it
        dist.destroy_process_group()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_sync_matches_one_process_on_the_concatenated_batch(path, tmp_path, channels_last):
    mp.spawn(_worker, args=(2, _free_port(), path == "triton", channels_last, str(tmp_path)), nprocs=2)
    x, r, grad = _data()
    bn = nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, C)), bn.bias.copy_(torch.linspace(-0.2, 0.2, C))
    expected = []
    for _ in range(2):
        xl, rl = x.clone().requires_grad_(), r.clone().requires_grad_()
        out = torch.relu(bn(xl) + rl)
        out.backward(grad)
        expected.append({"out": out.detach(), "dx": xl.grad, "dr": rl.grad})
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    for step, want in enumerate(expected):
        for key in want:
            got = torch.cat([rank["steps"][step][key] for rank in ranks])
            torch.testing.assert_close(got, want[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step} {key}: {m}")
    # Weight and bias gradients are local; summed over processes they are the
    # whole batch's, which is what DDP's averaging then divides by 2.
    torch.testing.assert_close(ranks[0]["dw"] * 2, bn.weight.grad / 1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ranks[0]["db"] * 2, bn.bias.grad, rtol=1e-5, atol=1e-5)
    for rank in ranks:
        for name, buf in bn.named_buffers():
            torch.testing.assert_close(rank["buffers"][name], buf, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_convert_sync_batchnorm_keeps_the_relu():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), fastres.nn.BatchNormReLU2d(4), nn.BatchNorm2d(4))
    original = copy.deepcopy(model)
    weight = model[1].weight
    converted = fastres.nn.convert_sync_batchnorm(model)
    assert type(converted[1]) is fastres.nn.SyncBatchNormReLU2d and converted[1].weight is weight
    assert type(converted[2]) is nn.SyncBatchNorm
    # Without a process group it computes what the single-process model does, ReLU included.
    x = torch.randn(2, 3, 6, 6)
    out = converted(x)
    torch.testing.assert_close(out, original(x))
    assert (converted[1](converted[0](x)) >= 0).all()
