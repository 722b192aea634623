"""Named strategies: the published baselines, usable wherever a strategy is (recipes and sweeps).

`filter.strategy: laion2b` names a preset; a list may mix presets and filters:
`[datacomp_basic, {name: dedupe}]`. Parameters are the published ones; the CLIP model is
whatever the embed stage used (DataComp's `l14`/`b32` presets assume ViT-L-14 / ViT-B-32).
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, list[dict[str, Any]]] = {
    # DataComp (Gadre et al. 2023), section 3.4 and its baselines.py
    "datacomp_basic": [{"name": "basic"}],
    "clip_l14_top30": [{"name": "clip_score", "top_fraction": 0.3}],
    "clip_b32_threshold_0.25": [{"name": "clip_score", "threshold": 0.25}],
    "basic_clip_l14_top30": [{"name": "basic"}, {"name": "clip_score", "top_fraction": 0.3}],
    "text_based": [{"name": "text_based"}],
    "image_based": [{"name": "image_based"}],
    "datacomp_1b": [{"name": "image_based"}, {"name": "clip_score", "top_fraction": 0.3}],  # image_based ∩ L/14 30%
    # LAION-2B (Schuhmann et al. 2022): ViT-B/32 CLIP score >= 0.28, English captions
    "laion2b": [
        {"name": "clip_score", "threshold": 0.28},
        {"name": "basic", "min_words": 0, "min_chars": 0, "min_image_side": 0, "max_aspect_ratio": None},
    ],
    # LAION-Aesthetics "5+" after pHash dedupe, as the LAION-A model card describes
    "laion_a": [{"name": "dedupe"}, {"name": "aesthetic", "threshold": 5.0}],
    # SemDeDup (Abbas et al. 2023) and MetaCLIP balancing (Xu et al. 2023)
    "semantic_dedupe": [{"name": "semantic_dedupe"}],
    "metaclip_balance": [{"name": "metaclip_balance"}],
}


def expand_presets(value: Any) -> Any:
    """A preset name, or a list mixing preset names and filter mappings, as a flat list of filters."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return value
    steps: list[Any] = []
    for item in value:
        if isinstance(item, str):
            if item not in PRESETS:
                raise ValueError(f"unknown strategy preset '{item}' (presets: {', '.join(PRESETS)})")
            steps += [dict(step) for step in PRESETS[item]]
        else:
            steps.append(item)
    return steps
