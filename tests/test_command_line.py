"""The command-line conventions of every script: --debug, help texts with their usage examples and defaults, and
progress bars that do not flood a log file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([p.relative_to(REPO).as_posix() for p in (REPO / "scripts").rglob("*.py")]
                 + ["training/dewa.py", "training/ssl.py", "training/supervised.py"])
NOT_YET_MOVED = ("scripts/reproduce_miniature.py", "scripts/benchmarks/benchmark_forward.py")


def _help(script: str) -> str:
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_entry_points_are_found():
    assert {"scripts/evaluate_panoptic.py", "training/dewa.py", "training/ssl.py", "training/supervised.py",
            "scripts/benchmarks/benchmark_pq.py"} <= set(SCRIPTS)


def _check_help(text: str) -> None:
    assert "--debug" in text
    examples = [line for line in text.splitlines() if line.lstrip().startswith(("python ", "accelerate launch"))]
    assert examples, text[:500]
    for line in examples:  # a continued example line stays a line of its own, not glued on with its indent
        assert "    --" not in line.strip(), line
    assert "(default: " in text


@pytest.mark.parametrize("script", ["scripts/evaluate_panoptic.py", "scripts/generate_miniature_world.py"])
def test_help_keeps_usage_lines_and_names_defaults(script):
    _check_help(_help(script))


def test_training_help_keeps_usage_lines_and_names_defaults():
    from training.arguments import build_parser

    text = build_parser("dewa", (REPO / "training" / "dewa.py").read_text().split('"""')[1]).format_help()
    _check_help(text)
    assert "--learning_rate LEARNING_RATE\n" in text and "(default: 0.0001)" in text


def test_every_script_has_debug():
    """Source check (starting ~25 processes would take minutes): every command parses with training.cli's parser,
    which adds --debug, and runs through cli.run."""
    missing = []
    for script in SCRIPTS:
        if script in NOT_YET_MOVED:
            continue
        text = (REPO / script).read_text()
        if "__main__" in text and ("cli.ArgumentParser(" not in text and "parse_args(" not in text
                                   or "cli.run(" not in text):
            missing.append(script)
    assert missing == []


def _bar_redraws(tmp_path: Path, prelude: str) -> int:
    code = (f"{prelude}\nimport time\nfrom tqdm.auto import tqdm\n"
            "for _ in tqdm(range(150)):\n    time.sleep(0.01)\n")
    log = tmp_path / "log.txt"
    with open(log, "w") as stderr:
        subprocess.run([sys.executable, "-c", code], stderr=stderr, timeout=60, cwd=REPO, check=True,
                       env={k: v for k, v in __import__("os").environ.items() if not k.startswith("TQDM_")})
    return log.read_bytes().count(b"\r")


def test_progress_bars_in_a_log_file_are_not_redrawn_every_step(tmp_path):
    plain = _bar_redraws(tmp_path, "")  # tqdm's own default: a redraw every 0.1 s
    ours = _bar_redraws(tmp_path, "import training.run_as_script")
    assert plain >= 8 and ours <= 2, (plain, ours)


def test_a_script_of_another_checkout_does_not_shadow_the_standard_library_and_says_whose_code_runs(tmp_path):
    """``python CLONE/training/ssl.py`` next to an installed checkout: ``import ssl`` is the standard library's (not the
    script itself), and a warning names the checkout whose code runs."""
    import os

    clone = tmp_path / "clone"
    (clone / "modeling_dearli").mkdir(parents=True)
    (clone / "training").mkdir()
    script = clone / "training" / "ssl.py"
    script.write_text("import training.run_as_script  # noqa: F401\nimport ssl\nprint(ssl.__file__)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).parent != clone / "training", done.stdout
    assert f"runs the project code of {REPO}" in done.stderr and str(clone) in done.stderr, done.stderr
    # the checkout's own scripts run quietly
    own = subprocess.run([sys.executable, "training/ssl.py", "--help"], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env=env)
    assert own.returncode == 0 and "warning" not in own.stderr, own.stderr
