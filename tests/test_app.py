"""The web demo in a real browser: a Space folder exported with a tiny model, served by its own app.py, driven by
headless Chromium (Debian's `chromium` package through Playwright; nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytestmark = pytest.mark.slow


def _scene(path) -> None:
    image = Image.new("RGB", (320, 240), (120, 180, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 150, 320, 240), fill=(60, 150, 60))
    draw.ellipse((140, 60, 180, 100), fill=(220, 170, 140))
    draw.rectangle((145, 100, 175, 190), fill=(200, 40, 40))
    image.save(path)


def test_space_in_chromium(load_script, tiny_model_with_text_tower_dir, tmp_path):
    pytest.importorskip("gradio")
    pytest.importorskip("playwright")
    shots = load_script("app_screenshot")
    if shots.find_chromium() is None:
        pytest.skip("no system chromium (apt-get install -y chromium chromium-driver; .ci/run does)")
    from training.publishing.space import export_space

    examples = tmp_path / "examples"
    examples.mkdir()
    _scene(examples / "scene.png")
    space = export_space(tmp_path / "space", shots.REPO_ROOT / "app.py", tiny_model_with_text_tower_dir, examples)
    screenshot = tmp_path / "app.png"
    # The Space's own app.py, no arguments: its model/ and examples/ folders.
    with shots.serve_app(space / "app.py", [], tmp_path / "app.log") as url:
        found = shots.segment_in_browser(url, space / "examples" / "scene.png", screenshot, task="panoptic")
    assert "Model: model · 3 classes" in found["page_text"]  # the Space's own model folder
    assert found["rows"], "no segment table"
    labels = {row[0] for row in found["rows"]}
    assert labels <= {"person", "sky", "grass"}
    assert all(int(row[2]) > 0 for row in found["rows"])
    # Both result pictures: the image (320 x 240) with the legend below it.
    assert [width for width, _ in found["pictures"]] == [320, 320]
    assert all(height > 240 for _, height in found["pictures"])
    assert "panoptic" in found["status"]
    picture = np.asarray(Image.open(screenshot))
    assert picture.shape[0] >= 600 and picture.shape[1] >= 1000 and picture.std() > 10
