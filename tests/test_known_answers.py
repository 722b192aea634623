"""Known-answer unit tests: tiny hand-built cases whose exact answer is derived on paper.

No Ray, no network, no models: each test builds its inputs by hand (tensors, parquet files in
tmp_path, pydantic filter params, stage objects from the demo recipe) and asserts the exact result.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import TypeAdapter

from filters.registry import FilterParams
from pipeline.config import load_recipe
from pipeline.graph import STAGE_BY_NAME, build_stages, counts_source, downstream, resolve_inputs
from stages.dedupe import DedupeOutputs
from stages.download import DownloadOutputs
from stages.evaluate import recall_at_k, zeroshot_accuracy
from stages.filter import FilterOutputs
from stages.filter.pool_table import build_pool_table, upstream_failure
from stages.filter.strategy_inputs import check_columns, resolve_strategy
from stages.phash import SCHEMA as HASH_SCHEMA
from stages.selection import kept_slice, write_kept_mask
from stages.subset import Subset, SubsetOutputs
from stages.train import Train

# --- evaluate: zero-shot accuracy and recall@k ---------------------------------------------------


def test_zeroshot_accuracy_top1_top5_chance_on_4x6():
    """4 images x 6 classes: the target sits at rank 0, 4, 5 and 0 -> top1 2/4, top5 3/4, chance 1/6."""
    descending = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]  # class c has rank c
    logits = torch.tensor([descending, descending, descending, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    target = torch.tensor([0, 4, 5, 5])  # rank 0 (hit), rank 4 (top5 only), rank 5 (miss), rank 0 (hit)
    assert zeroshot_accuracy(logits, target) == {
        "zeroshot_top1": 0.5,
        "zeroshot_top5": 0.75,
        "zeroshot_chance": 1 / 6,
    }


def test_zeroshot_accuracy_top5_is_top_all_when_fewer_than_5_classes():
    """3 classes: top-5 means top-3, so every image is a top-5 hit; one of two is a top-1 hit."""
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    target = torch.tensor([0, 2])  # rank 0, rank 2 (last)
    assert zeroshot_accuracy(logits, target) == {
        "zeroshot_top1": 0.5,
        "zeroshot_top5": 1.0,
        "zeroshot_chance": 1 / 3,
    }


RANKED = torch.tensor(
    [
        [0.9, 0.1, 0.2, 0.3],  # diagonal 0.9: nothing above -> rank 0
        [0.5, 0.4, 0.6, 0.1],  # diagonal 0.4: 0.5, 0.6 above -> rank 2
        [0.8, 0.7, 0.65, 0.9],  # diagonal 0.65: 0.8, 0.7, 0.9 above -> rank 3
        [0.1, 0.2, 0.3, 0.4],  # diagonal 0.4: nothing above -> rank 0
    ]
)


def test_recall_at_k_rows_with_known_ranks():
    """Row ranks 0, 2, 3, 0 -> recall@1 = @2 = 2/4, @3 = 3/4, @4 = 4/4."""
    assert recall_at_k(RANKED, [1, 2, 3, 4]) == {1: 0.5, 2: 0.5, 3: 0.75, 4: 1.0}


def test_recall_at_k_transposed_ranks_columns():
    """The transpose (text -> image) ranks columns: column ranks 0, 1, 0, 1 -> recall@1 2/4, @2 4/4."""
    assert recall_at_k(RANKED.T, [1, 2]) == {1: 0.5, 2: 1.0}


def test_recall_at_k_tie_with_the_right_answer_is_a_hit():
    """Row 2 ties its right column (0.5) with column 3: no candidate is strictly more similar, so
    its rank is 0 and every row is a hit at k=1."""
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.1, 0.1],
            [0.1, 0.9, 0.1, 0.1],
            [0.1, 0.1, 0.5, 0.5],
            [0.1, 0.1, 0.1, 0.9],
        ]
    )
    assert recall_at_k(similarity, [1, 2]) == {1: 1.0, 2: 1.0}


# --- filter: the per-uid pool table ----------------------------------------------------------------


def _write_pool(tmp_path):
    """Download parquets, hash tables, dedupe decisions and embeddings for uids a..e (see below)."""
    shards = tmp_path / "shards"
    hashes = tmp_path / "hashes"
    embeddings = tmp_path / "embeddings"
    for folder in (shards, hashes, embeddings):
        folder.mkdir()

    def download(uids, statuses):
        n = len(uids)
        return pa.table(
            {
                "uid": uids,
                "caption": [f"caption {u}" for u in uids],
                "status": statuses,
                "original_width": pa.array([100 + i for i in range(n)], pa.int64()),
                "original_height": pa.array([50 + i for i in range(n)], pa.int64()),
            }
        )

    # a, b, d downloaded in shard 0 (c failed); e downloaded in shard 1
    pq.write_table(
        download(["a", "b", "c", "d"], ["success", "success", "failed_to_download", "success"]),
        shards / "00000.parquet",
    )
    pq.write_table(download(["e"], ["success"]), shards / "00001.parquet")

    def hash_rows(rows):
        columns = list(zip(*rows, strict=True))
        return pa.Table.from_arrays(
            [pa.array(c, f.type) for c, f in zip(columns, HASH_SCHEMA, strict=True)], schema=HASH_SCHEMA
        )

    # a hashed; b could not be decoded; d never hashed; e hashed (shard 1)
    pq.write_table(
        hash_rows([("a", 11, 64, 64, 100, 50, None), ("b", None, None, None, None, None, "decode_error")]),
        hashes / "00000.parquet",
    )
    pq.write_table(hash_rows([("e", 55, 64, 64, 100, 50, None)]), hashes / "00001.parquet")

    # dedupe saw a (kept) and e (duplicate of a); b and d are absent
    decisions = tmp_path / "decisions.parquet"
    pq.write_table(pa.table({"uid": ["a", "e"], "keep": [True, False], "reason": [None, "duplicate_of:a"]}), decisions)

    def embedding_rows(uids, reasons, scores):
        vectors = pa.array([float(i) for i in range(2 * len(uids))], pa.float32())
        return pa.table(
            {
                "uid": uids,
                "reason": pa.array(reasons, pa.string()),
                "image_emb": pa.FixedSizeListArray.from_arrays(vectors, 2),
                "text_emb": pa.FixedSizeListArray.from_arrays(vectors, 2),
                "clip_score": pa.array(scores, pa.float32()),
            }
        )

    # a embedded (score 0.25), b failed to decode; d and e never embedded
    pq.write_table(
        embedding_rows(["a", "b"], [None, "decode_error"], [0.25, float("nan")]), embeddings / "00000.parquet"
    )
    return shards, hashes, decisions, embeddings


def test_build_pool_table_joins_every_upstream_by_uid(tmp_path):
    """Only successful downloads (a, b, d, e) appear, once each and in shard order, with their own
    caption/size, pHash, dedupe verdict and scores; what an upstream never wrote gets an explicit
    reason (not_hashed / not_embedded) and a uid dedupe never saw gets null dedupe columns."""
    shards, hashes, decisions, embeddings = _write_pool(tmp_path)
    table = build_pool_table(shards, hashes, decisions, embeddings)
    rows = {row["uid"]: row for row in table.to_pylist()}

    assert table.column("uid").to_pylist() == ["a", "b", "d", "e"]
    assert rows["b"]["caption"] == "caption b" and rows["b"]["original_width"] == 101
    assert rows["e"]["caption"] == "caption e" and rows["e"]["original_height"] == 50

    assert table.column("phash").to_pylist() == [11, None, None, 55]
    assert table.column("phash_reason").to_pylist() == [None, "decode_error", "not_hashed", None]

    assert table.column("dedupe_keep").to_pylist() == [True, None, None, False]
    assert table.column("dedupe_reason").to_pylist() == [None, None, None, "duplicate_of:a"]

    assert rows["a"]["image_emb"] == [0.0, 1.0] and rows["a"]["clip_score"] == 0.25
    assert rows["d"]["image_emb"] is None and rows["e"]["clip_score"] is None
    assert table.column("embed_reason").to_pylist() == [None, "decode_error", "not_embedded", "not_embedded"]

    assert upstream_failure(table) == [None, "decode_error", "not_hashed", "not_embedded"]


def test_build_pool_table_downloads_only(tmp_path):
    """Without the optional inputs the table is just uid, caption and original sizes."""
    shards, *_ = _write_pool(tmp_path)
    table = build_pool_table(shards)
    assert table.column_names == ["uid", "caption", "original_width", "original_height"]
    assert table.column("uid").to_pylist() == ["a", "b", "d", "e"]
    assert upstream_failure(table) == [None] * 4


def test_upstream_failure_first_non_null_of_phash_then_embed():
    """Per row the phash reason wins over the embed reason; None only when both are null."""
    table = pa.table(
        {
            "uid": ["w", "x", "y", "z"],
            "phash_reason": pa.array([None, "decode_error", None, "not_hashed"], pa.string()),
            "embed_reason": pa.array([None, "not_embedded", "decode_error", None], pa.string()),
        }
    )
    assert upstream_failure(table) == [None, "decode_error", "decode_error", "not_hashed"]


# --- subset: drop reasons ------------------------------------------------------------------------


def test_kept_uids_per_shard_in_table_order_and_every_other_sample_under_its_folded_reason(tmp_path):
    """The join subset and the train mask share: kept uids per shard in the shard table's order;
    per-uid dedupe reasons fold to their kind, a null reason is 'dropped', a sample no decision covers
    is undecided, and a failed download is not a sample at all."""
    shards = []
    for name, uids, status in [("00000", ["e", "a", "b", "x"], ["success"] * 3 + ["failed_to_download"]),
                               ("00001", ["f", "c", "d", "u", "g"], ["success"] * 5)]:  # fmt: skip
        pq.write_table(pa.table({"uid": uids, "status": status}), tmp_path / f"{name}.parquet")
        shards.append(str(tmp_path / f"{name}.tar"))
    decisions = pa.table(
        {
            "uid": ["a", "b", "c", "d", "e", "f", "x", "g"],
            "keep": [True, False, False, False, True, False, True, None],
            "reason": [None, "duplicate_of:a", "eval_duplicate_of:z", "failed:decode_error", None, None, None, "nsfw"],
        }
    )
    mask = write_kept_mask(shards, decisions, tmp_path / "kept", undecided="undecided")
    assert mask.in_count == 8 and mask.shards == [shards[0]] and mask.kept_per_shard == [2]
    assert kept_slice(mask.folder, shards[0], 0, 2) == ["e", "a"]  # the table's order, not the uids'
    assert not (tmp_path / "kept" / "00001.parquet").exists()  # a shard that keeps nothing has no file
    assert mask.dropped == {
        "dropped": 1,  # f: no reason given
        "duplicate_of": 1,
        "eval_duplicate_of": 1,
        "failed:decode_error": 1,
        "nsfw": 1,  # g: a null keep is a drop under its reason
        "undecided": 1,  # u
    }
    twice = pa.concat_tables([decisions, decisions.slice(0, 1)])
    with pytest.raises(ValueError, match="1 uid\\(s\\) more than once"):
        write_kept_mask(shards, twice, tmp_path / "kept2")
    # decisions written per shard, as dedupe and filter write them, are joined shard by shard
    keep_f = decisions.set_column(1, "keep", pa.array([True, False, False, False, True, True, True, None]))
    whole = write_kept_mask(shards, keep_f, tmp_path / "kept3", undecided="undecided")
    per_shard = tmp_path / "decisions"
    per_shard.mkdir()
    for name, uids in [("00000", ["a", "b", "e", "x"]), ("00001", ["c", "d", "f", "g"])]:
        pq.write_table(keep_f.filter(pc.is_in(keep_f.column("uid"), pa.array(uids))), per_shard / f"{name}.parquet")
    again = write_kept_mask(shards, str(per_shard), tmp_path / "kept4", undecided="undecided")
    assert whole.kept_per_shard == [2, 1] and whole.shards == shards
    assert (again.in_count, again.shards, again.kept_per_shard, again.dropped) == (
        whole.in_count, whole.shards, whole.kept_per_shard, whole.dropped,
    )  # fmt: skip
    assert [kept_slice(again.folder, s, 0, 9) for s in shards] == [["e", "a"], ["f"]]
    (per_shard / "00001.parquet").unlink()  # a shard no decision file covers: its samples are undecided
    partly = write_kept_mask(shards, str(per_shard), tmp_path / "kept5", undecided="undecided")
    assert partly.kept_per_shard == [2] and partly.dropped["undecided"] == 5


# --- filter: strategy inputs ---------------------------------------------------------------------

_PARAMS = TypeAdapter(FilterParams)


def _step(**fields):
    return _PARAMS.validate_python(fields)


def test_resolve_strategy_fills_only_what_the_recipe_left_empty():
    """Empty head/words/targets come from the run; anything the recipe set is kept as given."""
    steps = [
        _step(name="aesthetic"),
        _step(name="aesthetic", head="/given.pt"),
        _step(name="text_based"),
        _step(name="text_based", words=["cat"]),
        _step(name="text_based", vocabulary="/vocab.txt"),
        _step(name="image_based"),
        _step(name="image_based", targets="/given.npy"),
        _step(name="nsfw", backend="head"),
        _step(name="dfn", threshold=0.3),
    ]
    heads = {"aesthetic": "/run/aesthetic.pt", "nsfw": "/run/nsfw.pt"}
    resolved = resolve_strategy(steps, heads, ["dog", "bird"], "/run/classes.npy")

    assert [p.name for p in resolved] == [p.name for p in steps]
    assert resolved[0].head == "/run/aesthetic.pt"
    assert resolved[1].head == "/given.pt"
    assert resolved[2].words == ["dog", "bird"]
    assert resolved[3].words == ["cat"]
    assert resolved[4].words is None and resolved[4].vocabulary == "/vocab.txt"
    assert resolved[5].targets == "/run/classes.npy"
    assert resolved[6].targets == "/given.npy"
    assert resolved[7].head == "/run/nsfw.pt" and resolved[7].backend == "head"
    assert resolved[8] == steps[8]
    assert steps[0].head is None and steps[2].words is None  # the inputs are not mutated


def test_resolve_strategy_none_defaults_leave_fields_unset():
    """With no fitted head, no class names and no class embeddings the empty fields stay unset (None)."""
    steps = [_step(name="aesthetic"), _step(name="text_based"), _step(name="image_based")]
    resolved = resolve_strategy(steps, {}, None, None)
    assert resolved == steps
    assert (resolved[0].head, resolved[1].words, resolved[2].targets) == (None, None, None)
    assert "head" not in resolved[0].model_fields_set
    assert "words" not in resolved[1].model_fields_set
    assert "targets" not in resolved[2].model_fields_set


def test_check_columns_names_the_missing_column_and_the_hint():
    """dfn needs dfn_score: absent -> one ValueError line with the hint; present -> no error."""
    steps = [_step(name="dfn", threshold=0.3)]
    hints = {"dfn_score": "set embed.dfn_model"}
    message = "filter 'dfn' needs 'dfn_score': set embed.dfn_model"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_columns(steps, ["uid", "caption", "clip_score"], hints)
    check_columns(steps, ["uid", "caption", "clip_score", "dfn_score"], hints)
    with pytest.raises(ValueError, match=re.escape("filter 'dfn' needs 'dfn_score': no stage gives it")):
        check_columns(steps, ["uid"], {})


# --- pipeline graph wiring -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_recipe():
    return load_recipe("demo")


@pytest.fixture(scope="module")
def demo_stages(demo_recipe):
    """Built once: the first build imports open_clip (the filter stage checks the embed width), ~3 s."""
    return build_stages(demo_recipe)


def test_demo_stage_order_and_downstream_of_filter(demo_recipe, demo_stages):
    """The demo's stages are built in recipe order; changing the filter re-runs filter, subset, train, evaluate."""
    stages = demo_stages
    assert [s.name for s in stages] == list(demo_recipe.stages)
    assert [type(s) for s in stages] == [STAGE_BY_NAME[name] for name in demo_recipe.stages]
    assert downstream(stages, {"filter"}) == ["filter", "subset", "train", "evaluate"]
    assert downstream(stages, {"evaluate"}) == ["evaluate"]


def test_resolve_inputs_takes_the_latest_producer(demo_recipe):
    """Train reads the latest Shards (the subset's when there is one, else the download's); subset
    reads the download's shards (a SubsetOutputs is not a DownloadOutputs) and the latest decisions."""
    downloaded = DownloadOutputs(shards_dir="a", shards="a/x.tar")
    subsetted = SubsetOutputs(shards_dir="b")
    deduped, filtered = DedupeOutputs(decisions="d.parquet"), FilterOutputs(decisions="f.parquet")

    assert resolve_inputs(Train(demo_recipe), [downloaded, subsetted]).shards is subsetted
    assert resolve_inputs(Train(demo_recipe), [downloaded]).shards is downloaded

    inputs = resolve_inputs(Subset(demo_recipe), [downloaded, deduped, subsetted, filtered])
    assert inputs.shards is downloaded
    assert inputs.decisions is filtered
    assert resolve_inputs(Subset(demo_recipe), [downloaded, deduped]).decisions is deduped


def test_counts_source_is_the_stage_that_made_the_counted_input(demo_recipe):
    """Train's `in` must equal the kept of whichever stage made its shards: subset, else download."""
    download, subset, train = (STAGE_BY_NAME[n](demo_recipe) for n in ("download", "subset", "train"))
    downloaded = DownloadOutputs(shards_dir="a", shards="a/x.tar")
    subsetted = SubsetOutputs(shards_dir="b")
    assert counts_source(train, [(download, downloaded), (subset, subsetted)]) is subset
    assert counts_source(train, [(download, downloaded)]) is download
    assert counts_source(STAGE_BY_NAME["evaluate"](demo_recipe), [(download, downloaded)]) is None


def test_task_metrics_average_over_the_tasks_that_report_each_metric():
    from stages.evaluate import task_metrics

    got = task_metrics({"cars": {"zeroshot_top1": 0.2}, "flowers": {"zeroshot_top1": 0.5, "recall": 1.0}})
    assert got == {
        "task/cars/zeroshot_top1": 0.2,
        "task/flowers/zeroshot_top1": 0.5,
        "task/flowers/recall": 1.0,
        "tasks_average/recall": 1.0,
        "tasks_average/zeroshot_top1": pytest.approx(0.35),
    }


def test_status_shows_the_newest_training_inside_a_stage_that_has_no_progress_of_its_own(tmp_path):
    """seed_models trains two models in subfolders: `pipeline status` shows the one training now."""
    import os

    from pipeline.progress import PROGRESS_FILE, ProgressWriter, describe

    stage = tmp_path / "seed_models"
    ProgressWriter(stage / "clip" / "train").update(unit="steps", done=100, total=100, loss=2.0)
    ProgressWriter(stage / "dfn" / "train").update(unit="steps", done=5, total=25, loss=1.5)
    os.utime(stage / "clip" / "train" / PROGRESS_FILE, (1, 1))  # written long before the other
    assert describe(stage) == "dfn: step 5/25, loss 1.500"
    os.utime(stage / "dfn" / "train" / PROGRESS_FILE, (0, 0))
    assert describe(stage) == "clip: step 100/100, loss 2.000"
    ProgressWriter(stage).update(unit="tasks", done=1, total=4)  # a stage's own progress wins
    assert describe(stage) == "1/4 tasks"
    assert describe(tmp_path / "nothing") == ""


def test_model_configs_read_without_open_clip_are_open_clips_own():
    """Plans, budgets and recipe checks read model configs from their JSON files, so that a dry run
    or a bad-input error takes a second, not the ~5 s of importing open_clip and torch."""
    import subprocess
    import sys

    import open_clip

    from stages import clip_models

    clip_models.register_model_configs()
    for name in ("demo-tiny", "ViT-B-32", "ViT-L-14", "convnext_base_w", "RN50"):
        assert clip_models.model_config(name) == open_clip.get_model_config(name), name
    assert clip_models.model_config("nope") is None
    dry_run = "from pipeline.cli import app; app(['run', 'demo', '--dry-run'])"  # budgets, embed widths
    imported = "sorted({'torch', 'open_clip'} & set(sys.modules))"
    check = f"import atexit, sys; atexit.register(lambda: print({imported})); {dry_run}"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert "demo-tiny" in out.stdout and out.stdout.strip().endswith("[]"), out.stdout[-500:] + out.stderr[-2000:]
