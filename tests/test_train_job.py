"""``fastres train`` as a long-running job: checkpoints, exact resume after SIGKILL, fallbacks, recipes.

The kill tests run ``fastres train`` in subprocesses that SIGKILL themselves:
at a random training step, or halfway through writing a checkpoint (the
serialized bytes half written to the temporary file). Resumed with
``--resume auto``, each must end with the model, optimizer and schedule
bitwise equal to an uninterrupted run's.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from fastres.cli import checkpoint, main

# DenseNet-BC-10 (k=4) on digits at 16x16: 11 steps per epoch at batch 128, so a 14-step run
# evaluates (and may write best.pt) at step 11, checkpoints every 4 steps and at the end.
RUN = ["train", "--model", "densenet_bc", "--depth", "10", "--growth-rate", "4", "--image-size", "16",
       "--batch-size", "128", "--steps", "14", "--save-every", "4", "--keep", "2", "--sched", "cosine",
       "--warmup-steps", "2", "--no-progress"]
TOTAL = 14

CHILD = textwrap.dedent("""
    import io, os, signal, sys

    import torch

    from fastres.cli import main, trainee

    mode, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    calls = [0]
    if mode == "step":  # killed as the at-th training step starts
        step = trainee.Trainee.step

        def killing_step(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, *args, **kwargs)

        trainee.Trainee.step = killing_step
    elif mode in ("SIGTERM", "SIGINT"):  # the signal arrives during the at-th training step
        step = trainee.Trainee.step

        def signalled_step(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), getattr(signal, mode))
            return step(self, *args, **kwargs)

        trainee.Trainee.step = signalled_step
    elif mode == "write":  # killed halfway through writing the at-th checkpoint file
        save = torch.save

        def killing_save(obj, f, *args, **kwargs):
            calls[0] += 1
            if calls[0] != at:
                return save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = killing_save
    sys.exit(main(argv))
""")


def _run(tmp_path, argv, mode="none", at=0):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), mode, str(at), *argv], capture_output=True, text=True,
                          env=env, timeout=600)


def _state(path):
    return checkpoint.load(path)


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    ta, tb = a["trainees"]["fastres"], b["trainees"]["fastres"]
    for key in ("model",):
        assert ta[key].keys() == tb[key].keys()
        bad = [k for k in ta[key] if not torch.equal(ta[key][k], tb[key][k])]
        assert not bad, f"{key} differs at {bad[:5]}"
    oa, ob = ta["optimizer"], tb["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)
    assert ta["scheduler"] == tb["scheduler"]
    assert ta["history"]["loss"] == tb["history"]["loss"] and ta["history"]["lr"] == tb["history"]["lr"]
    assert a["epochs"] == b["epochs"] and a["best"] == b["best"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = _run(out, RUN + ["--output", str(out / "run"), "--workers", "2"])
    assert done.returncode == 0, done.stderr
    return out / "run"


def _kill_and_resume(tmp_path, uninterrupted, mode, at):
    run = tmp_path / "run"
    argv = RUN + ["--output", str(run), "--resume", "auto", "--workers", "2"]
    killed = _run(tmp_path, argv, mode, at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (run / f"step-{TOTAL:08d}.pt").exists()
    for _, path in checkpoint.Folder(run, 2).steps():  # every completed checkpoint is intact
        _state(path)
    resumed = _run(tmp_path, argv)
    assert resumed.returncode == 0, resumed.stderr
    final = _state(run / f"step-{TOTAL:08d}.pt")
    _assert_bitwise_equal(final, _state(uninterrupted / f"step-{TOTAL:08d}.pt"))
    assert (run / "summary.csv").read_text() == (uninterrupted / "summary.csv").read_text()
    assert not list(run.glob(".*.tmp"))
    return resumed.stdout


def test_killed_at_a_random_step_and_resumed_ends_bitwise_equal(tmp_path, uninterrupted):
    at = random.Random().randint(2, TOTAL)
    print(f"killed as step {at} started")
    out = _kill_and_resume(tmp_path, uninterrupted, "step", at)
    saved = max((s for s in (4, 8, 11, 12) if s < at), default=0)  # the last checkpoint before the kill
    assert (f"resumed from {tmp_path / 'run' / f'step-{saved:08d}.pt'} at step {saved}/{TOTAL}" in out) == (saved > 0)


def test_killed_while_writing_a_checkpoint_and_resumed_ends_bitwise_equal(tmp_path, uninterrupted):
    # Files written: step 4, step 8, step 11 then best.pt (the first evaluation), ...: the 3rd is
    # step 11's, so step 8 is the newest complete checkpoint and nothing from step 11 may exist.
    run = tmp_path / "run"
    out = _kill_and_resume(tmp_path, uninterrupted, "write", 3)
    assert f"resumed from {run / 'step-00000008.pt'} at step 8/{TOTAL}" in out


@pytest.mark.parametrize("signame, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_after_the_step_with_a_checkpoint_that_resumes_bitwise(tmp_path, uninterrupted, signame, status):
    run = tmp_path / "run"
    argv = RUN + ["--output", str(run), "--workers", "2"]
    stopped = _run(tmp_path, argv, signame, 6)  # during step 6: it completes, is saved, and the run ends
    assert stopped.returncode == status, stopped.stderr
    assert f"{signame}: stopping after this step, with a checkpoint" in stopped.stderr
    assert (f"stopped by {signame} after step 6/{TOTAL}: checkpoint {run / 'step-00000006.pt'}; continue with the "
            "same command and --resume auto") in stopped.stdout
    resumed = _run(tmp_path, argv + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run / 'step-00000006.pt'} at step 6/{TOTAL}" in resumed.stdout
    _assert_bitwise_equal(_state(run / f"step-{TOTAL:08d}.pt"), _state(uninterrupted / f"step-{TOTAL:08d}.pt"))


def test_an_output_folder_holding_checkpoints_needs_resume(tmp_path, capsys):
    base = ["train", "--model", "densenet_bc", "--depth", "10", "--growth-rate", "4", "--image-size", "8",
            "--batch-size", "256", "--no-progress"]
    assert main(base + ["--steps", "1", "--output", str(tmp_path / "run")]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(SystemExit, match=r"already holds checkpoints \(step-00000001.pt, ...\): continue that run "
                                         r"with --resume auto, or give another --output \(nothing there was changed\)"):
        main(base + ["--steps", "2", "--output", str(tmp_path / "run")])
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=f"--output {tmp_path / 'file'}: not a directory"):
        main(base + ["--steps", "1", "--output", str(tmp_path / "file")])


def test_a_full_disk_is_one_line_and_keeps_the_checkpoints_written(tmp_path, monkeypatch):
    argv = ["train", "--model", "densenet_bc", "--depth", "10", "--growth-rate", "4", "--image-size", "8",
            "--batch-size", "256", "--steps", "3", "--save-every", "1", "--no-progress", "--output", str(tmp_path)]
    save = checkpoint.save

    def full_after_two(state, path):
        if state["step"] >= 2:
            raise OSError(28, "No space left on device")
        save(state, path)

    monkeypatch.setattr(checkpoint, "save", full_after_two)
    with pytest.raises(SystemExit, match=f"cannot write checkpoint {tmp_path / 'step-00000002.pt'}: No space left on "
                                         "device; the checkpoints already in .* are intact"):
        main(argv)
    assert [p.name for p in sorted(tmp_path.glob("step-*.pt"))] == ["step-00000001.pt"]
    _state(tmp_path / "step-00000001.pt")


def test_checkpoints_kept_pruned_and_readable_without_code(uninterrupted):
    names = sorted(p.name for p in uninterrupted.iterdir())
    assert names == ["best.pt", "step-00000012.pt", "step-00000014.pt", "summary.csv", "summary.json"]
    state = torch.load(uninterrupted / "step-00000014.pt", weights_only=True)
    assert state["step"] == TOTAL and state["config"]["model"] == "densenet_bc" and state["num_classes"] == 10
    assert set(state["rng"]) >= {"torch", "python", "numpy"}
    rows = state["epochs"]
    assert [r["step"] for r in rows] == [11, 14]
    best = torch.load(uninterrupted / "best.pt", weights_only=True)
    assert best["step"] == state["best"]["step"] in (11, 14)
    assert state["best"]["test_accuracy"] == max(r["fastres_test_accuracy"] for r in rows)


def test_resume_reports_a_corrupt_checkpoint_and_auto_falls_back(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", "densenet_bc", "--depth", "10", "--growth-rate", "4", "--image-size", "16",
            "--batch-size", "128", "--steps", "8", "--save-every", "4", "--workers", "0", "--no-progress",
            "--output", str(run)]
    assert main(argv) == 0
    good = _state(run / "step-00000008.pt")
    shutil.copy(run / "step-00000008.pt", tmp_path / "copy.pt")
    data = (run / "step-00000008.pt").read_bytes()
    (run / "step-00000008.pt").write_bytes(data[: len(data) // 3])  # truncated
    capsys.readouterr()

    with pytest.raises(SystemExit, match=f"--resume: {run / 'step-00000008.pt'}: not a readable checkpoint"):
        main(argv + ["--resume", str(run / "step-00000008.pt")])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=f"--resume: {tmp_path / 'junk.pt'}: not a readable checkpoint"):
        main(argv + ["--resume", str(tmp_path / "junk.pt")])
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="other.pt: not a fastres train checkpoint"):
        main(argv + ["--resume", str(tmp_path / "other.pt")])
    with pytest.raises(SystemExit, match=r"step-00000004.pt is from a different run \(--lr 0.05 there, 0.1 here\)"):
        main(argv + ["--resume", str(run / "step-00000004.pt"), "--lr", "0.1"])

    assert main(argv + ["--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert (f"--resume auto: {run / 'step-00000008.pt'}: not a readable checkpoint (truncated or corrupt?)" in out
            and "falling back to step-00000004.pt" in out)
    assert f"resumed from {run / 'step-00000004.pt'} at step 4/8" in out
    _assert_bitwise_equal(_state(run / "step-00000008.pt"), good)

    assert main(argv + ["--resume", "auto"]) == 0  # complete already: evaluates, changes nothing
    assert "resumed from" in capsys.readouterr().out
    _assert_bitwise_equal(_state(run / "step-00000008.pt"), good)


def test_resume_auto_starts_fresh_in_an_empty_folder(tmp_path, capsys):
    argv = ["train", "--model", "densenet_bc", "--depth", "10", "--growth-rate", "4", "--image-size", "8",
            "--batch-size", "256", "--steps", "1", "--no-progress", "--output", str(tmp_path / "new"), "--resume", "auto"]
    assert main(argv) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    assert (tmp_path / "new" / "step-00000001.pt").is_file()


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.pt"
    checkpoint.atomic_write(target, lambda f: f.write(b"old"))

    def failing(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(target, failing)
    assert target.read_bytes() == b"old" and not list(tmp_path.glob(".*.tmp"))


def test_recipe_fills_what_is_not_given():
    import argparse

    from fastres.cli import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--recipe", "densenet-bc-cifar", "--lr", "0.05", "--epochs", "2"])
    train.resolve_defaults(args)
    assert (args.model, args.depth, args.growth_rate, args.dataset) == ("densenet_bc", 100, 12, "cifar10")
    assert (args.lr, args.epochs, args.batch_size, args.sched, args.weight_decay, args.nesterov) == (
        0.05, 2, 64, "step", 1e-4, True)  # --lr and --epochs as given, even --lr at the plain default
    args = parser.parse_args([])
    train.resolve_defaults(args)
    assert (args.model, args.lr, args.opt, args.sched, args.nesterov, args.dataset) == (
        "resnet18", 0.05, "sgd", "none", False, None)


# --- CIFAR from its python batches -------------------------------------------------------------


def _write_cifar(root, name: str, per_file: int = 8, seed: int = 0):
    """A tiny folder in CIFAR's python format: the real files' names, keys and array layout."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, train_files, test_file, meta = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], \
            "test_batch", ("batches.meta", "label_names", "labels", 10)
    else:
        folder, train_files, test_file, meta = "cifar-100-python", ["train"], "test", \
            ("meta", "fine_label_names", "fine_labels", 100)
    d = root / folder
    d.mkdir(parents=True)
    meta_file, names_key, labels_key, classes = meta
    for f in train_files + [test_file]:
        n = per_file if f != "train" else 5 * per_file
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 labels_key: rng.integers(0, classes, n).tolist()}
        (d / f).write_bytes(pickle.dumps(batch))
    (d / meta_file).write_bytes(pickle.dumps({names_key: [f"class{i}" for i in range(classes)]}))
    return d


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_train_on_a_cifar_format_folder(tmp_path, capsys, name):
    _write_cifar(tmp_path, name)
    argv = ["train", "--dataset", name, "--data", str(tmp_path), "--model", "densenet_bc", "--depth", "10",
            "--growth-rate", "4", "--batch-size", "8", "--epochs", "2", "--workers", "2", "--no-progress",
            "--output", str(tmp_path / "run")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    assert f"on {name.upper()} ({tmp_path / folder}, 32x32, augmented), 40 train / 8 held out, batch 8, 10 steps" in out
    state = _state(tmp_path / "run" / "step-00000010.pt")
    assert state["num_classes"] == (10 if name == "cifar10" else 100)
    assert [r["step"] for r in state["epochs"]] == [5, 10]
    accuracy = state["epochs"][0]["fastres_test_accuracy"]
    assert f"held-out after step 5/10 (epoch 1): fastres: accuracy {accuracy:.4f}" in out  # each evaluation, as it happens


def test_cifar_images_are_torchvisions_with_the_standard_augmentation(tmp_path):
    """Each image is torchvision's ToTensor + Normalize of the stored pixels; augmented, torchvision's
    pad(4) + crop + hflip at the offsets drawn from (seed, epoch, index)."""
    import pickle

    import numpy as np

    from fastres.cli.data import CIFAR_MEAN, CIFAR_STD, _sample_seed, load
    from fastres.testing import import_torchvision

    T = import_torchvision().transforms
    TF = T.functional
    _write_cifar(tmp_path, "cifar10")
    plain = load("cifar10", tmp_path, None, seed=3, augment=False)
    augmented = load("cifar10", tmp_path / "cifar-10-batches-py", None, seed=3, augment=True)
    normalize = T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    batches = [pickle.loads((tmp_path / "cifar-10-batches-py" / f"data_batch_{i}").read_bytes()) for i in range(1, 6)]
    raw = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)  # CIFAR's documented layout
    flips = set()
    for index in (0, 7, 39):
        pil = TF.to_pil_image(torch.from_numpy(raw[index]))
        image, label = plain.train[(0, index)]
        torch.testing.assert_close(image, normalize(pil), rtol=0, atol=1e-6)
        for epoch in (0, 1):
            rng = random.Random(_sample_seed(3, epoch, index))
            dy, dx = rng.randrange(9), rng.randrange(9)
            flip = rng.random() < 0.5
            flips.add(flip)
            expected = TF.crop(TF.pad(pil, 4), dy, dx, 32, 32)  # RandomCrop(32, padding=4)'s crop at (dy, dx)
            expected = normalize(TF.hflip(expected) if flip else expected)
            got, _ = augmented.train[(epoch, index)]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
            again, _ = augmented.train[(epoch, index)]
            assert torch.equal(got, again)  # a function of (seed, epoch, index)
    assert flips == {True, False}
    assert plain.num_classes == 10


def test_cifar_errors_name_the_missing_files(tmp_path):
    from fastres.cli.data import load

    with pytest.raises(SystemExit, match="--dataset cifar10 reads the python version of CIFAR10 from --data DIR"):
        load("cifar10", None, None, 0, True)
    d = _write_cifar(tmp_path, "cifar10")
    (d / "data_batch_3").unlink()
    (d / "test_batch").unlink()
    with pytest.raises(SystemExit, match=f"--data {tmp_path}: CIFAR10 needs data_batch_3, test_batch in {d}/"):
        load("cifar10", tmp_path, None, 0, True)
    with pytest.raises(SystemExit, match="--image-size 64: cifar10 images are 32x32"):
        load("cifar10", tmp_path, 64, 0, True)


# --- torchrun: two gloo processes against one ----------------------------------------------------

DDP_RUN = ["train", "--model", "densenet_bc", "--depth", "10", "--growth-rate", "4", "--image-size", "16",
           "--batch-size", "64", "--steps", "6", "--dtype", "float64", "--sync-bn", "--save-every", "3",
           "--workers", "0", "--no-progress"]


def _torchrun(tmp_path, argv, mode="none", at=0, nproc=2):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), mode, str(at), *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def _close(a: dict, b: dict, tol: float = 1e-12) -> None:
    """Float64 states equal up to the order of the cross-process sums."""
    ma, mb = a["trainees"]["fastres"]["model"], b["trainees"]["fastres"]["model"]
    for k in ma:
        if ma[k].is_floating_point():
            torch.testing.assert_close(ma[k], mb[k], rtol=tol, atol=tol, msg=k)
        else:
            assert torch.equal(ma[k], mb[k]), k  # num_batches_tracked


def test_torchrun_with_sync_bn_matches_one_process_and_resumes_at_another_world_size(tmp_path):
    one = _run(tmp_path, DDP_RUN + ["--output", str(tmp_path / "one"), "--json", str(tmp_path / "one.json")])
    assert one.returncode == 0, one.stderr
    two = _torchrun(tmp_path, DDP_RUN + ["--output", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")])
    assert two.returncode == 0, two.stderr + two.stdout
    assert two.stdout.count("fastres train: densenet_bc-10-k4") == 1  # rank 0 alone prints
    assert ", 2 processes" in two.stdout
    import json

    h1, h2 = (json.loads((tmp_path / f"{n}.json").read_text())["models"][0]["history"] for n in ("one", "two"))
    assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-12, abs=0)  # the whole batch's loss, averaged over ranks
    assert h2["accuracy"] == h1["accuracy"]
    final = f"step-{6:08d}.pt"
    _close(_state(tmp_path / "two" / final), _state(tmp_path / "one" / final))

    # Killed (both ranks) as step 5 starts, then resumed on one process from step 3's checkpoint.
    killed = _torchrun(tmp_path, DDP_RUN + ["--output", str(tmp_path / "killed")], "step", 5)
    assert killed.returncode != 0 and not (tmp_path / "killed" / final).exists()
    resumed = _run(tmp_path, DDP_RUN + ["--output", str(tmp_path / "killed"), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'killed' / 'step-00000003.pt'} at step 3/6" in resumed.stdout
    assert _state(tmp_path / "killed" / "step-00000003.pt")["world_size"] == 2
    _close(_state(tmp_path / "killed" / final), _state(tmp_path / "one" / final))


# --- fastres eval and fastres export ---------------------------------------------------------------

EXPORTS = {  # a run's model -> the formats its weights are exported to
    ("resnet18",): ("torchvision", "timm", "torch-export"),
    ("densenet_bc", "--depth", "10", "--growth-rate", "4"): ("torchvision", "torch-export"),
    ("densenet121",): ("torchvision", "timm"),
    ("resnetv2_18",): ("timm", "torch-export"),
}

NO_FASTRES = textwrap.dedent("""
    import sys, types
    sys.modules["fastres"] = None  # importing it raises
    # torchvision's CUDA wheel against a CPU-only torch: skip its compiled operators' registration
    # (fastres.testing.import_torchvision does this; fastres cannot be imported here).
    try:
        import torchvision
    except RuntimeError:
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[name] = types.ModuleType(name)
    import torch
""")


def _loader_code(stdout: str) -> str:
    lines = stdout.split("load it with:\n", 1)[1].splitlines()
    return "\n".join(line[4:] for line in lines if line.startswith("    "))


def test_eval_and_export_to_torchvision_timm_and_torch_export_without_fastres(tmp_path, capsys, timm):
    from fastres.cli import saved_run

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    checks = []
    for i, (model, formats) in enumerate(EXPORTS.items()):
        run = tmp_path / f"run{i}"
        assert main(["train", "--model", *model, "--steps", "1", "--batch-size", "16", "--no-progress",
                     "--output", str(run)]) == 0
        ckpt = run / "step-00000001.pt"
        trained_accuracy = _state(ckpt)["epochs"][-1]["fastres_test_accuracy"]
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(ckpt), "--json", str(tmp_path / "eval.json")]) == 0
        assert f"accuracy {trained_accuracy:.4f}" in capsys.readouterr().out
        import json

        assert json.loads((tmp_path / "eval.json").read_text())["test_accuracy"] == trained_accuracy

        with torch.no_grad():
            torch.save(saved_run.fastres_model(_state(ckpt))(x), tmp_path / f"expected{i}.pt")
        for fmt in formats:
            out = tmp_path / f"export{i}-{fmt}.{'pt2' if fmt == 'torch-export' else 'pt'}"
            assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, str(out)]) == 0
            stdout = capsys.readouterr().out
            if fmt == "torch-export":
                code = f"model = torch.export.load({str(out)!r}).module()"
            else:
                code = _loader_code(stdout) + "\nmodel.eval()"
                assert "fastres" not in code.replace(str(tmp_path), "")
            checks.append(f"# {model[0]} -> {fmt}\n{code}\n"
                          f"with torch.no_grad():\n"
                          f"    got = model(torch.load({str(tmp_path / 'x.pt')!r}))\n"
                          f"torch.testing.assert_close(got, torch.load({str(tmp_path / f'expected{i}.pt')!r}), "
                          f"rtol=1e-4, atol=1e-4)\nprint('ok', {model[0]!r}, {fmt!r})\n")
    script = NO_FASTRES + "\n".join(checks)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok ") == sum(len(f) for f in EXPORTS.values())


@pytest.mark.parametrize("model, fmt, message", [
    ("densenet_bc", "timm", "--format timm: timm has no densenet_bc-10-k4 with these keys; use --format torchvision"),
    ("resnetv2_18", "torchvision", "--format torchvision: resnetv2_18 is timm's architecture; use --format timm"),
])
def test_export_refuses_a_format_without_the_architecture(model, fmt, message):
    from fastres.cli import saved_run

    with pytest.raises(SystemExit, match=message):
        saved_run.builder_code({"model": model, "depth": 10, "growth_rate": 4}, 10, fmt)


def test_eval_names_an_unreadable_checkpoint(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(SystemExit, match=f"--checkpoint: {tmp_path / 'bad.pt'}: not a readable checkpoint"):
        main(["eval", "--checkpoint", str(tmp_path / "bad.pt")])
    with pytest.raises(SystemExit, match=f"--checkpoint: {tmp_path / 'none.pt'}: no such checkpoint"):
        main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--format", "timm", str(tmp_path / "o.pt")])


def test_compile_trains_both_models_alike_and_checkpoints_the_builders_keys(tmp_path, capsys):
    argv = ["train", "--model", "densenet_bc", "--depth", "10", "--growth-rate", "4", "--image-size", "16",
            "--batch-size", "32", "--steps", "2", "--compile", "--compare", "naive", "--check-agreement",
            "--no-progress", "--output", str(tmp_path / "run")]
    assert main(argv) == 0
    assert "OK: fastres and naive agree" in capsys.readouterr().out
    keys = _state(tmp_path / "run" / "step-00000002.pt")["trainees"]["fastres"]["model"].keys()
    import fastres

    assert list(keys) == list(fastres.models.densenet_bc(10, 4).state_dict().keys())  # no torch.compile prefix


def test_a_run_on_a_constant_learning_rate_is_extended_by_more_epochs(tmp_path, capsys):
    base = ["train", "--model", "densenet_bc", "--depth", "10", "--growth-rate", "4", "--image-size", "8",
            "--batch-size", "256", "--no-progress"]
    assert main(base + ["--epochs", "2", "--output", str(tmp_path / "whole")]) == 0
    assert main(base + ["--epochs", "1", "--output", str(tmp_path / "part")]) == 0
    capsys.readouterr()
    assert main(base + ["--epochs", "2", "--output", str(tmp_path / "part"), "--resume", "auto"]) == 0
    assert f"resumed from {tmp_path / 'part' / 'step-00000005.pt'} at step 5/10, the run extended from 5 steps" \
        in capsys.readouterr().out
    whole, part = _state(tmp_path / "whole" / "step-00000010.pt"), _state(tmp_path / "part" / "step-00000010.pt")
    for k, v in whole["trainees"]["fastres"]["model"].items():
        assert torch.equal(v, part["trainees"]["fastres"]["model"][k]), k
    with pytest.raises(SystemExit, match=r"10 steps there, 15 here \(--sched cosine spans the run's steps\)"):
        main(base + ["--epochs", "3", "--sched", "cosine", "--output", str(tmp_path / "part"), "--resume", "auto"])


def test_fp16_autocast_keeps_its_gradient_scaler_across_a_resume(tmp_path, capsys):
    argv = ["train", "--model", "densenet_bc", "--depth", "10", "--growth-rate", "4", "--image-size", "16",
            "--batch-size", "128", "--steps", "4", "--save-every", "2", "--amp", "fp16", "--no-progress"]
    assert main(argv + ["--output", str(tmp_path / "whole")]) == 0
    whole = _state(tmp_path / "whole" / "step-00000004.pt")
    scaler = whole["trainees"]["fastres"]["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] + (scaler["scale"] != 65536.0) >= 1  # it ran 4 steps
    (tmp_path / "part").mkdir()
    shutil.copy(tmp_path / "whole" / "step-00000002.pt", tmp_path / "part")
    assert main(argv + ["--output", str(tmp_path / "part"), "--resume", "auto"]) == 0
    assert "fp16 autocast" in capsys.readouterr().out
    _assert_bitwise_equal(_state(tmp_path / "part" / "step-00000004.pt"), whole)
    assert _state(tmp_path / "part" / "step-00000004.pt")["trainees"]["fastres"]["scaler"] == scaler


def test_export_of_a_float64_run_builds_a_float64_model(tmp_path, capsys):
    argv = ["train", "--model", "densenet_bc", "--depth", "10", "--growth-rate", "4", "--image-size", "8",
            "--batch-size", "256", "--steps", "1", "--dtype", "float64", "--no-progress", "--output", str(tmp_path)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "step-00000001.pt"), "--format", "torchvision",
                 str(tmp_path / "w.pt")]) == 0
    code = _loader_code(capsys.readouterr().out)
    assert "model = model.double()" in code
    scope = {}
    from fastres.testing import import_torchvision

    import_torchvision()
    exec(code, scope)  # the printed code, as printed
    assert next(scope["model"].parameters()).dtype == torch.float64
