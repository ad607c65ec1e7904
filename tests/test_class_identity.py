"""Class identity under the SSL strong view in the miniature world (training/miniature/class_identity.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def shipped_model():
    from training.miniature.tiny_clip import SHIPPED_CONFIG, SHIPPED_WEIGHTS, dearli_on_tiny_clip

    return dearli_on_tiny_clip(SHIPPED_CONFIG, SHIPPED_WEIGHTS)


@pytest.fixture(scope="module")
def scenes():
    from training.miniature.world import render_world_image

    return [render_world_image(7, "val", i) for i in range(12)]  # a world seed no table uses


def test_weak_view_accuracy_is_the_zero_shot_report_and_colour_changes_lower_it(shipped_model, scenes):
    """With no perturbation the report equals the zero-shot report's mask-pooled accuracy on the same scenes (an
    independent code path); grayscale and the reference's hue jitter lower it, the class-keeping view much less."""
    from training.miniature.class_identity import STRONG_VIEWS, class_identity_report
    from training.miniature.tiny_clip_zero_shot import evaluate_masks

    names = ["weak view (none)", "grayscale", "hue 0.2", "class-keeping (jitter 0.1/0.2/0.4/0.02, blur 0.5)"]
    report = class_identity_report(shipped_model, scenes, {n: STRONG_VIEWS[n] for n in names})
    views = report["views"]
    reference = evaluate_masks(shipped_model, scenes)
    assert views[names[0]]["all"] == reference["all"] and views[names[0]]["n"] == reference["n"] > 30
    assert views["grayscale"]["all"] < views[names[0]]["all"] - 20
    assert views["hue 0.2"]["all"] < views[names[0]]["all"] - 10
    assert views[names[3]]["all"] > views["hue 0.2"]["all"]
    again = class_identity_report(shipped_model, scenes, {"hue 0.2": STRONG_VIEWS["hue 0.2"]})
    assert again["views"]["hue 0.2"]["all"] == views["hue 0.2"]["all"]  # the same draws per image
