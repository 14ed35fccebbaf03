"""Host overhead of every fused op, measured without a GPU.

    python -m benchmarks.host_overhead [--json benchmarks/results/host-overhead.json] [--repeat 200]

Through the stand-in device (``benchmarks/stub_gpu.py``) Triton compiles each
kernel for sm_90 and records launches instead of running them, so fastres's
whole host path (argument checks, autograd, launch settings, allocations,
Triton's launcher front end) runs on CPU tensors as it would on CUDA ones. In
the same run the eager code each op replaces runs on the same tiny CPU
tensors, compute included, as the reference: on a GPU eager pays its own
dispatch and launch costs, which its tiny CPU run approximates.

Per op and mode (forward: a training forward that builds the graph;
backward: the backward of a graph built untimed; full: both): median host
microseconds per call, kernel launches (fastres: recorded) and tensor
allocations (the CPU allocator's, from torch.profiler). Dense layers take the
fused Triton path, as on CUDA, so nothing here calls ``fastres._C``.

Must run in a process without ``TRITON_INTERPRET=1``.
"""

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("benchmarks.host_overhead compiles kernels for sm_90: unset TRITON_INTERPRET")

from . import stub_gpu  # noqa: E402

SHAPE = (2, 16, 8, 8)  # tiny: eager's compute is a small part of its time
MODES = ("forward", "backward", "full")

def _inputs(requires_grad: bool = True):
    x = torch.randn(SHAPE, requires_grad=requires_grad)
    r = torch.randn(SHAPE, requires_grad=requires_grad)
    c = SHAPE[1]
    w = torch.rand(c, requires_grad=requires_grad)
    b = torch.randn(c, requires_grad=requires_grad)
    return SimpleNamespace(x=x, r=r, w=w, b=b, rm=torch.zeros(c), rv=torch.ones(c), grad=torch.randn(SHAPE))


def _bn_case(fused: bool, training: bool, residual: bool):
    from fastres.functional import batch_norm_relu

    def run(t):
        if fused:
            return batch_norm_relu(t.x, t.rm, t.rv, t.w, t.b, training, 0.1, 1e-5, t.r if residual else None)
        y = F.batch_norm(t.x, t.rm, t.rv, t.w, t.b, training, 0.1, 1e-5)
        return torch.relu(y + t.r if residual else y)

    return run


def _add_relu_case(fused: bool):
    from fastres.functional import add_relu

    def run(t):
        return add_relu(t.x, t.r) if fused else torch.relu(t.x + t.r)

    return run


def _dense_layer_case(fused: bool):
    """One DenseNet layer (C=16 in, growth 4, bn_size 4): shared storage on the fused convolutions vs torchvision's eager layer."""
    import fastres

    torch.manual_seed(0)
    layer = fastres.nn.DenseLayer(SHAPE[1], growth_rate=4, bn_size=4, drop_rate=0.0, memory_efficient=fused)

    def run(t):
        if fused:
            return layer(t.x)
        return layer.conv2(torch.relu(layer.norm2(layer.conv1(torch.relu(layer.norm1(t.x))))))

    def grad_shape(t):
        return torch.randn(SHAPE[0], 4, *SHAPE[2:])

    return run, grad_shape


def _bn_relu_conv_case(fused: bool, training: bool = True):
    """A pre-activation 3x3 convolution (C 16 -> 16, padding 1), in training or eval."""
    from fastres.functional import bn_relu_conv2d

    torch.manual_seed(0)
    weight = torch.randn(SHAPE[1], SHAPE[1], 3, 3, requires_grad=True)

    def run(t):
        if fused:
            return bn_relu_conv2d(t.x, t.rm, t.rv, t.w, t.b, weight, None, 1, 1, training=training)
        return F.conv2d(torch.relu(F.batch_norm(t.x, t.rm, t.rv, t.w, t.b, training, 0.1, 1e-5)), weight, None, 1, 1)

    return run


def _cases():
    cases = {
        "add_relu": (_add_relu_case(True), _add_relu_case(False), None),
        "bn_relu train": (_bn_case(True, True, False), _bn_case(False, True, False), None),
        "bn_add_relu train": (_bn_case(True, True, True), _bn_case(False, True, True), None),
        "bn_relu eval": (_bn_case(True, False, False), _bn_case(False, False, False), None),
        "bn_add_relu eval": (_bn_case(True, False, True), _bn_case(False, False, True), None),
    }
    fused_layer, grad_shape = _dense_layer_case(True)
    eager_layer, _ = _dense_layer_case(False)
    cases["dense_layer train"] = (fused_layer, eager_layer, grad_shape)
    cases["bn_relu_conv3x3 train"] = (_bn_relu_conv_case(True), _bn_relu_conv_case(False), None)
    cases["bn_relu_conv3x3 eval"] = (_bn_relu_conv_case(True, False), _bn_relu_conv_case(False, False), None)
    return cases


def _one_call(run: Callable, mode: str, grad_of: Callable | None) -> Callable[[], Callable[[], None]]:
    """A factory: untimed setup, returning the timed call of ``mode``."""

    def setup():
        t = _inputs()
        grad = t.grad if grad_of is None else grad_of(t)
        if mode == "forward":
            return lambda: run(t)
        if mode == "full":
            return lambda: run(t).backward(grad)
        out = run(t)
        return lambda: out.backward(grad)

    return setup


def _samples(setup: Callable, repeat: int) -> list[int]:
    """Nanoseconds of ``repeat`` calls, each timed on its own with fresh inputs."""
    samples = []
    for _ in range(repeat):
        call = setup()
        t0 = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - t0)
    return samples


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs each start and stop to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _count(setup: Callable) -> tuple[int, int]:
    """(kernel launches, CPU tensor allocations) of one call."""
    call = setup()
    stub_gpu.RECORDER.clear()
    with _quiet_stderr(), torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        call()
    launches = stub_gpu.RECORDER.count
    return launches, _allocations(prof)


def _allocations(prof) -> int:
    """Allocations the profiler saw (each one, also those made inside an op)."""
    from torch._C._profiler import _EventType

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    return sum(1 for n in walk(tree) if n.tag == _EventType.Allocation and n.extra_fields.alloc_size > 0)


def measure(repeat: int) -> list[dict]:
    rows = []
    with stub_gpu.install():  # the stand-in GPU's tensors are CPU tensors on the GPU paths, dense layers included
        stub_gpu.RECORDER.keep = False
        for op, (fused, eager, grad_of) in _cases().items():
            for mode in MODES:
                row = {"op": op, "mode": mode}
                setups = {"fastres": _one_call(fused, mode, grad_of), "eager": _one_call(eager, mode, grad_of)}
                samples = {provider: [] for provider in setups}
                for provider, setup in setups.items():
                    for _ in range(5):  # compile, cache settings, warm the allocator
                        setup()()
                    launches, allocs = _count(setup)
                    row[provider] = {"launches": launches, "allocations": allocs}
                # Alternate the two providers in short rounds: drifts of a shared machine hit both alike.
                for _ in range(10):
                    for provider, setup in setups.items():
                        samples[provider] += _samples(setup, max(1, repeat // 10))
                for provider in setups:
                    row[provider]["us"] = statistics.median(samples[provider]) / 1e3
                row["ratio"] = row["fastres"]["us"] / row["eager"]["us"]
                rows.append(row)
                gc.collect()
    return rows


def _table(rows: list[dict]) -> str:
    lines = [
        "| op | mode | fastres us | launches | allocs | eager us | allocs | fastres / eager |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f, e = r["fastres"], r["eager"]
        lines.append(
            f"| {r['op']} | {r['mode']} | {f['us']:.1f} | {f['launches']} | {f['allocations']} | "
            f"{e['us']:.1f} | {e['allocations']} | {r['ratio']:.2f}x |"
        )
    return "\n".join(lines)


def _machine() -> dict:
    import triton

    import fastres

    try:
        commit = os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip() or None
    except OSError:
        commit = None
    return {
        "device": "stand-in sm_90 (kernels compiled, launches recorded, not run)",
        "host": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "fastres": fastres.__version__,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": list(SHAPE),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--repeat", type=int, default=200, help="timed calls per case (median reported)")
    args = parser.parse_args(argv)
    # One intra-op thread: on tiny tensors eager's thread pool only adds
    # stalls, which dominate when another process holds the other cores.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = measure(args.repeat)
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine_info": _machine(), "results": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
