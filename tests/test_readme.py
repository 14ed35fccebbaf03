"""The Python snippets of README.md and docs/*.md run as written.

Every fenced block tagged ``python`` (or ``py``, ``python3``) is executed, in the
order of its file, in a fresh namespace each (as a reader copying that one
block would run it), all blocks of one file in one subprocess, so that the
tests' own set-up (conftest's ``TRITON_INTERPRET=1`` and interpreter patches,
the torchvision stub) is not there for them.

That subprocess is a plain user's CPU environment: no ``TRITON_INTERPRET``,
empty torch/Hugging Face/XDG caches, Hugging Face offline and every socket
connection refused, so a snippet that downloads weights or a data set fails
here instead of passing on a warm cache.

A block that is not meant to run says so on its first line, in the markdown,
with a reason::

    ```python
    # not run: needs a GPU
    model.cuda()
    ```

Such blocks are listed as skipped tests with that reason.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_TAGS = {"python", "py", "python3"}
NOT_RUN = re.compile(r"#\s*not run:(.*)")

_OPENING_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # 1-based line of the block's first code line in its file
    source: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def not_run_reason(self):
        """The reason after a first-line ``# not run:`` marker ("" when empty), None when unmarked."""
        first = self.source.lstrip("\n").split("\n", 1)[0].strip()
        match = NOT_RUN.fullmatch(first)
        return match.group(1).strip() if match else None


def python_snippets(path: Path, text: str = None) -> list[Snippet]:
    """The Python fenced code blocks of a markdown file, in order (CommonMark fences: ``` or ~~~)."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).split("\n")
    snippets = []
    i = 0
    while i < len(lines):
        opening = _OPENING_FENCE.match(lines[i])
        if not opening or (opening["fence"][0] == "`" and "`" in opening["info"]):
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        closing = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body_start = i + 1
        i = body_start
        while i < len(lines) and not closing.match(lines[i]):
            i += 1
        body = [line[min(indent, len(line) - len(line.lstrip(" "))):] for line in lines[body_start:i]]
        tag = opening["info"].split()[0].lower() if opening["info"].strip() else ""
        if tag in PYTHON_TAGS:
            snippets.append(Snippet(path, body_start + 1, "\n".join(body) + "\n"))
        i += 1
    return snippets


SNIPPETS = [snippet for path in DOC_FILES for snippet in python_snippets(path)]
FILES_TO_RUN = [path for path in DOC_FILES if any(s.path == path and s.not_run_reason is None for s in SNIPPETS)]
MARKED_NOT_RUN = [s for s in SNIPPETS if s.not_run_reason is not None]

# Runs in the subprocess: argv[1] is a JSON list of [filename, first line, source].
_RUNNER = textwrap.dedent(
    """
    import json, socket, sys, traceback

    def _refuse(*args, **kwargs):
        raise OSError("a README snippet may not use the network")

    socket.socket.connect = socket.socket.connect_ex = _refuse
    socket.getaddrinfo = socket.create_connection = _refuse

    for filename, line, source in json.loads(sys.argv[1]):
        print(f"--- running {filename}:{line}", flush=True)
        code = compile("\\n" * (line - 1) + source, filename, "exec")  # tracebacks name the markdown's lines
        try:
            exec(code, {"__name__": "__main__"})
        except BaseException:
            traceback.print_exc()
            print(f"the snippet at {filename}:{line} raised", file=sys.stderr)
            sys.exit(1)
    """
)


def _user_environment(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    for name in ("TORCH_HOME", "HF_HOME", "XDG_CACHE_HOME"):
        env[name] = str(tmp_path / name.lower())
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run_snippets(snippets: list[Snippet], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    blocks = [[str(s.path), s.line, s.source] for s in snippets]
    return subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(blocks)],
        cwd=tmp_path,
        env=_user_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_readme_has_python_snippets():
    """The parser finds the quickstart (an empty list would make the tests below pass vacuously)."""
    readme = [s for s in SNIPPETS if s.path.name == "README.md" and s.not_run_reason is None]
    assert readme, "no runnable ```python block found in README.md"
    assert any("fastres.models.resnet50()" in s.source for s in readme)


def test_snippet_parser():
    text = "\n".join(
        [
            "```bash",
            "pip install fastres",
            "```",
            "- a list item:",
            "  ```python",
            "  x = 1",
            "  if x:",
            "      y = 2",
            "  ```",
            "~~~~py",
            "# not run: needs a GPU",
            "~~~",
            "```",
            "~~~~",
            "```python title",
            "z = 3",
            "```",
        ]
    )
    path = ROOT / "README.md"
    snippets = python_snippets(path, text)
    assert [(s.line, s.source) for s in snippets] == [
        (6, "x = 1\nif x:\n    y = 2\n"),
        (11, "# not run: needs a GPU\n~~~\n```\n"),
        (16, "z = 3\n"),
    ]
    assert [s.not_run_reason for s in snippets] == [None, "needs a GPU", None]
    assert Snippet(path, 1, "# not run:\nx\n").not_run_reason == ""


def test_not_run_markers_give_a_reason():
    missing = [s.where for s in MARKED_NOT_RUN if not s.not_run_reason]
    assert not missing, f"'# not run:' without a reason at {', '.join(missing)}"


@pytest.mark.parametrize("path", FILES_TO_RUN, ids=lambda p: str(p.relative_to(ROOT)))
def test_snippets_run(path, tmp_path):
    snippets = [s for s in SNIPPETS if s.path == path and s.not_run_reason is None]
    out = run_snippets(snippets, tmp_path)
    if out.returncode != 0:
        pytest.fail(f"{out.stdout[-4000:]}\n{out.stderr[-8000:]}", pytrace=False)
    assert out.stdout.count("--- running ") == len(snippets)


def test_a_raising_snippet_fails(tmp_path):
    """The runner reports a snippet that raises, with its markdown line, and stops there."""
    path = ROOT / "README.md"
    snippets = [Snippet(path, 10, "x = 1\n"), Snippet(path, 20, "\nundefined_name\n"), Snippet(path, 30, "x = 2\n")]
    out = run_snippets(snippets, tmp_path, timeout=60)
    assert out.returncode != 0
    assert "NameError" in out.stderr and "README.md:20 raised" in out.stderr
    assert 'README.md", line 21' in out.stderr
    assert "README.md:30" not in out.stdout


def test_snippets_run_in_fresh_namespaces(tmp_path):
    path = ROOT / "README.md"
    out = run_snippets([Snippet(path, 1, "x = 1\n"), Snippet(path, 5, "x\n")], tmp_path, timeout=60)
    assert out.returncode != 0 and "NameError" in out.stderr


def test_snippets_cannot_download(tmp_path):
    path = ROOT / "README.md"
    source = "import urllib.request\nurllib.request.urlopen('https://download.pytorch.org/models/resnet50.pth', timeout=5)\n"
    out = run_snippets([Snippet(path, 1, source)], tmp_path, timeout=60)
    assert out.returncode != 0 and "may not use the network" in out.stderr


if MARKED_NOT_RUN:

    @pytest.mark.parametrize("snippet", MARKED_NOT_RUN, ids=lambda s: s.where)
    def test_snippet_marked_not_run(snippet):
        pytest.skip(f"{snippet.where}: not run: {snippet.not_run_reason}")
