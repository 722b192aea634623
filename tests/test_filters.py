"""Filters over small per-uid tables whose expected kept uids are known by construction."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from filters import basic, ranking
from filters.heads import HeadError, HeadInfo, fit_head, load_head, save_head, score_head
from filters.ranking import top_fraction_mask
from filters.registry import FilterParams
from filters.strategy import StrategyError, apply_strategy

PARAMS = TypeAdapter(FilterParams)


def _table(**columns) -> pa.Table:
    n = len(next(iter(columns.values())))
    return pa.table({"uid": [f"u{i:03d}" for i in range(n)], **columns})


def test_top_fraction_is_global_and_independent_of_row_order_and_sharding():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=1000).round(2)  # rounding makes ties, broken by uid
    uids = [f"u{i:04d}" for i in range(1000)]
    keep, threshold = top_fraction_mask(scores, uids, 0.3)
    assert keep.sum() == 300
    assert scores[keep].min() == threshold and scores[~keep].max() <= threshold
    kept = {u for u, k in zip(uids, keep, strict=True) if k}
    for seed in range(3):  # any permutation / any way of concatenating shards gives the same set
        order = np.random.default_rng(seed).permutation(1000)
        shuffled_keep, _ = top_fraction_mask(scores[order], [uids[i] for i in order], 0.3)
        assert {uids[i] for i, k in zip(order, shuffled_keep, strict=True) if k} == kept


def test_clip_score_threshold_and_nan_never_kept():
    table = _table(clip_score=[0.1, 0.3, np.nan, 0.25, 0.5])
    result = ranking.apply(table, PARAMS.validate_python({"name": "clip_score", "threshold": 0.25}))
    assert result.keep.tolist() == [False, True, False, True, True]
    assert result.reason == ["clip_score", None, "clip_score", None, None]
    top = ranking.apply(table, PARAMS.validate_python({"name": "clip_score", "top_fraction": 0.4}))
    assert top.keep.tolist() == [False, True, False, False, True]


def test_dfn_ranks_its_own_column():
    table = _table(clip_score=[0.9, 0.1, 0.5, 0.2], dfn_score=[0.1, 0.9, 0.2, 0.8])
    result = ranking.apply(table, PARAMS.validate_python({"name": "dfn", "top_fraction": 0.5}))
    assert result.keep.tolist() == [False, True, False, True]
    assert result.reason[0] == "dfn"


def test_rank_filter_ranks_any_named_column_and_names_it_in_reasons():
    table = _table(clip_score=[0.9, 0.1, 0.5, 0.2], aesthetic_score=[4.0, 7.5, 6.0, 5.0])
    result = ranking.apply(
        table, PARAMS.validate_python({"name": "rank", "column": "aesthetic_score", "threshold": 5.5})
    )
    assert result.keep.tolist() == [False, True, True, False]
    assert result.reason == ["aesthetic_score", None, None, "aesthetic_score"]
    with pytest.raises(ValidationError, match="needs column"):
        PARAMS.validate_python({"name": "rank", "threshold": 0.3})
    with pytest.raises(ValidationError, match="use name=rank"):
        PARAMS.validate_python({"name": "clip_score", "column": "dfn_score", "threshold": 0.3})


def test_basic_rules_in_order():
    captions = [
        "a large red circle in the centre",  # kept
        "red star",  # 2 words
        "une photo de vacances au bord de la mer avec des amis",  # French
        "a small blue square at the top left",  # image too small
        "a green ring at the bottom right corner",  # too elongated
        "a pink cross on a plain background",  # size unknown: passes
    ]
    table = _table(
        caption=captions,
        original_width=[300, 300, 300, 150, 900, None],
        original_height=[300, 300, 300, 400, 250, None],
    )
    result = basic.apply(table, basic.BasicParams())
    assert result.reason == [
        None,
        "basic:caption_length",
        "basic:language",
        "basic:image_size",
        "basic:aspect_ratio",
        None,
    ]
    anything = basic.apply(table, basic.BasicParams(languages=None, min_image_side=0, max_aspect_ratio=10))
    assert anything.reason[2:] == [None, None, None, None]


def test_strategy_is_an_intersection_with_first_reason_and_order_free_keep_set():
    table = _table(clip_score=[0.1, 0.5, 0.4, 0.9], dfn_score=[0.9, 0.1, 0.6, 0.8])
    steps = [
        PARAMS.validate_python({"name": "clip_score", "threshold": 0.3}),
        PARAMS.validate_python({"name": "dfn", "top_fraction": 0.5}),
    ]
    result = apply_strategy(table, steps)
    assert result.keep.tolist() == [False, False, False, True]
    assert result.reason == ["clip_score", "dfn", "dfn", None]
    assert apply_strategy(table, steps[::-1]).keep.tolist() == result.keep.tolist()
    with pytest.raises(StrategyError, match="'dfn' needs column 'dfn_score'"):
        apply_strategy(table.drop_columns(["dfn_score"]), steps)


def test_unknown_filter_and_out_of_range_params_are_rejected_on_load():
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        PARAMS.validate_python({"name": "sharpness"})
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        PARAMS.validate_python({"name": "clip_score", "top_fraction": 1.5})
    with pytest.raises(ValidationError, match="exactly one of threshold or top_fraction"):
        PARAMS.validate_python({"name": "dfn"})


def test_head_fits_saves_loads_and_scores(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    rating = 5 + 2 * x[:, 0]  # the rating lives in one direction of the embedding
    head, metrics = fit_head(x, rating, "regression", epochs=400, lr=3e-3)
    assert metrics["val_mae"] < 0.5
    path = save_head(head, HeadInfo(kind="regression", input_dim=16, target="rating"), tmp_path / "aesthetic")
    loaded, info = load_head(path)
    assert info.kind == "regression" and info.input_dim == 16
    np.testing.assert_allclose(score_head(loaded, info, x[:5]), score_head(head, info, x[:5]), rtol=1e-5)
    with pytest.raises(HeadError, match="head expects 16-dim embeddings but the pool's are 8-dim"):
        score_head(loaded, info, x[:, :8])


def test_laion_layout_bare_state_dict_loads(tmp_path):
    """LAION's improved aesthetic predictor, built here from its published definition (an
    nn.Sequential of Linear 768-1024, Dropout .2, 1024-128, Dropout .2, 128-64, Dropout .1, 64-16,
    16-1, no activations, under `layers`), loads as a bare state dict and scores as it does."""

    class LaionMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(768, 1024),
                torch.nn.Dropout(0.2),
                torch.nn.Linear(1024, 128),
                torch.nn.Dropout(0.2),
                torch.nn.Linear(128, 64),
                torch.nn.Dropout(0.1),
                torch.nn.Linear(64, 16),
                torch.nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    torch.manual_seed(0)
    reference = LaionMLP().eval()
    assert sorted(reference.state_dict())[:2] == ["layers.0.bias", "layers.0.weight"]
    torch.save(reference.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    head, info = load_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    assert info.input_dim == 768 and info.hidden == (1024, 128, 64, 16) and info.is_laion_l14
    embeddings = torch.nn.functional.normalize(torch.randn(5, 768), dim=-1)
    with torch.no_grad():
        assert torch.allclose(head(embeddings), reference(embeddings).squeeze(-1), atol=1e-6)


def test_bad_head_files_give_one_line_errors(tmp_path):
    with pytest.raises(HeadError, match="head weights not found"):
        load_head(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(HeadError, match="not a readable weights file"):
        load_head(tmp_path / "garbage.pt")
    torch.save({"w": torch.zeros(3)}, tmp_path / "odd.pt")
    with pytest.raises(HeadError, match="not an MLP head"):
        load_head(tmp_path / "odd.pt")
    torch.save({"layers.0.weight": torch.zeros(4, 8), "layers.0.bias": torch.zeros(4)}, tmp_path / "wide.pt")
    with pytest.raises(HeadError, match="not an MLP head"):
        load_head(tmp_path / "wide.pt")
