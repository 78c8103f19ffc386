"""The docs run as written: every ```bash and ```python block of docs/tutorial.md and README.md,
in the order of the page, in a fresh folder that sees the repository's models.

Shell blocks run in bash (-e, -o pipefail) with the environment's `onnx-snn` on PATH; Python
blocks share one namespace, as in one interactive session. A block is skipped only under a
comment that says why, on the line before it: ``<!-- docs-test: skip: REASON -->``. Blocks
without a language (transcripts of output) are not run.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!-- docs-test: skip: (.+\S) -->$")
DOCS = ["docs/tutorial.md", "README.md"]


def blocks(path: Path) -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, reason to skip or None) for every fenced block."""
    lines, found = path.read_text().splitlines(), []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, language = i, match.group(1)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = lines[start - 1] if start else ""
        skip = SKIP.match(before)
        if before.startswith("<!-- docs-test") and not skip:
            raise AssertionError(f"{path.name}:{start}: malformed docs-test comment {before!r}")
        found.append((start + 1, language, "\n".join(lines[start + 1:end]), skip.group(1) if skip else None))
        i = end + 1
    return found


DRIVER = textwrap.dedent('''
    import subprocess, sys, traceback
    namespace = {"__name__": "__main__"}
    for where, language, code in BLOCKS:
        print(f"### {where} ({language})", flush=True)
        if language == "python":
            try:
                exec(compile(code, where, "exec"), namespace)
            except BaseException:
                traceback.print_exc()
                sys.exit(f"the Python block at {where} failed")
        else:
            result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code])
            if result.returncode:
                sys.exit(f"the shell block at {where} exited {result.returncode}")
''')


@pytest.mark.parametrize("doc", DOCS)
def test_every_block_runs_as_written(doc, tmp_path):
    runnable = [(f"{doc}:{line}", language, code) for line, language, code, skip in blocks(ROOT / doc)
                if language in ("bash", "sh", "python") and skip is None]
    assert runnable, f"{doc} has no runnable block"
    for name in ("models", "examples", "scripts", "bench", "docs"):
        (tmp_path / name).symlink_to(ROOT / name)
    driver = tmp_path / ".docs_driver.py"
    driver.write_text(f"BLOCKS = {runnable!r}\n" + DRIVER)
    # the bundled Fashion-MNIST slice on every machine: the same work as on CI, minutes not tens
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MPLBACKEND": "Agg", "ONNX_SNN_FASHION_MNIST": "bundled"}
    result = subprocess.run([sys.executable, str(driver)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, (result.stdout[-4000:] + result.stderr[-4000:])


@pytest.mark.parametrize("doc", DOCS)
def test_every_skip_says_why_and_every_shell_or_python_block_is_seen(doc):
    path = ROOT / doc
    seen = blocks(path)
    fences = sum(1 for line in path.read_text().splitlines() if line.startswith("```"))
    assert fences == 2 * len(seen)
    for line, _, _, skip in seen:
        assert skip is None or len(skip) > 10, f"{doc}:{line}: say why the block is skipped"
