"""Train a fused fastres ResNet next to torchvision's eager one, in lockstep.

    python -m fastres.train_demo [--arch resnet50] [--device cuda] [--amp] ...

Both models start from the same weights and see the same batches in the same
order with the same optimizer, so any difference in their losses, logits,
parameters or BatchNorm buffers is fastres computing something else than eager
PyTorch. Data is scikit-learn's handwritten digits (ships with the package, no
download). Exits non-zero if the float32 logits disagree beyond tolerance.
"""

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import fastres.models
from fastres import ops
from fastres._torchvision import import_torchvision

ARCHS = ("resnet18", "resnet34", "resnet50")
LOGIT_TOL = 1e-4  # float32 max |logit difference| allowed at each logged step
WARMUP = 5  # first steps left out of the mean step time (allocation, autotuning)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="resnet18")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (meant for CUDA)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.log_every < 1:
        p.error("--steps, --batch-size and --log-every must be positive")
    return args


def load_digits_data(image_size, seed, device):
    """Digits as normalised 3-channel images, split 80/20 with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("the demo's data comes from scikit-learn: pip install scikit-learn")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # N x 1 x 8 x 8
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()  # statistics of the training set only
    x = (x - mean) / std
    # ResNets expect RGB input; the stem's strides need more than 8x8 pixels.
    x = F.interpolate(x.repeat(1, 3, 1, 1), size=image_size, mode="bilinear", align_corners=False)
    return (x[train].to(device), y[train].to(device)), (x[test].to(device), y[test].to(device))


def batch_order(n, batch_size, steps, seed):
    """Index tensors for every step: reshuffled each epoch, the same for both models."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.randperm(n, generator=gen) for _ in range(steps * batch_size // n + 1)])
    return [idx[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def build_models(arch, device, channels_last, seed):
    """torchvision's model and fastres's, with identical weights."""
    tv = import_torchvision()
    torch.manual_seed(seed)
    eager = getattr(tv.models, arch)(num_classes=10)
    fused = getattr(fastres.models, arch)(num_classes=10)
    fused.load_state_dict(eager.state_dict())  # fastres mirrors torchvision's names
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return eager.to(device, memory_format=fmt), fused.to(device, memory_format=fmt)


def make_optimizer(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, opt, x, y, amp):
    """One SGD step; returns (loss, logits, milliseconds)."""
    sync(x.device)
    start = time.perf_counter()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sync(x.device)
    return loss.item(), logits.detach().float(), (time.perf_counter() - start) * 1e3


@torch.no_grad()
def accuracy(model, x, y, amp, batch_size=256):
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    model.train()
    return correct / len(y)


def compare_state(eager, fused):
    """Max |difference| of parameters and BN running stats; whether BN counters agree."""
    fs = fused.state_dict()
    param_names = {n for n, _ in eager.named_parameters()}
    param_diff = stat_diff = 0.0
    counters_agree = True
    for name, e in eager.state_dict().items():
        f = fs[name]
        if name.endswith("num_batches_tracked"):
            counters_agree &= bool(torch.equal(e, f))
            continue
        diff = (e.float() - f.float()).abs().max().item()
        if name in param_names:
            param_diff = max(param_diff, diff)
        elif name.endswith(("running_mean", "running_var")):
            stat_diff = max(stat_diff, diff)
    return param_diff, stat_diff, counters_agree


def fastres_path(device):
    """Which implementation fastres's ops dispatch to for tensors on ``device``."""
    if not ops.use_triton(torch.empty(0, device=device)):
        return f"eager PyTorch reference on {device.type.upper()}"
    return "Triton kernels on CUDA" if device.type == "cuda" else "Triton interpreter on CPU"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    strict = not args.amp  # bf16 rounding differs between kernels: report, don't fail
    # TF32 rounding and cuDNN's atomics-based backward convolutions would make two
    # eager runs drift apart on their own; the float32 check compares fastres alone.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = strict
    (x_train, y_train), (x_test, y_test) = load_digits_data(args.image_size, args.seed, device)
    eager, fused = build_models(args.arch, device, args.channels_last, args.seed)
    opt_e, opt_f = make_optimizer(eager, args.lr), make_optimizer(fused, args.lr)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    print(f"fastres demo: {args.arch}, {len(y_train)} train / {len(y_test)} test digits at "
          f"{args.image_size}x{args.image_size}, batch {args.batch_size}, {args.steps} steps, "
          f"device {device}, {'bf16 autocast' if args.amp else 'float32'}"
          f"{', channels_last' if args.channels_last else ''}")
    print(f"fastres path: {fastres_path(device)}")
    print(f"{'step':>5} {'eager loss':>11} {'fused loss':>11} {'max|dlogit|':>12} "
          f"{'eager ms':>9} {'fused ms':>9}")

    times_e, times_f, failures = [], [], []
    for step, idx in enumerate(batch_order(len(y_train), args.batch_size, args.steps, args.seed), 1):
        x, y = x_train[idx].contiguous(memory_format=fmt), y_train[idx]
        loss_e, logits_e, ms_e = train_step(eager, opt_e, x, y, args.amp)
        loss_f, logits_f, ms_f = train_step(fused, opt_f, x, y, args.amp)
        times_e.append(ms_e)
        times_f.append(ms_f)
        if step % args.log_every == 0 or step in (1, args.steps):
            dlogit = (logits_e - logits_f).abs().max().item()
            print(f"{step:>5} {loss_e:>11.5f} {loss_f:>11.5f} {dlogit:>12.3e} {ms_e:>9.1f} {ms_f:>9.1f}")
            if strict and not dlogit <= LOGIT_TOL:  # `not <=` also catches NaN
                failures.append(f"step {step}: max |logit difference| {dlogit:.3e} > {LOGIT_TOL:.0e}")

    skip = min(WARMUP, args.steps - 1)  # short runs still drop the first, slowest step
    mean_e = sum(times_e[skip:]) / len(times_e[skip:])
    mean_f = sum(times_f[skip:]) / len(times_f[skip:])
    param_diff, stat_diff, counters_agree = compare_state(eager, fused)
    if not counters_agree:
        failures.append("BatchNorm num_batches_tracked differ")
    print(f"mean step time, steps {skip + 1}-{args.steps}: "
          f"eager {mean_e:.1f} ms, fused {mean_f:.1f} ms, speedup {mean_e / mean_f:.2f}x")
    print(f"max |difference|: parameters {param_diff:.3e}, BN running stats {stat_diff:.3e}, "
          f"num_batches_tracked {'agree' if counters_agree else 'DIFFER'}")
    print(f"test accuracy: eager {accuracy(eager, x_test, y_test, args.amp):.4f}, "
          f"fused {accuracy(fused, x_test, y_test, args.amp):.4f}")

    if failures:
        print("FAIL: fused and eager models disagree\n  " + "\n  ".join(failures))
        return 1
    print("OK: fused and eager models agree" + ("" if strict else " (bf16: not checked strictly)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
