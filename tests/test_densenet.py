"""Memory-efficient DenseNet (shared storage: fastres._C, or the fused Triton convolutions) against torchvision's eager one."""

import copy
import io

import pytest
import torch
from torch import nn

import fastres
from fastres import _ext
from helpers import (
    STEP, assert_forward_as_accurate_as_eager, assert_modules_normwise_close, assert_normwise_close,
    assert_trains_like, saved_bytes, train_steps, twin,
)
# On CUDA every test runs once per dense engine: the default (the fused Triton
# convolutions on sm_80+) and fastres._C's CUDA kernels with cuDNN's
# convolutions, where they are built. On CPU fastres._C's engine runs once as
# built, and once through its CUDA kernels run on the host ("emulated",
# tests/emulated_cuda.py; conftest.py leaves out the Triton path's cases there).
GPU = torch.cuda.is_available()
ENGINES = ["default"] + (
    ["extension"] if GPU and _ext.cuda_kernels() else [] if GPU else [pytest.param("emulated", marks=pytest.mark.emulated_cuda)]
)


@pytest.fixture(autouse=True, params=ENGINES)
def engine(request):
    if request.param == "extension":
        with fastres.dense_path(request.param):
            yield request.param
    else:
        yield request.param


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])


def _fmt(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _compare_training(fused, eager, inputs, dtype):
    """Outputs, input gradients, then every parameter, gradient and buffer after the steps; then eval."""
    assert next(eager.parameters()).dtype == dtype
    assert_trains_like(fused, eager, inputs, STEP[dtype])


# --- layers and blocks ------------------------------------------------------


@DTYPES
@LAYOUTS
@pytest.mark.parametrize("drop_rate", [0.0, 0.3], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("memory_efficient", [True, False], ids=["shared", "naive"])
def test_dense_layer_matches_torchvision(path, device, tv, needs_ext, dtype, channels_last, drop_rate, memory_efficient):
    eager = tv.models.densenet._DenseLayer(7, growth_rate=3, bn_size=2, drop_rate=drop_rate, memory_efficient=False)
    fused = twin(eager, fastres.nn.DenseLayer(7, 3, 2, drop_rate, memory_efficient=memory_efficient))
    eager, fused = eager.to(device, dtype), fused.to(device, dtype)
    fmt = _fmt(channels_last)
    inputs = [torch.randn(3, 7, 5, 5, device=device).contiguous(memory_format=fmt) for _ in range(3)]
    _compare_training(fused, eager, inputs, dtype)


def test_dense_layer_takes_a_list_of_features(path, device, tv, needs_ext):
    eager = tv.models.densenet._DenseLayer(7, growth_rate=3, bn_size=2, drop_rate=0.0)
    fused = twin(eager, fastres.nn.DenseLayer(7, 3, 2, 0.0)).to(device)
    parts = [torch.randn(2, 4, 5, 5, device=device), torch.randn(2, 3, 5, 5, device=device)]
    assert_normwise_close(fused(parts), eager.to(device)(parts))


BLOCKS = [
    # (num_layers, num_input_features, bn_size, growth_rate, batch, size)
    (3, 5, 2, 3, 2, 5),
    (4, 3, 1, 4, 1, 7),  # N=1, C0=3
    (2, 6, 2, 2, 3, 1),  # H=W=1
]


# Every config, dtype and layout on the reference path; the interpreter (slow) runs each config in both
# dtypes and both layouts, two of the four pairings per config.
BLOCK_CASES = [
    (p, config, dtype, cl) for p in ("triton", "reference") for i, config in enumerate(BLOCKS)
    for dtype in (torch.float32, torch.float64) for cl in (False, True)
    if torch.cuda.is_available() or p == "reference" or (i + cl + (dtype == torch.float64)) % 2 == 0
]
if torch.cuda.is_available():
    BLOCK_CASES = [c for c in BLOCK_CASES if c[0] == "triton"]


@pytest.mark.parametrize("path, config, dtype, channels_last", BLOCK_CASES, ids=[
    f"{p}-L{b[0]}_C{b[1]}_k{b[3]}_N{b[4]}_{b[5]}x{b[5]}-{'channels_last' if cl else 'nchw'}-{str(d)[-7:]}"
    for p, b, d, cl in BLOCK_CASES])
def test_dense_block_matches_torchvision(on_path, device, tv, needs_ext, path, config, dtype, channels_last):
    on_path(path)
    num_layers, c0, bn_size, k, batch, size = config
    eager = tv.models.densenet._DenseBlock(num_layers, c0, bn_size, k, drop_rate=0.0)
    fused = twin(eager, fastres.nn.DenseBlock(num_layers, c0, bn_size, k))
    eager, fused = eager.to(device, dtype), fused.to(device, dtype)
    fmt = _fmt(channels_last)
    inputs = [torch.randn(batch, c0, size, size, device=device).contiguous(memory_format=fmt) for _ in range(3)]
    _compare_training(fused, eager, inputs, dtype)


@pytest.mark.parametrize("memory_efficient", [True, False], ids=["shared", "naive"])
def test_dense_block_with_dropout_matches_torchvision(path, device, tv, needs_ext, memory_efficient):
    eager = tv.models.densenet._DenseBlock(3, 4, 2, 3, drop_rate=0.25)
    fused = twin(eager, fastres.nn.DenseBlock(3, 4, 2, 3, drop_rate=0.25, memory_efficient=memory_efficient))
    eager, fused = eager.to(device, torch.float64), fused.to(device, torch.float64)
    inputs = [torch.randn(2, 4, 6, 6, device=device) for _ in range(2)]
    _compare_training(fused, eager, inputs, torch.float64)


@pytest.mark.parametrize(
    "options",
    [{"momentum": None}, {"affine": False}, {"track_running_stats": False}, {"eps": 1e-3, "momentum": 0.3}],
    ids=["momentum_none", "affine_false", "no_running_stats", "eps_momentum"],
)
def test_dense_block_follows_batch_norm_options(path, device, tv, needs_ext, options):
    """Every BatchNorm2d option the block's norms may carry, as eager BatchNorm2d applies it."""
    eager = tv.models.densenet._DenseBlock(3, 5, 2, 3, drop_rate=0.0)
    for layer in eager.values():
        for name in ("norm1", "norm2"):
            setattr(layer, name, nn.BatchNorm2d(getattr(layer, name).num_features, **options))
    fused = fastres.nn.DenseBlock(3, 5, 2, 3)
    for f_layer, e_layer in zip(fused.values(), eager.values()):
        f_layer.norm1, f_layer.norm2 = copy.deepcopy(e_layer.norm1), copy.deepcopy(e_layer.norm2)
    fused = twin(eager, fused)
    eager, fused = eager.to(device, torch.float64), fused.to(device, torch.float64)
    assert all(layer.shares_storage() for layer in fused.values())
    inputs = [torch.randn(2, 5, 4, 4, device=device) for _ in range(3)]
    _compare_training(fused, eager, inputs, torch.float64)


def test_running_statistics_are_updated_once_per_step(path, device, tv, needs_ext):
    """Backward recomputes the BN-ReLUs from saved statistics (or, fused, reads them) and leaves the buffers alone.

    torchvision's checkpointing re-runs norm1 in backward and counts the batch twice.
    """
    block = fastres.nn.DenseBlock(3, 4, 2, 3).to(device)
    x = torch.randn(2, 4, 5, 5, device=device, requires_grad=True)
    out = block(x)
    before = {name: b.clone() for name, b in block.named_buffers()}
    out.sum().backward()
    for name, b in block.named_buffers():
        assert torch.equal(b, before[name]), name
    assert all(layer.norm1.num_batches_tracked.item() == 1 for layer in block.values())

    checkpointed = tv.models.densenet._DenseBlock(3, 4, 2, 3, 0.0, memory_efficient=True).to(device)
    checkpointed(x).sum().backward()
    assert checkpointed.denselayer1.norm1.num_batches_tracked.item() == 2


def test_transition_matches_torchvision(path, device, tv):
    eager = tv.models.densenet._Transition(6, 3)
    fused = twin(eager, fastres.nn.Transition(6, 3))
    eager, fused = eager.to(device, torch.float64), fused.to(device, torch.float64)
    inputs = [torch.randn(2, 6, 6, 6, device=device) for _ in range(2)]
    _compare_training(fused, eager, inputs, torch.float64)


# --- models -----------------------------------------------------------------

# Whole models in float64, for the reason given in test_resnet.py (a ReLU flip
# in float32 moves every gradient upstream).
TINY = {"growth_rate": 4, "block_config": (2, 3, 2), "num_init_features": 8, "bn_size": 2, "num_classes": 5}


@LAYOUTS
@pytest.mark.parametrize("memory_efficient", [True, False], ids=["shared", "naive"])
def test_model_matches_torchvision(path, device, tv, needs_ext, channels_last, memory_efficient):
    eager = tv.models.DenseNet(**TINY, drop_rate=0.1)
    fused = twin(eager, fastres.models.DenseNet(**TINY, drop_rate=0.1, memory_efficient=memory_efficient))
    fmt = _fmt(channels_last)
    eager, fused = (m.to(device, torch.float64, memory_format=fmt) for m in (eager, fused))
    inputs = [torch.randn(3, 3, 32, 32, device=device).contiguous(memory_format=fmt) for _ in range(2)]
    _compare_training(fused, eager, inputs, torch.float64)


def test_densenet_bc_shared_matches_naive(path, device, needs_ext):
    """The CIFAR-style stem has no torchvision counterpart: shared storage against fastres's naive path."""
    torch.manual_seed(0)
    shared = fastres.models.densenet_bc(depth=16, growth_rate=4, drop_rate=0.2)
    naive = twin(shared, fastres.models.densenet_bc(depth=16, growth_rate=4, drop_rate=0.2, memory_efficient=False))
    assert [n for n, _ in shared.named_modules()] == [n for n, _ in naive.named_modules()]
    shared, naive = shared.to(device, torch.float64), naive.to(device, torch.float64)
    inputs = [torch.randn(2, 3, 16, 16, device=device) for _ in range(2)]
    _compare_training(shared, naive, inputs, torch.float64)


@pytest.mark.full_size  # DenseNet-121: on the emulated CUDA kernels only with FASTRES_EMULATOR_FULL=1
def test_densenet121_float32_forward_matches_torchvision(path, device, tv, needs_ext):
    eager = tv.models.densenet121(num_classes=10).to(device)
    fused = twin(eager, fastres.models.densenet121(num_classes=10)).to(device)
    x = torch.randn(2, 3, 64, 64, device=device)
    assert_forward_as_accurate_as_eager(fused, eager, x)


@pytest.mark.parametrize("builder", ["densenet121", "densenet161", "densenet169", "densenet201"])
def test_builder_has_torchvision_keys_and_loads_its_state_dict(tv, builder):
    eager = getattr(tv.models, builder)()
    fused = getattr(fastres.models, builder)()
    assert list(fused.state_dict()) == list(eager.state_dict())
    fused.load_state_dict(eager.state_dict())  # strict


def test_old_checkpoint_keys_are_remapped(tv):
    """Keys saved as ``denselayer1.norm.1.weight`` load, as torchvision's loader remaps them."""
    eager = tv.models.DenseNet(**TINY)
    old = {}
    for key, value in eager.state_dict().items():
        for name in ("norm1", "norm2", "conv1", "conv2", "relu1", "relu2"):
            key = key.replace(f".{name}.", f".{name[:-1]}.{name[-1]}.")
        old[key] = value
    assert any(".norm.1." in key for key in old)
    fused = fastres.models.DenseNet(**TINY)
    fused.load_state_dict(old)  # strict
    for (name, a), (_, b) in zip(fused.state_dict().items(), eager.state_dict().items()):
        assert torch.equal(a, b), name
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    eager.load_state_dict(torch.load(buffer))


def test_builders_take_torchvision_arguments():
    model = fastres.models.densenet121(drop_rate=0.2, num_classes=7, memory_efficient=False)
    assert model.classifier.out_features == 7
    assert all(not block.memory_efficient for name, block in model.features.named_children() if "block" in name)
    bc = fastres.models.densenet_bc(depth=100, growth_rate=12)
    assert [len(b) for n, b in bc.features.named_children() if "block" in n] == [16, 16, 16]
    assert bc.features.conv0.kernel_size == (3, 3) and not hasattr(bc.features, "pool0")
    assert len([m for m in fastres.models.densenet264().modules() if isinstance(m, fastres.nn.DenseLayer)]) == 130


# --- memory -----------------------------------------------------------------


def _block_saved_bytes(num_layers: int, memory_efficient: bool, device) -> int:
    block = fastres.nn.DenseBlock(num_layers, 8, 2, 4, memory_efficient=memory_efficient).to(device)
    x = torch.randn(2, 8, 6, 6, device=device, requires_grad=True)
    return saved_bytes(lambda: block(x))


def test_saved_bytes_grow_linearly_with_depth(device, needs_ext, monkeypatch):
    """Per extra layer the shared block keeps a constant number of bytes; the naive one, more each time."""
    # On CPU the naive block's ops are eager's (what torchvision keeps).
    depths = [2, 3, 4, 5, 6]
    n, hw, k, bottleneck, c0 = 2, 36, 4, 8, 8
    shared = [_block_saved_bytes(d, True, device) for d in depths]
    naive = [_block_saved_bytes(d, False, device) for d in depths]
    shared_steps = [b - a for a, b in zip(shared, shared[1:])]
    naive_steps = [b - a for a, b in zip(naive, naive[1:])]
    # One more layer: k feature channels in the shared buffer and its
    # bottleneck output, plus its four per-channel statistics (norm1's grow by
    # k channels each layer: 2 * k * 4 bytes, independent of N, H and W).
    for depth, step in zip(depths, shared_steps):
        c = c0 + depth * k  # channels norm1 of the added layer reads
        assert step == 4 * (n * hw * (k + bottleneck) + 2 * c + 2 * bottleneck)
    # The naive layer keeps its concatenation and BN-ReLU output, each growing by k channels per layer.
    growth = [b - a for a, b in zip(naive_steps, naive_steps[1:])]
    assert all(g >= 2 * 4 * n * hw * k for g in growth), growth
    assert shared[-1] < naive[-1] / 2


# --- a missing extension ---------------------------------------------------


def test_missing_extension_is_reported_on_the_path_that_needs_it(monkeypatch):
    """``import fastres`` works without fastres._C; the shared-storage block says what is missing."""
    import subprocess
    import sys

    code = "import sys; sys.modules['fastres._C'] = None; import fastres; m = fastres.models.densenet121(memory_efficient=False); print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "ok"

    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setitem(__import__("sys").modules, "fastres._C", None)  # import fails as for a missing build
    with pytest.raises(RuntimeError, match="fastres._C .* could not be imported.*--no-build-isolation"):
        fastres.nn.DenseBlock(2, 3, 2, 2)(torch.randn(2, 3, 4, 4))
    # The naive path needs no extension.
    fastres.nn.DenseBlock(2, 3, 2, 2, memory_efficient=False)(torch.randn(2, 3, 4, 4))


def test_block_under_cpu_autocast_runs_as_eager_does(tv, needs_ext):
    """The C++ CPU ops take float32/float64: under CPU autocast the block runs its naive path, as eager."""
    eager = tv.models.densenet._DenseBlock(2, 4, 2, 3, drop_rate=0.0)
    fused = twin(eager, fastres.nn.DenseBlock(2, 4, 2, 3))
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = fused(x), eager(x)
    assert out.dtype == ref.dtype
    assert_modules_normwise_close(fused, eager)


def test_convert_turns_a_torchvision_densenet_into_shared_storage(path, device, tv, needs_ext):
    """Compared with torchvision's naive mode: its checkpointing updates running statistics twice."""
    model = tv.models.DenseNet(**TINY, memory_efficient=True).to(device)  # torchvision's checkpointing
    eager = copy.deepcopy(model)
    for layer in eager.modules():
        if hasattr(layer, "memory_efficient"):
            layer.memory_efficient = False
    params_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict())
    assert fastres.convert(model) is model
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"DenseBlock", "DenseLayer", "Transition"} <= kinds
    assert not {"_DenseBlock", "_DenseLayer", "_Transition", "BatchNormReLU2d", "Identity"} & kinds
    assert isinstance(model, fastres.models.DenseNet)  # the stem and the final BN-ReLU run fused, as fastres's
    assert all(b.memory_efficient for b in model.modules() if isinstance(b, fastres.nn.DenseBlock))
    assert [id(p) for p in model.parameters()] == params_before and list(model.state_dict()) == keys_before
    model, eager = model.double(), eager.double()
    _compare_training(model, eager, [torch.randn(2, 3, 32, 32, device=device) for _ in range(2)], torch.float64)


def test_converted_torchvision_densenet_saves_what_fastres_builder_saves(path, device, tv, needs_ext):
    """convert() keeps the stem's and the transitions' BN-ReLU recompute and the fused final BN-ReLU.

    Before, its Sequential pass re-fused the transitions' and the stem's
    BN/ReLU into BatchNormReLU2d + Identity, which keep each BN-ReLU output.
    (A small DenseNet: the same stem, blocks and transitions as densenet121's.)
    """
    eager = tv.models.DenseNet(**TINY).to(device)
    model = fastres.convert(copy.deepcopy(eager))
    builder = twin(eager, fastres.models.DenseNet(**TINY).to(device))
    x = torch.randn(2, 3, 32, 32, device=device)
    saved = saved_bytes(lambda: model(x))
    assert saved == saved_bytes(lambda: builder(x))
    assert saved < saved_bytes(lambda: eager(x)) * 2 / 3  # at this depth; densenet121 keeps under a third


@pytest.mark.full_size  # DenseNet-121: on the emulated CUDA kernels only with FASTRES_EMULATOR_FULL=1
def test_converted_torchvision_densenet121_trains_as_torchvision(device, tv, needs_ext):
    """One float64 step: output, input gradient, every parameter's gradient and buffer (the path as set up)."""
    eager = tv.models.densenet121(num_classes=10).to(device).double()
    model = fastres.convert(copy.deepcopy(eager))
    x = [torch.randn(4, 3, 32, 32, device=device)]  # batch 4: 1x1 features at the end, well-conditioned enough
    for got, want in zip(train_steps(model, x), train_steps(eager, x)):
        assert_normwise_close(got, want)
    assert_modules_normwise_close(model, eager)


def test_convert_of_a_bare_dense_block_gets_fastres_layers(path, device, tv, needs_ext):
    eager = tv.models.densenet._DenseBlock(3, 4, 2, 3, drop_rate=0.0).to(device)
    block = fastres.convert(copy.deepcopy(eager))
    assert isinstance(block, fastres.nn.DenseBlock)
    assert all(type(layer) is fastres.nn.DenseLayer for layer in block.values())
    x = torch.randn(2, 4, 6, 6, device=device)
    built = twin(eager, fastres.nn.DenseBlock(3, 4, 2, 3).to(device))
    assert saved_bytes(lambda: block(x * 1)) == saved_bytes(lambda: built(x * 1))
    eager.load_state_dict(block.state_dict())
    _compare_training(block.double(), eager.double(), [x], torch.float64)


def test_convert_leaves_fastres_densenets_as_they_are(tv):
    for model in (fastres.models.densenet_bc(22), fastres.models.DenseNet(**TINY), fastres.convert(tv.models.DenseNet(**TINY))):
        modules = [(name, type(m)) for name, m in model.named_modules()]
        assert fastres.convert(model) is model
        assert [(name, type(m)) for name, m in model.named_modules()] == modules


def test_convert_keeps_a_modified_torchvision_densenet_class(tv):
    """A DenseNet whose ``features`` are not torchvision's layout keeps torchvision's forward."""
    model = tv.models.DenseNet(**TINY)
    model.features.add_module("extra", nn.Identity())
    assert type(fastres.convert(model)) is tv.models.DenseNet


def test_transition_keeps_only_its_input_on_cpu(needs_ext):
    """On CPU the transition's BN-ReLU is recomputed in backward, not kept.

    Autograd keeps x (the block's buffer, kept by the block anyway), two
    per-channel vectors, and the average pool's input (the 1x1 convolution's
    output, as in eager).
    """
    transition = fastres.nn.Transition(6, 3)
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    x_used = x * 1  # a non-leaf, as the block's output is
    assert saved_bytes(lambda: transition(x_used)) == 4 * (x.numel() + 2 * 6 + 2 * 3 * 8 * 8)


def test_block_output_used_twice_gets_the_summed_gradient(tv, needs_ext):
    """The block may accumulate into a transition's fresh gradient; a second use of its output must still count."""
    eager_block = tv.models.densenet._DenseBlock(2, 4, 2, 3, drop_rate=0.0).double()
    eager_trans = tv.models.densenet._Transition(10, 5).double()
    block = twin(eager_block, fastres.nn.DenseBlock(2, 4, 2, 3)).double()
    trans = twin(eager_trans, fastres.nn.Transition(10, 5)).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    grads = []
    for b, t in ((block, trans), (eager_block, eager_trans)):
        xl = x.clone().requires_grad_()
        features = b(xl)
        (t(features).square().sum() + (features * torch.arange(10.0, dtype=torch.float64).view(1, 10, 1, 1)).sum()).backward()
        grads.append(xl.grad)
    assert_normwise_close(grads[0], grads[1])
    assert_modules_normwise_close(block, eager_block)


_EMPTY_CASES = {  # (torchvision's module, fastres's, the input's channels and size)
    "model": (lambda tv: tv.models.DenseNet(4, (2, 2), 8, 2, num_classes=5),
              lambda: fastres.models.DenseNet(4, (2, 2), 8, 2, num_classes=5), 3, 32),
    "block": (lambda tv: tv.models.densenet._DenseBlock(2, 4, 2, 3, 0.0), lambda: fastres.nn.DenseBlock(2, 4, 2, 3), 4, 5),
    "layer": (lambda tv: tv.models.densenet._DenseLayer(4, 3, 2, 0.0), lambda: fastres.nn.DenseLayer(4, 3, 2, 0.0), 4, 5),
    "transition": (lambda tv: tv.models.densenet._Transition(4, 2), lambda: fastres.nn.Transition(4, 2), 4, 6),
}


@pytest.mark.parametrize("case", list(_EMPTY_CASES))
def test_an_empty_batch_goes_through_as_in_eager(path, device, tv, case):
    """N=0 in training: eager's empty output and gradients, and its buffers afterwards (NaN where eager's are)."""
    make_eager, make_fused, c, size = _EMPTY_CASES[case]
    eager = make_eager(tv).to(device)
    fused = twin(eager, make_fused()).to(device)
    outs = []
    for model in (fused, eager):
        x = torch.randn(0, c, size, size, device=device, requires_grad=True)
        out = model(x)
        out.sum().backward()
        outs.append((out, x.grad))
    (out, grad), (ref, ref_grad) = outs
    assert out.shape == ref.shape and out.dtype == ref.dtype and grad.shape == ref_grad.shape
    for (name, a), (_, b) in zip(fused.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(a, b, equal_nan=True, msg=name)


# The GPU path's own contract: statistics reduced once per channel, no BN-ReLU output anywhere.


def test_odd_widths_and_one_pixel(path, device, tv, needs_ext):
    """DenseNet-BC-like odd channel counts (C0 3, k 5: no multiple of 16 anywhere), N 1, 1x1 spatial."""
    eager = tv.models.densenet._DenseBlock(2, 3, 3, 5, drop_rate=0.0)
    fused = twin(eager, fastres.nn.DenseBlock(2, 3, 3, 5))
    eager, fused = (m.to(device, torch.float64) for m in (eager, fused))
    _compare_training(fused, eager, [torch.randn(2, 3, 1, 1, device=device)], torch.float64)
    eager.train(), fused.train()
    _compare_training(fused, eager, [torch.randn(1, 3, 4, 4, device=device)], torch.float64)


def test_feature_statistics_are_reduced_once_per_channel(device, gpu_paths, monkeypatch):
    """Per block: the input's channels and each layer's new ones once, each bottleneck once; never a concatenation."""
    from fastres.ops import kernels

    bn = kernels("batch_norm")
    reduced = []
    stats = bn.batch_norm_stats
    monkeypatch.setattr(bn, "batch_norm_stats", lambda x, shape, *a, **k: reduced.append(shape[1]) or stats(x, shape, *a, **k))
    block = fastres.nn.DenseBlock(4, 5, 2, 3).to(device)
    block(torch.randn(2, 5, 4, 4, device=device, requires_grad=True)).sum().backward()
    # Block input (5), the new channels of the first three layers (3 each; the last layer's are read by
    # no later layer), and each layer's bottleneck (6).
    assert sorted(reduced) == sorted([5, 3, 3, 3] + [6] * 4)


def test_no_bn_relu_output_is_kept(device, gpu_paths):
    """Autograd keeps the block's buffer and, per layer, the bottleneck and per-channel vectors: nothing else."""
    n, c0, k, bottleneck, hw, layers = 2, 6, 3, 6, 16, 3
    block = fastres.nn.DenseBlock(layers, c0, 2, k).to(device)
    x = torch.randn(n, c0, 4, 4, device=device, requires_grad=True)
    kept = saved_bytes(lambda: block(x))
    features = n * (c0 + layers * k) * hw * 4
    per_layer = [n * bottleneck * hw * 4 + 4 * (2 * (c0 + i * k) + 1) + 4 * (2 * bottleneck + 1) for i in range(layers)]
    assert kept == features + sum(per_layer)
