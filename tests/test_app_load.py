"""The web demo under load (scripts/load_test_app.py): 8 concurrent gradio_client clients on 127.0.0.1 for a fixed
time, a mix of good images and broken uploads. Every request is answered (good images with a single client's
segments and result pictures, byte for byte; broken ones with the one-line refusal), no traceback, and the app's
memory stays flat."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_eight_clients_every_request_answered_and_memory_flat(load_script, tmp_path, capsys):
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_client")
    output = tmp_path / "load.json"
    code = load_script("load_test_app").main(["--clients", "8", "--seconds", "30", "--output", str(output)])
    figures = json.loads(output.read_text())
    assert code == 0, (figures, capsys.readouterr().err)
    assert figures["failures"] == 0 and figures["tracebacks_in_app_log"] == 0
    assert figures["requests"] >= 8 and 0 < figures["bad_requests"] < figures["requests"]  # each client answered
    assert figures["memory_growth_mb"] <= 100
