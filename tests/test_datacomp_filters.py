"""The DataComp baselines and beyond on small tables whose kept uids are known by construction."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import TypeAdapter, ValidationError

from filters import image_based, metaclip_balance, semantic_dedupe, text_based
from filters.registry import FilterParams, Strategy
from filters.strategy import apply_strategy
from filters.vocabulary import TermMatcher, load_terms

PARAMS = TypeAdapter(FilterParams)
STRATEGY = TypeAdapter(Strategy)


def _table(uids: list[str] | None = None, **columns) -> pa.Table:
    n = len(next(iter(columns.values())))
    return pa.table({"uid": uids or [f"u{i:03d}" for i in range(n)], **columns})


def _embeddings(matrix: np.ndarray) -> pa.Array:
    flat = pa.array(np.asarray(matrix, np.float16).ravel())
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


def _kept(result) -> set[str]:
    return {u for u, k in zip(result.uids, result.keep, strict=True) if k}


def test_vocabulary_matches_words_phrases_and_plurals_not_substrings(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# classes\nGolden Retriever\nbus  # vehicle\n\n")
    terms = load_terms(["Cat"], str(words))
    assert terms == ["bus", "cat", "golden retriever"]
    matcher = TermMatcher(terms)
    assert matcher.matches("Two CATS near a golden retriever") == [1, 2]
    assert matcher.matches("buses at night") == [0]
    assert matcher.matches("a catalogue of golden things; retriever") == []  # no substrings, no split phrases
    with pytest.raises(FileNotFoundError, match="vocabulary file not found"):
        load_terms(None, str(tmp_path / "missing.txt"))


def test_text_based_keeps_captions_naming_a_class():
    table = _table(caption=["a red circle", "two red circles", "a blue square", "", None, "circle-ish blob"])
    result = text_based.apply(table, PARAMS.validate_python({"name": "text_based", "words": ["red circle"]}))
    assert _kept(result) == {"u000", "u001"}
    assert result.reason[2] == "text_based" and result.metrics["vocabulary_size"] == 1
    with pytest.raises(ValueError, match="vocabulary is empty"):
        text_based.apply(table, PARAMS.validate_python({"name": "text_based", "words": []}))


def _blobs(rng, centres: np.ndarray, per_blob: int, spread: float = 0.05) -> np.ndarray:
    return np.concatenate([c + spread * rng.normal(size=(per_blob, centres.shape[1])) for c in centres])


def test_image_based_keeps_the_clusters_nearest_to_the_targets(tmp_path):
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:4] * 3  # four well-separated directions
    emb = _blobs(rng, centres, 25)
    targets = tmp_path / "targets.npy"
    np.save(targets, np.stack([centres[1] + 0.2 * np.eye(8)[5], centres[3]]))  # near blobs 1 and 3
    table = _table(image_emb=_embeddings(emb))
    params = {"name": "image_based", "targets": str(targets), "n_clusters": 4, "min_cluster_size": 1}
    result = image_based.apply(table, PARAMS.validate_python(params))
    expected = {f"u{i:03d}" for i in list(range(25, 50)) + list(range(75, 100))}
    assert _kept(result) == expected
    assert result.metrics == {"clusters": 4.0, "clusters_kept": 2.0}
    np.save(targets, np.ones((2, 5)))
    with pytest.raises(ValueError, match="5-dim but image embeddings 8"):
        image_based.apply(table, PARAMS.validate_python(params))
    targets.write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="not a readable .npy"):
        image_based.apply(table, PARAMS.validate_python(params))


def test_semantic_dedupe_drops_near_copies_of_kept_samples_only():
    rng = np.random.default_rng(1)
    distinct = rng.normal(size=(12, 16))  # random directions: cosine similarity far below 0.95
    copies = distinct[[2, 5, 7]] + 1e-4 * rng.normal(size=(3, 16))  # near-exact copies of u002, u005, u007
    emb = np.concatenate([distinct, copies])
    uids = [f"u{i:03d}" for i in range(12)] + ["c002", "c005", "c007"]
    table = _table(uids, image_emb=_embeddings(emb))
    params = PARAMS.validate_python(
        {"name": "semantic_dedupe", "epsilon": 0.05, "n_clusters": 2, "min_cluster_size": 1}
    )
    result = semantic_dedupe.apply(table, params)
    dropped = set(uids) - _kept(result)
    assert len(dropped) == 3
    for i in (2, 5, 7):  # exactly one of each pair goes, never both
        assert len(dropped & {f"u{i:03d}", f"c{i:03d}"}) == 1
    removed = [result.metrics[f"removed_fraction_eps_{e:g}"] for e in (0.01, 0.02, 0.05, 0.1, 0.2)]
    assert removed == sorted(removed) and removed[0] == pytest.approx(3 / 15)
    # order-free: the same uids survive when the table is shuffled
    order = np.random.default_rng(2).permutation(len(uids))
    shuffled = semantic_dedupe.apply(_table([uids[i] for i in order], image_emb=_embeddings(emb[order])), params)
    assert _kept(shuffled) == _kept(result)


def test_a_rows_typicality_is_the_same_alone_in_a_shard_or_in_the_pool():
    """SemDeDup visits a cluster least typical first, uid breaking ties: two copies of an image in
    different shards must tie exactly, so a row's similarity to its centroid may not depend on the
    rows it is computed with (a BLAS product of one row, or of a small shard, rounds differently)."""
    from filters.clustering import nearest_centroid, unit_rows

    rng = np.random.default_rng(3)
    pool = unit_rows(rng.normal(size=(700, 512)))
    centroids = unit_rows(rng.normal(size=(5, 512)))
    whole_cluster, whole_typicality = nearest_centroid(pool, centroids)
    for start, stop in ((0, 1), (1, 8), (8, 101), (101, 700)):
        cluster, typicality = nearest_centroid(pool[start:stop], centroids)
        assert np.array_equal(cluster, whole_cluster[start:stop])
        assert np.array_equal(typicality, whole_typicality[start:stop]), (start, stop)
    exact = (pool.astype(np.float64) * centroids[whole_cluster].astype(np.float64)).sum(axis=1)
    assert np.allclose(whole_typicality, exact, atol=1e-6)


def test_k_means_gives_the_same_centroids_every_fit_however_many_threads(monkeypatch):
    """A pool filtered twice (shard by shard and at once, or again after a resume) is clustered
    twice: Lloyd's threads summing in the order they finish would move the centroids (CI once kept
    a different copy of an image that way, on a machine with more cores than this one)."""
    from threadpoolctl import threadpool_limits

    from filters.clustering import fit_on, unit_rows

    rows = unit_rows(np.random.default_rng(4).normal(size=(1_000, 64)))
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # else scikit-learn uses no more threads than cores
    with threadpool_limits(limits=8, user_api="openmp"):
        fits = [fit_on(rows, 5, seed=0) for _ in range(8)]
    assert all(np.array_equal(fit, fits[0]) for fit in fits[1:])
    assert not np.array_equal(fit_on(rows, 5, seed=1), fits[0])  # the seed still matters


def test_semantic_dedupe_compares_with_kept_samples_not_dropped_ones():
    """Visiting a, b, c with a~b, b~c but a not ~ c: b goes (near kept a), c stays (only near dropped b)."""
    similarity = np.array([[1.0, 0.97, 0.90], [0.97, 1.0, 0.97], [0.90, 0.97, 1.0]])
    (keep,) = semantic_dedupe.greedy_keep(similarity, [0.95])
    assert keep.tolist() == [True, False, True]
    # through the filter: the least typical (a and c, the ends of the arc) are visited before b
    angle = np.deg2rad(15)  # cos 15° = 0.966 > 0.95; cos 30° = 0.866 < 0.95
    emb = np.array([[np.cos(k * angle), np.sin(k * angle), 0.0] for k in (0, 1, 2)] + [[0.0, 0.0, 1.0]])
    table = _table(["a", "b", "c", "z"], image_emb=_embeddings(emb))
    params = PARAMS.validate_python({"name": "semantic_dedupe", "epsilon": 0.05, "n_clusters": 1})
    assert _kept(semantic_dedupe.apply(table, params)) == {"a", "c", "z"}


def test_metaclip_balance_flattens_head_entries_keeps_tail_and_drops_unmatched():
    captions = ["a cat on a mat"] * 200 + ["a dog in the park"] * 5 + ["a cat and a dog"] + ["a chair"] * 4
    uids = [f"m{i:04d}" for i in range(len(captions))]
    table = _table(uids, caption=captions)
    params = PARAMS.validate_python({"name": "metaclip_balance", "words": ["cat", "dog"], "t": 20, "t_pool": None})
    result = metaclip_balance.apply(table, params)
    kept = _kept(result)
    assert set(uids[200:206]) <= kept  # dog is a tail entry (6 < t): kept whole, even when sharing with cat
    assert not kept & set(uids[206:])  # no entry matched
    assert {result.reason[i] for i in range(206, 210)} == {"metaclip:no_match"}
    cats = len(kept & set(uids[:200]))
    assert 8 <= cats <= 35  # Binomial(200, 20/201): mean 19.9, sd 4.2
    assert result.metrics == {"t": 20.0, "entries_matched": 2.0, "head_entries": 1.0}
    order = np.random.default_rng(0).permutation(len(uids))  # draws hash the uid: same set in any order
    shuffled = metaclip_balance.apply(_table([uids[i] for i in order], caption=[captions[i] for i in order]), params)
    assert _kept(shuffled) == kept
    scaled = PARAMS.validate_python({"name": "metaclip_balance", "words": ["cat"]})
    assert metaclip_balance.effective_t(scaled, 4_000_000) == pytest.approx(200)  # 20k at 400M, scaled


def test_presets_expand_and_image_based_with_clip_score_is_datacomp_1b(tmp_path):
    steps = STRATEGY.validate_python(["laion2b", {"name": "dedupe"}])
    assert [s.name for s in steps] == ["clip_score", "basic", "dedupe"]
    assert steps[0].threshold == 0.28 and steps[1].languages == ["en"] and steps[1].min_image_side == 0
    assert [s.name for s in STRATEGY.validate_python("datacomp_1b")] == ["image_based", "clip_score"]
    with pytest.raises(ValidationError, match="unknown strategy preset 'laion5b'"):
        STRATEGY.validate_python("laion5b")

    rng = np.random.default_rng(3)
    emb = _blobs(rng, np.eye(6)[:3] * 3, 20)
    np.save(tmp_path / "t.npy", np.eye(6)[:1])
    scores = np.linspace(0, 1, 60)
    table = _table(image_emb=_embeddings(emb), clip_score=scores)
    image_step = {"name": "image_based", "targets": str(tmp_path / "t.npy"), "n_clusters": 3, "min_cluster_size": 1}
    steps = STRATEGY.validate_python([image_step, {"name": "clip_score", "top_fraction": 0.5}])
    result = apply_strategy(table, steps)
    # blob 0 (u000-u019) is the target's cluster; the top half by score is u030-u059: they do not meet
    assert not result.keep.any()
    steps[1] = steps[1].model_copy(update={"top_fraction": 0.9})  # top 90%: u006-u059
    assert {u for u, k in zip(result.uids, apply_strategy(table, steps).keep, strict=True) if k} == {
        f"u{i:03d}" for i in range(6, 20)
    }


def test_clustering_filters_give_the_same_uids_with_work_fanned_out_as_ray_tasks(ray_cluster, tmp_path, monkeypatch):
    from filters import clustering
    from pipeline.executor import make_ray_map

    monkeypatch.setattr(clustering, "ASSIGN_CHUNK", 16)  # several chunks, so several tasks
    rng = np.random.default_rng(4)
    emb = _blobs(rng, np.eye(8)[:4] * 3, 20, spread=0.3)
    np.save(tmp_path / "t.npy", np.eye(8)[:2])
    table = _table(image_emb=_embeddings(emb))
    steps = STRATEGY.validate_python(
        [
            {"name": "image_based", "targets": str(tmp_path / "t.npy"), "n_clusters": 4, "min_cluster_size": 1},
            {"name": "semantic_dedupe", "epsilon": 0.1, "n_clusters": 4, "min_cluster_size": 1},
        ]
    )
    local = apply_strategy(table, steps)
    on_ray = apply_strategy(table, steps, make_ray_map())
    assert on_ray.keep.tolist() == local.keep.tolist() and on_ray.reason == local.reason
    assert 0 < local.keep.sum() < len(emb)
