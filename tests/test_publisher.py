"""The publisher a new user runs by hand: its help, and the user's own image files."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from simulator.datasets import digits_split
from simulator.publisher import parser
from tests.support import Broker, Module, digit_png


def test_every_option_has_help_and_the_prog_name_is_runnable() -> None:
    cli = parser()
    assert cli.prog == "python -m simulator.publisher"
    for action in cli._actions:
        assert action.help, action.option_strings


def test_the_users_own_image_files_are_sent_and_each_answer_reported(
    tmp_path: Path, broker: Broker, start_module: Callable[..., Module]
) -> None:
    start_module()
    _, x_test, _, y_test = digits_split()
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(3):
        (folder / f"digit-{i}.png").write_bytes(digit_png(x_test[i]))
    (folder / "notes.txt").write_text("not an image: skipped")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    proc = subprocess.run(
        [sys.executable, "-m", "simulator.publisher", f"--port={broker.port}",
         "--topic=em/in/files", "--results=em/results", "--errors=em/errors",
         f"--image={folder}", f"--image={broken}", "--count=4", "--rate=0", "--timeout=20"],
        capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "model input: your image files; sent 4, answered 4" in out
    for i in range(3):
        assert f"digit-{i}.png: {y_test[i]} (" in out, out
    assert f"{broken}: error " in out and "notes.txt" not in out
    assert "accuracy" not in out  # no true labels for the user's files


def test_a_missing_file_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "simulator.publisher", "--image=/no/such.png"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "usage: python -m simulator.publisher" in proc.stderr
    assert "/no/such.png: no such file or folder" in proc.stderr
