"""The ``fastres`` command: each subcommand on a tiny CPU configuration, its errors and exit statuses."""

import json
import subprocess
import sys

import pytest
import torch

import fastres.functional
from fastres.cli import main
from fastres.cli import zoo


@pytest.fixture(autouse=True)
def _eager_cpu(monkeypatch):
    """The commands as a CPU user runs them: fastres's CPU path, not Triton's interpreter (``fastres check --interpreter`` is tested on its own)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _exit_status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_console_script_and_module_run():
    out = subprocess.run([sys.executable, "-m", "fastres", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("train", "memory", "bench", "check"):
        assert command in out.stdout
    version = subprocess.run([sys.executable, "-m", "fastres", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"fastres {fastres.__version__}"


@pytest.mark.parametrize("command", [["train"], ["memory"], ["memory", "compare"], ["memory", "batch"], ["bench"], ["check"]])
def test_help(command, capsys):
    assert _exit_status([*command, "--help"]) == 0
    assert "usage: fastres " + " ".join(command) in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: COMMAND"),
        (["nope"], "invalid choice: 'nope'"),
        (["train", "--model", "resnet7"], "argument --model: invalid choice: 'resnet7'"),
        (["train", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["train", "--steps", "2", "--epochs", "1"], "argument --epochs: not allowed with argument --steps"),
        (["train", "--batch-size", "x"], "argument --batch-size: must be an integer, got 'x'"),
        (["train", "--model", "densenet_bc", "--depth", "41"], "argument --depth: DenseNet-BC depth must be 6n + 4"),
        (["train", "--compare", "checkpoint"], "argument --compare: resnet18 can be compared with eager, not checkpoint"),
        (["train", "--model", "densenet264", "--compare", "naive"], "densenet264 can be compared with nothing"),
        (["train", "--check-agreement"], "argument --check-agreement: needs --compare"),
        (["train", "--device", "cuda:0"] if not torch.cuda.is_available() else ["train", "--device", "tpu"],
         "argument --device:"),
        (["train", "--lr", "-1"], "argument --lr: must be positive, got -1"),
        (["train", "--batch-size", "5000"], "argument --batch-size: 5000 is more than the 1438 training images"),
        (["train", "--depth", "40"], "argument --depth/--growth-rate: only for --model densenet_bc, not resnet18"),
        (["train", "--compare", "eager", "--check-agreement", "--amp"], "--check-agreement: trains in float64"),
        (["memory", "report", "/nonexistent.json"], "argument json: cannot read /nonexistent.json"),
        (["train", "--data", "/nonexistent/dir", "--steps", "1"], None),  # SystemExit with a message, not argparse
        (["memory"], "the following arguments are required: MODE"),
        (["memory", "compare", "--variants", "eager"], "argument --variants: invalid choice: 'eager'"),
        (["memory", "budget"], "the following arguments are required: --budget-mb"),
        (["bench", "--suite", "nope"], "argument --suite: invalid choice: 'nope'"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    status = _exit_status(argv)
    err = capsys.readouterr().err
    if message is None:
        assert status == "--data /nonexistent/dir: not a directory"
        return
    assert status == 2
    assert message in err


def test_train_with_eager_comparison(tmp_path, capsys):
    out_json, png = tmp_path / "train.json", tmp_path / "train.png"
    argv = ["train", "--model", "resnet18", "--compare", "eager", "--check-agreement", "--steps", "3",
            "--batch-size", "8", "--json", str(out_json), "--plot", str(png)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "resnet18: 100%" in captured.err  # the progress bar
    assert "| fastres |" in captured.out and "| eager |" in captured.out
    assert "OK: fastres and eager agree" in captured.out
    data = json.loads(out_json.read_text())
    assert data["ok"] and data["steps"] == 3
    fused, eager = data["models"]
    assert len(fused["history"]["loss"]) == 3
    assert fused["history"]["loss"] == pytest.approx(eager["history"]["loss"], rel=1e-5)  # same model, same batches
    assert data["ratios"]["median_step_ms"] == pytest.approx(fused["median_step_ms"] / eager["median_step_ms"])
    assert data["agreement"]["num_batches_tracked_agree"]
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize("compare, says", [
    ("naive", "dense blocks share storage through fastres._C"),
    ("checkpoint", "BN buffers not compared (torchvision's checkpointing updates them twice per step)"),
])
def test_train_densenet_next_to_torchvision(compare, says, capsys):
    argv = ["train", "--model", "densenet_bc", "--depth", "10", "--growth-rate", "4", "--compare", compare,
            "--check-agreement", "--steps", "3" if compare == "naive" else "2", "--batch-size", "8", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"compared with: torchvision densenet_bc ({'naive' if compare == 'naive' else 'checkpointed'})" in out
    assert says in out
    assert f"OK: fastres and {compare} agree" in out


def test_train_fails_when_the_models_disagree(monkeypatch, capsys):
    build_pair = zoo.build_pair

    def perturbed(*args, **kwargs):
        fused, reference = build_pair(*args, **kwargs)
        with torch.no_grad():
            fused.fc.bias.add_(0.1)
        return fused, reference

    monkeypatch.setattr(zoo, "build_pair", perturbed)
    argv = ["train", "--compare", "eager", "--check-agreement", "--steps", "2", "--batch-size", "8", "--no-progress"]
    assert main(argv) == 1
    assert "FAIL:" in capsys.readouterr().out


def test_train_on_an_image_folder(tmp_path, capsys):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog", "fox"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            pixels = (torch.rand(12, 12, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    argv = ["train", "--data", str(tmp_path), "--image-size", "32", "--steps", "2", "--batch-size", "4",
            "--workers", "0", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"image folder {tmp_path} (32x32), 12 train / 3 held out" in out


def test_memory_compare_small_densenet_bc(tmp_path, capsys):
    out_json = tmp_path / "compare.json"
    argv = ["memory", "compare", "--model", "densenet_bc", "--depth", "16", "--batch", "4", "--size", "16",
            "--steps", "1", "--threads", "1", "--json", str(out_json)]
    assert main(argv) == 0
    assert "| fastres |" in capsys.readouterr().out
    rows = {r["variant"]: r for r in json.loads(out_json.read_text())["results"]}
    assert set(rows) == {"fastres", "naive", "checkpoint"}
    # What autograd keeps is deterministic: shared storage keeps less than naive concatenation.
    assert rows["fastres"]["saved_mb"] < rows["naive"]["saved_mb"]
    assert rows["naive"]["memory_ratio"] == 1.0 and rows["fastres"]["memory_ratio"] is not None


def test_memory_batch_within_a_budget(tmp_path, capsys):
    out_json = tmp_path / "batch.json"
    argv = ["memory", "batch", "--model", "densenet_bc", "--depth", "10", "--budget-mb", "1e6", "--max-batch", "2",
            "--size", "8", "--variants", "fastres", "--threads", "1", "--json", str(out_json)]
    assert main(argv) == 0
    (row,) = json.loads(out_json.read_text())["results"]
    assert row["largest_batch"] == 2 and row["capped"]  # everything up to the cap fits a huge budget
    assert "largest batch that fits" in capsys.readouterr().out


def test_check_passes_on_cpu(tmp_path, capsys):
    out_json = tmp_path / "check.json"
    assert main(["check", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert f"torch                    {torch.__version__}" in out
    assert "fastres._C" in out and "✓" in out and "✗" not in out
    data = json.loads(out_json.read_text())
    assert data["ok"] and data["environment"]["torch"] == torch.__version__
    cases = {r["case"] for r in data["self_test"]}
    assert {"add_relu", "batch_norm_relu train + residual", "bn_relu_conv2d 3x3", "DenseNet-BC depth 10 (vs torchvision)"} <= cases


def test_check_fails_when_an_op_is_wrong(monkeypatch, capsys):
    real = fastres.functional.add_relu
    monkeypatch.setattr(fastres.functional, "add_relu", lambda x, identity, inplace=False: real(x, identity, inplace) * 1.01)
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "| add_relu | cpu | float64 | ✗ |" in out and "beyond 1e-09: out:" in out
    assert ": FAIL" in out


def test_check_runs_the_triton_kernels_through_the_interpreter(capsys):
    pytest.importorskip("triton")
    assert main(["check", "--interpreter"]) == 0
    out = capsys.readouterr().out
    assert "| bn_relu_conv2d 3x3 | cpu (interpreter) | float32 | ✓ |" in out


def test_bench_smoke_and_report(tmp_path, capsys):
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "bench"
    select = ["--suite", "add_relu", "-k", "N2-2048x7x7-float32-nchw and not compile", "--out", str(out)]
    assert main(["bench", "--smoke", *select]) == 0  # each case once, untimed: no JSON
    assert not (out / "bench.json").exists()
    assert main(["bench", *select]) == 0
    data = json.loads((out / "bench.json").read_text())
    providers = {b["extra_info"]["provider"] for b in data["benchmarks"]}
    assert {"fastres", "eager"} <= providers
    assert data["machine_info"]["triton_interpret"] is False  # never the interpreter
    assert "| group | provider | mode |" in (out / "report.md").read_text()
    assert list(out.glob("*.png"))


def test_train_resnetv2_next_to_timm(timm):
    # A fresh process: timm imports torchvision, which needs fastres's CPU-torch workaround first.
    argv = ["train", "--model", "resnetv2_18", "--compare", "eager", "--check-agreement", "--steps", "1",
            "--batch-size", "4", "--no-progress"]
    out = subprocess.run([sys.executable, "-m", "fastres", *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compared with: timm resnetv2_18" in out.stdout and "OK: fastres and eager agree" in out.stdout


def test_train_names_an_unreadable_image(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "a" / "broken.png").write_text("not an image")
    argv = ["train", "--data", str(tmp_path), "--image-size", "16", "--epochs", "2", "--batch-size", "2",
            "--workers", "0", "--no-progress"]
    status = _exit_status(argv)
    assert isinstance(status, str) and status.startswith(f"--data {tmp_path}: cannot read an image")
