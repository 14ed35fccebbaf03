"""SyncBatchNormReLU2d across 2 processes (gloo, CPU) against one process on the whole batch."""

import contextlib
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastres
from fastres.testing import gpu_paths_on_cpu

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


def _on(path: str):
    """In a worker process: the path's routing (CPU tensors; "triton" takes the GPU paths)."""
    return gpu_paths_on_cpu() if path == "triton" else contextlib.nullcontext()


def _worker(rank, world, port, path, channels_last, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"  # before the first kernel runs
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with _on(path):
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
    mp.spawn(_worker, args=(2, _free_port(), path, channels_last, str(tmp_path)), nprocs=2)
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


# --- whole ResNets under convert_sync_batchnorm + DDP ------------------------------------------
#
# Three ways users get synchronized BN into a fastres ResNet, each trained for two SGD steps
# in 2 gloo processes (batches of 3 and 2, float64) and compared with torchvision's eager model
# on the concatenated batch. The models are cut after layer2 (layer1 for Bottleneck) so that the
# stem, blocks with and without a downsample, and every kind of BN call are there at small cost.
# One spawn runs both paths (the Triton kernels through the interpreter, and the eager reference).

MODEL_BATCHES = (3, 2)
MODEL_STEPS = 2
LR = 0.1
# (path, case): under Triton's interpreter (slow) the two block types; the torchvision case
# dispatches as fastres_models does and runs on the reference path only.
MODEL_RUNS = (
    ("triton", "fastres_models"), ("triton", "torch_converter"),
    ("reference", "fastres_models"), ("reference", "torch_converter"), ("reference", "torchvision_convert"),
)


def _small_resnet(lib, block_name: str) -> nn.Module:
    """``lib``'s (fastres.models or torchvision.models) ResNet with that block, up to layer2 (or layer1)."""
    block = getattr(lib.resnet, block_name) if hasattr(lib, "resnet") else getattr(fastres.nn, block_name)
    torch.manual_seed(0)
    model = lib.ResNet(block, [1, 1, 1, 1], num_classes=3)
    model.layer3, model.layer4 = nn.Identity(), nn.Identity()
    width = 64 * block.expansion
    if block_name == "Bottleneck":  # the widest: stop after layer1
        model.layer2 = nn.Identity()
    else:
        width *= 2
    model.fc = nn.Linear(width, 3)
    return model.double()


def _model_cases(tv):
    """name -> (build the synchronized model, block, its BN module types, fused / lone sync BN calls per step)."""
    return {
        # fastres's converter on fastres's model: stem + 2 blocks x 2 BN-ReLUs fused, 1 downsample BN.
        "fastres_models": (
            lambda: fastres.nn.convert_sync_batchnorm(_small_resnet(fastres.models, "BasicBlock")),
            "BasicBlock", ["SyncBatchNorm"], (5, 1),
        ),
        # torch's converter on fastres's model: stem + a Bottleneck's 3 BN-ReLUs, 1 downsample BN.
        "torch_converter": (
            lambda: nn.SyncBatchNorm.convert_sync_batchnorm(_small_resnet(fastres.models, "Bottleneck")),
            "Bottleneck", ["SyncBatchNorm"], (4, 1),
        ),
        # torchvision's model through fastres.convert (a fastres ResNet: stem fused in forward), then fastres's converter.
        "torchvision_convert": (
            lambda: fastres.nn.convert_sync_batchnorm(fastres.convert(_small_resnet(tv.models, "BasicBlock"))),
            "BasicBlock", ["SyncBatchNorm"], (5, 1),
        ),
    }


def _model_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sum(MODEL_BATCHES), 3, 8, 8, generator=gen, dtype=torch.float64)
    grad = torch.randn(sum(MODEL_BATCHES), 3, generator=gen, dtype=torch.float64)
    return x, grad


def _ddp(model):
    """DDP over gloo. torch's DDP refuses any SyncBatchNorm in a CPU module up front ("SyncBatchNorm
    layers only work with GPU modules", a guard for torch's own CUDA-only SyncBatchNorm); fastres's
    path runs on CPU, so the test skips that guard and otherwise uses DDP as it is."""
    from torch.nn.parallel import DistributedDataParallel

    class CPUSyncBNDistributedDataParallel(DistributedDataParallel):
        def _passing_sync_batchnorm_handle(self, module):
            pass

    return CPUSyncBNDistributedDataParallel(model)


def _spy(targets: dict) -> dict:
    """Counts calls: ``targets`` maps a counter to (module, function name), each replaced by a counting wrapper.

    torch's ``SyncBatchNorm.forward`` is made to raise, so a fallback to it
    fails the test (in this worker process only).
    """
    calls = dict.fromkeys(targets, 0)

    def counting(key, fn):
        def wrapper(*args):
            calls[key] += 1
            return fn(*args)
        return wrapper

    for key, (module, name) in targets.items():
        setattr(module, name, counting(key, getattr(module, name)))

    def no_torch_sync_bn(self, x):
        raise AssertionError("fell back to torch.nn.SyncBatchNorm.forward")

    nn.SyncBatchNorm.forward = no_torch_sync_bn
    return calls


def _ddp_steps(model, x, grad, calls: dict):
    """MODEL_STEPS SGD steps of ``model`` under DDP: (outputs, per step the growth of each counter in ``calls``)."""
    ddp = _ddp(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    outs, counts = [], []
    for _ in range(MODEL_STEPS):
        before = dict(calls)
        opt.zero_grad()
        out = ddp(x)
        (out * grad).sum().backward()
        opt.step()
        outs.append(out.detach())
        counts.append(tuple(calls[k] - before[k] for k in calls))
    return outs, counts


def _model_worker(rank, world, port, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"  # before the first kernel runs
    torch.set_num_threads(1)  # two processes on what may be two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from fastres._torchvision import import_torchvision
        from fastres.ops import sync_batch_norm as ops

        calls = _spy({"fused": (ops, "sync_batch_norm_relu"), "lone": (ops, "sync_batch_norm")})

        x, grad = _model_data()
        start = sum(MODEL_BATCHES[:rank])
        part = slice(start, start + MODEL_BATCHES[rank])
        cases = _model_cases(import_torchvision())
        results = {}
        for path, name in MODEL_RUNS:
            with _on(path):
                model = cases[name][0]()
                outs, counts = _ddp_steps(model, x[part], grad[part], calls)
                triton = ops.use_triton(x)
            results[path, name] = {
                "outs": outs, "counts": counts, "triton": triton,
                "bn_types": sorted({type(m).__name__ for m in model.modules()
                                    if isinstance(m, nn.modules.batchnorm._BatchNorm)}),
                "grads": {k: p.grad for k, p in model.named_parameters()},
                "state": {k: v.clone() for k, v in model.state_dict().items()},
            }
        # A bad input is refused before any collective, on every process alike.
        try:
            fastres.nn.bn_relu(nn.SyncBatchNorm(4).double(), torch.randn(2, 5, 3, 3, dtype=torch.float64))
        except ValueError as err:
            results["bad_channels"] = str(err)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_resnets_under_convert_sync_batchnorm_and_ddp_match_one_process(tmp_path, tv):
    pytest.importorskip("triton")
    mp.spawn(_model_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    x, grad = _model_data()
    for name, (_, block_name, bn_types, per_step) in _model_cases(tv).items():
        # One process, torchvision's eager model, the whole batch. DDP averages the two
        # processes' gradients, so the loss here is half the summed one.
        eager = _small_resnet(tv.models, block_name)
        opt = torch.optim.SGD(eager.parameters(), lr=LR)
        outs = []
        for _ in range(MODEL_STEPS):
            opt.zero_grad()
            out = eager(x)
            (out * grad).sum().mul(0.5).backward()
            opt.step()
            outs.append(out.detach())
        for path in (run_path for run_path, run_name in MODEL_RUNS if run_name == name):
            case = f"{path}/{name}"
            for step, want in enumerate(outs):
                got = torch.cat([r[path, name]["outs"][step] for r in ranks])
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"{case} step {step} output: {m}")
            for r in (rank[path, name] for rank in ranks):
                # The fused synchronized op ran for every BN-ReLU and BN-add-ReLU, fastres's lone
                # synchronized BN for each downsample, torch's SyncBatchNorm.forward never.
                assert r["counts"] == [per_step] * MODEL_STEPS, case
                assert r["triton"] == (path == "triton"), case
                assert r["bn_types"] == bn_types, case
                for key, p in eager.named_parameters():
                    torch.testing.assert_close(r["grads"][key], p.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{case} {key}.grad: {m}")
                state = eager.state_dict()  # parameters after the steps, running stats, num_batches_tracked
                assert r["state"].keys() == state.keys(), case
                for key, v in state.items():
                    torch.testing.assert_close(r["state"][key], v, rtol=1e-8, atol=1e-10, msg=lambda m: f"{case} {key}: {m}")
    for r in ranks:
        assert "SyncBatchNorm: x has 5 channels but SyncBatchNorm expects 4" in r["bad_channels"]


def test_blocks_with_sync_batch_norm_and_no_process_group_are_plain_batch_norm(tv):
    """Without a process group SyncBatchNorm is BatchNorm2d (torch's rule): the converted model is unchanged."""
    model = _small_resnet(fastres.models, "BasicBlock")
    eager = _small_resnet(tv.models, "BasicBlock")
    converted = fastres.nn.convert_sync_batchnorm(copy.deepcopy(model))
    assert converted.state_dict().keys() == model.state_dict().keys()
    x, _ = _model_data()
    for mode in (True, False):
        converted.train(mode), eager.train(mode)
        torch.testing.assert_close(converted(x), eager(x), rtol=1e-9, atol=1e-10)
    for (name, a), (_, b) in zip(converted.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_torch_converter_after_convert_of_a_torchvision_resnet_keeps_the_stem_relu(tv):
    eager = _small_resnet(tv.models, "BasicBlock")
    model = nn.SyncBatchNorm.convert_sync_batchnorm(fastres.convert(copy.deepcopy(eager)))
    x, _ = _model_data()
    torch.testing.assert_close(model(x), eager(x), rtol=1e-9, atol=1e-10)


# A DenseNet under convert_sync_batchnorm keeps its shared-storage path: every batch norm's
# statistics (stem, dense layers, transition) are synchronized inside fastres._C's recomputing
# ops, norm5 through the fused synchronized op; compared as the ResNets above.

PATHS_WITH_FUSED_DENSE = ("triton", "reference")


def _small_densenet(lib):
    torch.manual_seed(0)
    return lib.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3).double()


def _small_timm_densenet():
    """timm's DenseNet of the same structure (timm's num_init_features is 2 * growth_rate)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("densenet121", growth_rate=4, block_config=(2, 2), bn_size=2, num_classes=3).double()


def _sync_densenet(family: str):
    """The DenseNet of ``family`` as a user sets it up for SyncBN: fastres's builder or timm's model converted."""
    if family == "fastres":
        return fastres.nn.convert_sync_batchnorm(_small_densenet(fastres.models))
    import timm

    return timm.layers.convert_sync_batchnorm(fastres.convert(_small_timm_densenet()))


def _densenet_data():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(sum(MODEL_BATCHES), 3, 16, 16, generator=gen, dtype=torch.float64)
    return x, torch.randn(sum(MODEL_BATCHES), 3, generator=gen, dtype=torch.float64)


def _densenet_worker(rank, world, port, out_dir, family, paths, emulated):
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    if emulated:  # fastres._C's CUDA kernels, run on the host (tests/emulated_cuda.py), for the process's life
        import emulated_cuda

        emulated_cuda.kernels().__enter__()
    if family == "timm":
        from fastres.testing import import_torchvision

        import_torchvision()  # timm imports torchvision
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from fastres.ops import dense_ext, dense_gpu, sync_batch_norm as ops

        calls = _spy({"shared": (dense_ext, "_synchronized_statistics"), "fused": (ops, "sync_batch_norm_relu"),
                      "fused_conv": (dense_gpu, "_synchronized")})
        x, grad = _densenet_data()
        start = sum(MODEL_BATCHES[:rank])
        part = slice(start, start + MODEL_BATCHES[rank])
        results = {}
        for path in paths:
            with _on(path):  # "triton": dense blocks on the fused convolutions (CUDA's path)
                model = _sync_densenet(family)
                outs, counts = _ddp_steps(model, x[part], grad[part], calls)
            results[path] = {
                "outs": outs, "counts": counts,
                "grads": {k: p.grad for k, p in model.named_parameters()},
                "state": {k: v.clone() for k, v in model.state_dict().items()},
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


# "emulated": the shared-storage path with fastres._C's CUDA kernels, run on the host.
@pytest.mark.parametrize("family, engine", [("fastres", "built"), ("timm", "built"), ("fastres", "emulated")])
def test_densenet_under_convert_sync_batchnorm_and_ddp_matches_one_process(request, tmp_path, tv, family, engine):
    """fastres's DenseNet under fastres's converter, or timm's converted under timm's: against one process."""
    pytest.importorskip("triton")
    if not fastres.functional.extension_available():
        pytest.skip("fastres._C is not built")
    if family == "timm":
        request.getfixturevalue("timm")
    paths = PATHS_WITH_FUSED_DENSE if engine == "built" else ("reference",)
    if engine == "emulated":
        import emulated_cuda

        emulated_cuda.module()  # built here, loaded by the workers
    mp.spawn(_densenet_worker, args=(2, _free_port(), str(tmp_path), family, paths, engine == "emulated"), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    x, grad = _densenet_data()
    eager = _small_densenet(tv.models) if family == "fastres" else _small_timm_densenet()
    opt = torch.optim.SGD(eager.parameters(), lr=LR)
    outs = []
    for _ in range(MODEL_STEPS):
        opt.zero_grad()
        out = eager(x)
        (out * grad).sum().mul(0.5).backward()  # DDP averages the two processes' gradients
        opt.step()
        outs.append(out.detach())
    for path in paths:
        for step, want in enumerate(outs):
            got = torch.cat([r[path]["outs"][step] for r in ranks])
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"{path} step {step}: {m}")
        for r in (rank[path] for rank in ranks):
            if path == "triton":
                # As on CUDA: the 2 x 2 x 2 dense-layer BNs through the fused convolutions; the stem's, the
                # transition's synchronizing BN-ReLU (unfused with its convolution) and norm5 through the
                # fused synchronized BN-ReLU; nothing through fastres._C.
                assert r["counts"] == [(0, 3, 8)] * MODEL_STEPS, path
            else:
                # stem + 2 x 2 dense-layer BNs + transition + 2 x 2 through shared storage; norm5 fused.
                assert r["counts"] == [(10, 1, 0)] * MODEL_STEPS, path
            for key, p in eager.named_parameters():
                torch.testing.assert_close(r["grads"][key], p.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{path} {key}.grad: {m}")
            state = eager.state_dict()
            for key, v in state.items():
                torch.testing.assert_close(r["state"][key], v, rtol=1e-8, atol=1e-10, msg=lambda m: f"{path} {key}: {m}")


def _double_backward_worker(rank, world, port, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"  # before the first kernel runs
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(3)
        x_all = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
        r_all = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
        part = slice(0, 3) if rank == 0 else slice(3, 5)
        results = {}
        for path in ("triton", "reference"):
            with _on(path):
                x = x_all[part].clone().requires_grad_()
                r = r_all[part].clone().requires_grad_()
                w = torch.linspace(0.5, 1.5, 3, dtype=torch.float64, requires_grad=True)
                b = torch.linspace(-0.2, 0.2, 3, dtype=torch.float64, requires_grad=True)
                out = fastres.functional.sync_batch_norm_relu(x, None, None, w, b, residual=r)
                gx, gw = torch.autograd.grad(out.square().sum(), (x, w), create_graph=True)
                (gx.square().sum() + gw.square().sum()).backward()
                results[path] = [t.grad for t in (x, r, w, b)]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_sync_batch_norm_relu_double_backward_matches_eager(tmp_path):
    """The fused synchronized op's backward is differentiable: second-order gradients as eager's path."""
    pytest.importorskip("triton")
    mp.spawn(_double_backward_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    for i in range(2):
        result = torch.load(tmp_path / f"rank{i}.pt")
        for name, got, want in zip(("x", "residual", "weight", "bias"), result["triton"], result["reference"]):
            assert want is not None and want.abs().sum() > 0, name
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10, msg=lambda m: f"rank {i} {name}.grad: {m}")
