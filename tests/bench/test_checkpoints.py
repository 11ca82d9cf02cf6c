"""The report's checkpoint cache: a checkpoint is reused only under the settings its preset has now."""

from dataclasses import replace

from aqlm_compile.bench import checkpoints
from aqlm_compile.quantize import presets


def test_cached_name_follows_the_presets_settings(monkeypatch, tmp_path):
    fast = checkpoints.checkpoint_path("smol", "2x8g8", "fast", root=tmp_path)
    assert fast == checkpoints.checkpoint_path("smol", "2x8g8", "fast", root=tmp_path)  # stable
    assert fast.parent == tmp_path and fast.name.startswith("smol-2x8g8-fast-") and fast.name.endswith("-s0")
    assert fast != checkpoints.checkpoint_path("smol", "2x8g8", "quality", root=tmp_path)
    # the same preset name with other settings (a preset changed between runs) names another checkpoint
    monkeypatch.setitem(presets.PRESETS, "fast", replace(presets.PRESETS["fast"], max_rounds=1))
    assert checkpoints.checkpoint_path("smol", "2x8g8", "fast", root=tmp_path) != fast
