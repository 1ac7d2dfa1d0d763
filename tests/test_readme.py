"""The README and the code agree: every option it names exists where it says (issue 12's CLI/README parity)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import click
import pytest
import typer.main

from service.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _options(command: click.Command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}


@cache
def _commands() -> dict[str, set[str]]:
    """Options of every `autoprune` command and sub-command, by its dotted path (`search`, `db.upgrade`)."""
    out: dict[str, set[str]] = {}

    def walk(cmd: click.Command, path: str) -> None:
        out[path] = _options(cmd)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path}.{name}".lstrip("."))

    walk(typer.main.get_command(app), "")
    return out


@cache
def _benchmark_flags(script: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _unknown_flags(text: str) -> list[str]:
    """Flags named in ``text`` that no `autoprune` command has (nor the benchmark script or tool on that line)."""
    every = set().union(*_commands().values())
    missing = []
    for line in text.splitlines():
        scripts = re.findall(r"benchmarks/(\w+\.py)", line)
        for flag in FLAG.findall(line):
            if flag in every or (flag == "--scale" and "docker compose" in line):
                continue
            if any(re.search(rf"(?<![\w-]){flag}(?![\w-])", _benchmark_flags(s)) for s in scripts):
                continue
            missing.append(f"{flag} in: {line.strip()[:100]}")
    return missing


def _misplaced_flags(text: str) -> tuple[int, list[str]]:
    """`autoprune <command> ...` lines of ``text``'s shell blocks, and the flags on them their command lacks."""
    commands = _commands()
    lines, wrong = 0, []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            m = re.search(r"autoprune ((?:db )?[a-z]+)\b(.*)", line.split("#")[0])
            if not m:
                continue
            lines += 1
            name = m.group(1).replace(" ", ".")
            if name not in commands:
                wrong.append(f"autoprune {m.group(1)} (no such command)")
                continue
            wrong += [f"{f} (autoprune {m.group(1)})" for f in FLAG.findall(m.group(2)) if f not in commands[name]]
    return lines, wrong


def test_every_option_the_readme_names_exists() -> None:
    missing = _unknown_flags(README)
    assert not missing, "README options that no command has:\n" + "\n".join(missing)


def test_command_lines_in_the_readme_use_their_own_commands_options() -> None:
    lines, wrong = _misplaced_flags(README)
    assert lines >= 5  # the README's shell blocks run autoprune serve/search/submit/download/...
    assert not wrong, "README command lines with options their command lacks: " + ", ".join(wrong)


def test_the_checks_catch_a_wrong_readme() -> None:
    wrong = (
        "```bash\nautoprune search --model resnet20 --pt2 x.pt2\nautoprune shout --model m\n```\nuse `--colour red`\n"
    )
    assert _unknown_flags(wrong) == ["--colour in: use `--colour red`"]
    assert _misplaced_flags(wrong) == (2, ["--pt2 (autoprune search)", "autoprune shout (no such command)"])


# -- the README's Python blocks run as written ------------------------------------------------------------------
PYTHON_BLOCK = re.compile(r"(?:<!--\s*requires:\s*([\w.,\s-]+?)\s*-->\n)?```python\n(.*?)```", re.S)


def _python_blocks(text: str) -> list[tuple[tuple[str, ...], str]]:
    """((modules the block needs, from a ``<!-- requires: a, b -->`` line just above it), code) per block."""
    return [
        (tuple(m.strip() for m in (req or "").split(",") if m.strip()), code)
        for req, code in PYTHON_BLOCK.findall(text)
    ]


BLOCKS = _python_blocks(README)


def test_the_block_extraction_reads_requirements() -> None:
    text = "```python\na = 1\n```\n<!-- requires: transformers -->\n```python\nb = 2\n```\n```bash\nls\n```\n"
    assert _python_blocks(text) == [((), "a = 1\n"), (("transformers",), "b = 2\n")]
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("needs,code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_every_python_block_of_the_readme_runs(needs: tuple[str, ...], code: str, tmp_path: Path) -> None:
    """Each block on its own, in a fresh interpreter in an empty folder, offline, one torch thread."""
    for module in needs:
        pytest.importorskip(module)
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"README block failed:\n{code}\n--- stderr:\n{done.stderr[-3000:]}"
