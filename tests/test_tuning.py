"""Per-shape config choice (``fastres.kernels.tuning``): fixed modes, the agreement check, the disk cache.

No GPU here: a stand-in device name and a stand-in timer take the place of
``torch.cuda`` and ``do_bench``; everything else is the code a GPU runs.
"""

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from fastres.kernels import tuning

CANDIDATES = ((64, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 8, 3))
GPU = torch.device("cuda", 0)


class Fake:
    """A kernel whose output is ``config``-independent, except for ``wrong`` configs (a miscompile)."""

    def __init__(self, wrong=(), times=None):
        self.out = torch.zeros(64)
        self.wrong = wrong
        self.times = times or {c: 1.0 + i for i, c in enumerate(CANDIDATES)}
        self.runs = []
        self.last = None

    def run(self, config):
        self.runs.append(config)
        self.last = config
        self.out.copy_(torch.arange(64.0) * (3.0 if config in self.wrong else 1.0))

    def outputs(self):
        return (self.out,)

    def bench(self, fn):
        fn()
        return self.times[self.last]


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """Tuning as on a GPU named 'Stand-in H100', its cache under tmp_path."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTRES_AUTOTUNE", raising=False)
    monkeypatch.setattr(tuning, "_can_time", lambda device: True)
    monkeypatch.setattr(tuning, "_device_name", lambda device: "Stand-in H100")
    monkeypatch.setattr(tuning, "_capturing", lambda device: False)
    tuning.forget()
    yield tmp_path
    tuning.forget()


def _text(path):
    with open(path) as f:
        return f.read()


def _choose(fake, bucket=("forward", 1)):
    return tuning.choose("forward", bucket, CANDIDATES, fake.run, GPU, fake.outputs)


def test_fastest_agreeing_candidate_wins_and_is_remembered_on_disk(gpu, monkeypatch):
    fake = Fake(times={CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0})
    monkeypatch.setattr(tuning, "BENCH", fake.bench)
    assert _choose(fake) == CANDIDATES[1]
    files = os.listdir(gpu)
    assert len(files) == 1 and files[0].startswith("tuning-Stand-in_H100-") and files[0].endswith(".json")
    stored = json.loads((gpu / files[0]).read_text())
    assert list(stored.values()) == [list(CANDIDATES[1])]
    # A new process (memory forgotten) reads the file and runs nothing.
    tuning.forget()
    again = Fake()
    monkeypatch.setattr(tuning, "BENCH", lambda fn: pytest.fail("timed again"))
    sessions = len(tuning.SESSIONS)
    assert _choose(again) == CANDIDATES[1]
    assert again.runs == [] and len(tuning.SESSIONS) == sessions


def test_a_disagreeing_candidate_is_dropped_with_a_warning(gpu, monkeypatch):
    # The wrong config would be the fastest: it must never be chosen.
    fake = Fake(wrong=(CANDIDATES[1],), times={CANDIDATES[0]: 3.0, CANDIDATES[1]: 0.5, CANDIDATES[2]: 2.0})
    timed = []
    monkeypatch.setattr(tuning, "BENCH", lambda fn: (fn(), timed.append(fake.last), fake.times[fake.last])[-1])
    with pytest.warns(UserWarning, match=r"\(128, 128, 64, 8, 3\) disagrees"):
        assert _choose(fake) == CANDIDATES[2]
    assert CANDIDATES[1] not in timed


class Unbuildable(Fake):
    """Triton cannot build the ``broken`` configs on this machine (a compile or ptxas error)."""

    def __init__(self, broken, **kw):
        super().__init__(**kw)
        self.broken = broken

    def run(self, config):
        if config in self.broken:
            from triton.compiler.errors import CompilationError

            raise CompilationError("stand-in.py", None, "ptxas fatal: stand-in\nmore lines")
        super().run(config)


@pytest.mark.parametrize("broken", [(CANDIDATES[0],), (CANDIDATES[1],)], ids=["first", "faster"])
def test_a_candidate_that_cannot_be_built_is_dropped_with_a_warning(gpu, monkeypatch, broken):
    """The first candidate included: the next one that builds is then the reference the others must agree with."""
    pytest.importorskip("triton")
    fake = Unbuildable(broken, times={CANDIDATES[0]: 0.5, CANDIDATES[1]: 0.5, CANDIDATES[2]: 2.0})
    monkeypatch.setattr(tuning, "BENCH", fake.bench)
    with pytest.warns(UserWarning, match=re.escape(f"{tuple(broken[0])} cannot be built here (CompilationError")):
        chosen = _choose(fake)
    assert chosen not in broken and chosen == [c for c in CANDIDATES[:2] if c not in broken][0]
    assert json.loads(_text(gpu / os.listdir(gpu)[0])) == {repr(("forward", ("forward", 1))): list(chosen)}


def test_where_no_candidate_builds_the_first_error_is_raised(gpu, monkeypatch):
    pytest.importorskip("triton")
    from triton.compiler.errors import CompilationError

    fake = Unbuildable(CANDIDATES)
    monkeypatch.setattr(tuning, "BENCH", fake.bench)
    with pytest.warns(UserWarning, match="cannot be built"), pytest.raises(CompilationError):
        _choose(fake)
    assert os.listdir(gpu) == []  # nothing remembered


def test_agreement_allows_rounding_and_same_nans():
    a = torch.tensor([1.0, float("nan"), float("inf"), 2.0], dtype=torch.bfloat16)
    b = a.clone()
    b[0] = b[0] + 2 ** -7  # one bf16 ulp
    assert tuning.agree([a], [b])
    assert not tuning.agree([a], [torch.tensor([1.0, 0.0, float("inf"), 2.0], dtype=torch.bfloat16)])
    assert not tuning.agree([a], [torch.tensor([1.0, float("nan"), float("-inf"), 2.0], dtype=torch.bfloat16)])
    assert not tuning.agree([torch.ones(100)], [torch.ones(100) * 1.1])


@pytest.mark.parametrize("mode", ["env", "deterministic", "capturing", "no gpu"])
def test_fixed_modes_take_the_first_candidate_untimed(gpu, monkeypatch, mode):
    fake = Fake(times={CANDIDATES[0]: 9.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 1.0})
    monkeypatch.setattr(tuning, "BENCH", lambda fn: pytest.fail("timed"))
    if mode == "env":
        monkeypatch.setenv("FASTRES_AUTOTUNE", "0")
    elif mode == "deterministic":
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    elif mode == "capturing":
        monkeypatch.setattr(tuning, "_capturing", lambda device: True)
    else:
        monkeypatch.setattr(tuning, "_can_time", lambda device: False)
    assert _choose(fake) == CANDIDATES[0]
    assert fake.runs == [] and os.listdir(gpu) == []


def test_deterministic_mode_ignores_a_tuned_choice(gpu, monkeypatch):
    fake = Fake(times={CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0})
    monkeypatch.setattr(tuning, "BENCH", fake.bench)
    assert _choose(fake) == CANDIDATES[1]
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert _choose(fake) == CANDIDATES[0]


def test_capture_does_not_remember_its_fixed_choice(gpu, monkeypatch):
    fake = Fake(times={CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0})
    monkeypatch.setattr(tuning, "BENCH", fake.bench)
    monkeypatch.setattr(tuning, "_capturing", lambda device: True)
    assert _choose(fake) == CANDIDATES[0]
    monkeypatch.setattr(tuning, "_capturing", lambda device: False)
    assert _choose(fake) == CANDIDATES[1]  # tuned once the capture is over


def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_replaced(gpu, monkeypatch):
    path = tuning.cache_path(GPU)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write('{"forward": [1, 2')  # truncated
    fake = Fake(times={CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0})
    monkeypatch.setattr(tuning, "BENCH", fake.bench)
    with pytest.warns(UserWarning, match="unreadable tuning cache"):
        assert _choose(fake) == CANDIDATES[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(json.loads(_text(path)).values()) == [list(CANDIDATES[1])]
    assert [f for f in os.listdir(gpu) if f.startswith(".tuning-")] == []  # no temporary left behind


def test_writes_merge_with_what_another_process_wrote(gpu, monkeypatch):
    fake = Fake(times={CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0})
    monkeypatch.setattr(tuning, "BENCH", fake.bench)
    _choose(fake, ("forward", 1))
    path = tuning.cache_path(GPU)
    other = json.loads(_text(path))
    other["('dgrad', ('other process',))"] = [1, 2, 3, 4, 5]
    with open(path, "w") as f:
        json.dump(other, f)
    _choose(fake, ("forward", 2))
    assert len(json.loads(_text(path))) == 3


def test_a_stored_config_no_longer_offered_is_tuned_again(gpu, monkeypatch):
    fake = Fake(times={CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0})
    monkeypatch.setattr(tuning, "BENCH", fake.bench)
    _choose(fake)
    tuning.forget()
    fewer = (CANDIDATES[0], CANDIDATES[2])
    assert tuning.choose("forward", ("forward", 1), fewer, fake.run, GPU, fake.outputs) == CANDIDATES[2]


_RUN = """
import hashlib, os, torch
from fastres.functional import bn_relu_conv2d
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 24, 9, 9, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
cw = torch.randn(16, 24, 3, 3, generator=g).requires_grad_()
w, b = torch.randn(24, generator=g).requires_grad_(), torch.randn(24, generator=g).requires_grad_()
rm, rv = torch.zeros(24), torch.ones(24)
y = bn_relu_conv2d(x, rm, rv, w, b, cw, None, 2, 1, training=True)
y.backward(torch.randn(y.shape, generator=g))
h = hashlib.sha256()
for t in (y, x.grad, w.grad, b.grad, cw.grad, rm, rv):
    h.update(t.detach().contiguous().numpy().tobytes())
print(h.hexdigest())
"""


@pytest.mark.parametrize("how", ["FASTRES_AUTOTUNE=0", "use_deterministic_algorithms"])
def test_fixed_configs_give_bitwise_equal_results_across_processes(tmp_path, how):
    env = dict(os.environ, FASTRES_CACHE_DIR=str(tmp_path))
    code = _RUN
    if how == "FASTRES_AUTOTUNE=0":
        env["FASTRES_AUTOTUNE"] = "0"
    else:
        code = "import torch; torch.use_deterministic_algorithms(True)\n" + code
    digests = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                              timeout=600).stdout.strip() for _ in range(2)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]
