"""The ``fastres`` command: each subcommand on a tiny CPU configuration, its errors and exit statuses."""

import argparse
import json
import math
import subprocess
import sys

import pytest
import torch

import fastres.functional
from fastres.cli import main
from fastres.cli import memory, zoo
from fastres.cli.measure import DOUBT_MARK, ONE_STEP, step_spread, timing_doubts, timing_note


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
        (["train", "--opt", "lamb"], "argument --opt: invalid choice: 'lamb'"),
        (["train", "--sched", "poly"], "argument --sched: invalid choice: 'poly'"),
        (["train", "--warmup-steps", "-1"], "argument --warmup-steps: must be at least 0, got -1"),
        (["train", "--label-smoothing", "1"], "argument --label-smoothing: must be less than 1, got 1"),
        (["train", "--weight-decay", "nan"], "argument --weight-decay: must be at least 0, got nan"),
        (["train", "--grad-clip", "0"], "argument --grad-clip: must be positive, got 0"),
        (["train", "--batch-size", "5000"], "argument --batch-size: 5000 is more than the 1438 training images"),
        (["train", "--depth", "40"], "argument --depth/--growth-rate: only for --model densenet_bc, not resnet18"),
        (["train", "--compare", "eager", "--check-agreement", "--amp"], "--check-agreement: trains in float64"),
        (["memory", "report", "/nonexistent.json"], "argument json: cannot read /nonexistent.json"),
        (["train", "--cuda-graphs"] if not torch.cuda.is_available() else ["train", "--cuda-graphs", "--device", "cpu"],
         "argument --cuda-graphs: CUDA graphs need a CUDA device; this run is on cpu"),
        (["train", "--save-every", "5"], "argument --save-every: needs --output DIR"),
        (["train", "--resume", "auto"], "argument --resume auto: needs --output DIR"),
        (["train", "--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
        (["train", "--amp", "--dtype", "float64"], "argument --amp: autocast runs float32 models in bf16"),
        (["train", "--opt", "adamw", "--nesterov"], "argument --nesterov: SGD's momentum; not with --opt adamw"),
        (["train", "--keep", "2"], "argument --keep: needs --output DIR"),
        (["train", "--keep", "0", "--output", "o"], "argument --keep: must be at least 1, got 0"),
        (["train", "--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
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


@pytest.mark.parametrize("fastres_ms, naive_ms, doubts", [
    ([12.0], [15.0], [ONE_STEP]),  # one measured step: no spread to judge by
    ([12.0, 12.2, 12.4, 12.6], [15.0, 15.1, 15.1, 15.2], []),  # steps agree, medians far apart
    # fastres's steps spread 19.5 ms (q1-q3) around a median 4.5 ms from naive's
    ([10.0, 11.0, 30.0, 31.0], [25.0, 25.0, 25.0, 25.0],
     ["q1-q3 spread 19.5 ms is larger than the 4.5 ms difference between naive and fastres"]),
])
def test_timing_doubts(fastres_ms, naive_ms, doubts):
    spreads = {v: step_spread([ms / 1e3 for ms in times]) for v, times in (("fastres", fastres_ms), ("naive", naive_ms))}
    judged = timing_doubts(spreads, reference="naive")
    assert judged == {"fastres": doubts, "naive": doubts}  # a pair's reason is the same for both
    note = timing_note(judged, "Rerun.")
    assert (note is None) == (not doubts)
    if doubts:
        assert note.startswith(f"{DOUBT_MARK} step times not to be trusted: ") and note.endswith(". Rerun.")


def test_timing_doubts_compare_each_with_each_without_a_reference():
    spreads = {v: step_spread(t) for v, t in {"a": [1.0, 1.1, 1.2], "b": [1.0, 2.0, 3.0], "c": [5.0, 5.1, 5.2]}.items()}
    judged = timing_doubts(spreads)
    # b's spread (1 s) exceeds its 0.9 s difference from a, not its 3.1 s from c
    assert judged == {"a": ["q1-q3 spread 1000 ms is larger than the 900 ms difference between a and b"],
                      "b": ["q1-q3 spread 1000 ms is larger than the 900 ms difference between a and b"], "c": []}


def test_memory_table_marks_times_within_their_spread():
    def row(variant, step_ms):
        times = [ms / 1e3 for ms in step_ms]
        return {"variant": variant, "growth_mb": 10.0, "saved_mb": 5.0, "step_s": sorted(times)[1],
                "step_times_s": times}

    rows = [row("fastres", [12.0, 12.4, 13.0]), row("naive", [14.8, 15.0, 15.2]), row("checkpoint", [10.0, 15.3, 30.0])]
    memory._ratios(rows)
    memory._judge_timings(rows, "compare")
    assert [r["timing_trusted"] for r in rows] == [True, False, False]  # checkpoint's 10 ms spread hides its 0.3 ms
    data = {
        "mode": "compare", "results": rows,
        "machine_info": {"device_name": "cpu", "torch": "2", "triton": None, "cuda": None, "fastres": "0",
                         "date": "today"},
        "config": {"batch": 4, "size": 16, "dtype": "float32", "layout": "nchw", "threads": 1, "warmup": 1, "steps": 3,
                   "repeats": 1, "model": "densenet_bc-16-k12"},
    }
    lines = memory.render(data).splitlines()
    table = {line.split(" | ")[0].removeprefix("| "): line for line in lines if line.startswith("| ")}
    assert DOUBT_MARK not in table["fastres"] and "| 12.2-12.7 |" in table["fastres"]
    assert table["checkpoint"].count(DOUBT_MARK) == 2  # its step time and its ratio to naive
    assert table["naive"].count(DOUBT_MARK) == 1  # its step time; its 1.00x is no measurement
    assert (f"{DOUBT_MARK} step times not to be trusted: q1-q3 spread 10 ms is larger than the 0.3 ms difference "
            "between naive and checkpoint. Rerun with more --steps (e.g. --steps 10) or --repeats, --threads 1, "
            "on an otherwise idle machine.") in lines


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
    assert fused["step_spread"]["n"] == 2  # steps 2-3: the first is left out
    assert fused["timing_trusted"] is (not fused["timing_doubts"]) and ONE_STEP not in fused["timing_doubts"]
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
    one_step = compare == "checkpoint"  # --steps 2: the first is left out, one is measured
    assert (f"{DOUBT_MARK} step times not to be trusted: every entry: {ONE_STEP}" in out) == one_step
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
    out = capsys.readouterr().out
    assert "| fastres |" in out
    rows = {r["variant"]: r for r in json.loads(out_json.read_text())["results"]}
    assert set(rows) == {"fastres", "naive", "checkpoint"}
    # What autograd keeps is deterministic: shared storage keeps less than naive concatenation.
    assert rows["fastres"]["saved_mb"] < rows["naive"]["saved_mb"]
    assert rows["naive"]["memory_ratio"] == 1.0 and rows["fastres"]["memory_ratio"] is not None
    # One measured step: every time is marked, in the table, under it and in the JSON.
    fastres_row = next(line for line in out.splitlines() if line.startswith("| fastres |"))
    assert fastres_row.count(DOUBT_MARK) == 2  # the step time and its ratio to naive
    assert "| 1.00x |" in next(line for line in out.splitlines() if line.startswith("| naive |"))
    assert f"{DOUBT_MARK} step times not to be trusted: every entry: {ONE_STEP}." in out
    assert "--steps" in out and "--threads 1" in out and "idle machine" in out
    for r in rows.values():
        assert r["timing_trusted"] is False and r["timing_doubts"] == [ONE_STEP] and r["step_spread"]["n"] == 1


def test_memory_batch_within_a_budget(tmp_path, capsys):
    out_json = tmp_path / "batch.json"
    argv = ["memory", "batch", "--model", "densenet_bc", "--depth", "10", "--budget-mb", "1e6", "--max-batch", "2",
            "--size", "8", "--variants", "fastres", "--threads", "1", "--json", str(out_json)]
    assert main(argv) == 0
    (row,) = json.loads(out_json.read_text())["results"]
    assert row["largest_batch"] == 2 and row["capped"]  # everything up to the cap fits a huge budget
    assert row["timing_doubts"] == [ONE_STEP]  # budget and batch measure one step by default
    out = capsys.readouterr().out
    assert "largest batch that fits" in out and f"{DOUBT_MARK} step times not to be trusted: fastres: {ONE_STEP}" in out


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
    assert main(["bench", "--smoke", *select]) == 0  # each case once, untimed
    assert not out.exists()  # writes nothing, not even the folder
    assert main(["bench", *select]) == 0
    data = json.loads((out / "bench.json").read_text())
    providers = {b["extra_info"]["provider"] for b in data["benchmarks"]}
    assert {"fastres", "eager"} <= providers
    for b in data["benchmarks"]:  # each case's time judged against its group's eager
        assert b["extra_info"]["timing_trusted"] is (not b["extra_info"]["timing_doubts"])
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


def test_train_help_gives_every_options_default():
    from fastres.cli import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and a.nargs != 0 and "default" not in (a.help or "")]
    assert not missing


@pytest.mark.parametrize("sched, warmup, total, expected", [
    ("none", 0, 4, [1, 1, 1, 1]),
    ("step", 0, 8, [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]),  # x0.1 at 50% and 75%
    ("cosine", 2, 6, [1 / 3, 2 / 3, 1, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
])
def test_learning_rate_schedules(sched, warmup, total, expected):
    from fastres.cli.optim import lr_factor

    assert [lr_factor(i, total, sched, warmup) for i in range(total)] == pytest.approx(expected, rel=1e-12)


def test_train_with_adamw_a_schedule_label_smoothing_and_clipping(tmp_path, capsys):
    """Both models under the same options agree in float64; the steps' learning rates are the schedule's."""
    from fastres.cli.optim import lr_factor

    out_json = tmp_path / "train.json"
    argv = ["train", "--model", "resnet18", "--compare", "eager", "--check-agreement", "--steps", "4",
            "--batch-size", "8", "--opt", "adamw", "--lr", "0.01", "--weight-decay", "0.05", "--sched", "cosine",
            "--warmup-steps", "1", "--label-smoothing", "0.1", "--grad-clip", "0.5", "--log-every", "2",
            "--no-progress", "--json", str(out_json)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "OK: fastres and eager agree" in out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("step ")] == [
        f"step 2/4 lr {0.01 * lr_factor(1, 4, 'cosine', 1):.4g}", f"step 4/4 lr {0.01 * lr_factor(3, 4, 'cosine', 1):.4g}"]
    data = json.loads(out_json.read_text())
    fused, eager = data["models"]
    expected = [0.01 * lr_factor(i, 4, "cosine", 1) for i in range(4)]
    assert fused["history"]["lr"] == pytest.approx(expected, rel=1e-12) and eager["history"]["lr"] == fused["history"]["lr"]
    assert data["config"]["opt"] == "adamw" and data["config"]["label_smoothing"] == 0.1
