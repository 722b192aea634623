"""Published metadata and models as they ship: LAION and DataComp tables recognised by their columns,
filtered before download, DataComp uid lists and embeddings in and out, LAION's predictor and OpenAI's CLIP."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.shards import read_decisions
from stages.source_table import SourceTableError, load_source, metadata_columns
from stages.uid import compute_uid


def _laion(n: int = 3) -> pa.Table:
    """The columns of LAION-2B-en's improved-aesthetics parquets, in their order and types."""
    return pa.table(
        {
            "URL": [f"http://127.0.0.1/{i}.jpg" for i in range(n)],
            "TEXT": [f"a photo {i}" for i in range(n)],
            "WIDTH": pa.array([640] * n, pa.int64()),
            "HEIGHT": pa.array([480] * n, pa.int64()),
            "similarity": pa.array([0.31] * n, pa.float64()),
            "hash": pa.array(range(n), pa.int64()),
            "punsafe": pa.array([0.01] * n, pa.float32()),
            "pwatermark": pa.array([0.2] * n, pa.float32()),
            "AESTHETIC_SCORE": pa.array([6.1] * n, pa.float32()),
        }
    )


def _datacomp(n: int = 3) -> pa.Table:
    return pa.table(
        {
            "uid": [f"{i:032x}" for i in range(n)],
            "url": [f"http://127.0.0.1/{i}.jpg" for i in range(n)],
            "text": [f"a photo {i}" for i in range(n)],
            "original_width": pa.array([640] * n, pa.int64()),
            "original_height": pa.array([480] * n, pa.int64()),
            "clip_b32_similarity_score": pa.array([0.3] * n, pa.float32()),
            "clip_l14_similarity_score": pa.array([0.25] * n, pa.float32()),
            "face_bboxes": pa.array([[[0.1, 0.1, 0.2, 0.2]]] * n, pa.list_(pa.list_(pa.float64()))),
            "sha256": [f"{i:064x}" for i in range(n)],
        }
    )


def test_a_laion_parquet_reads_without_column_flags(tmp_path):
    pq.write_table(_laion(), tmp_path / "part-00000.parquet")
    table = load_source(str(tmp_path))
    assert table.column_names == [
        *("uid", "url", "caption", "source_width", "source_height", "similarity", "laion_hash"),
        *("punsafe", "pwatermark", "aesthetic_score"),
    ]
    assert table.column("caption").to_pylist()[0] == "a photo 0"
    assert table.column("uid").to_pylist()[0] == compute_uid("http://127.0.0.1/0.jpg", "a photo 0")
    assert metadata_columns(str(tmp_path)) == tuple(table.column_names[3:])


def test_a_datacomp_parquet_keeps_its_own_uids_and_scores(tmp_path):
    pq.write_table(_datacomp(), tmp_path / "0000000.parquet")
    table = load_source(str(tmp_path))
    assert table.column("uid").to_pylist() == [f"{i:032x}" for i in range(3)]
    assert table.column("caption").to_pylist()[2] == "a photo 2"
    # img2dataset writes its own original_width and sha256: DataComp's are kept beside them, renamed
    assert {"source_width", "source_height", "source_sha256", "clip_l14_similarity_score", "face_bboxes"} <= set(
        table.column_names
    )
    assert table.column("clip_l14_similarity_score").type == pa.float32()


def test_unknown_schemas_name_their_columns_and_carry_the_rest(tmp_path):
    path = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"link": ["http://x/1.jpg"], "alt": ["one"], "Score": [0.5], "width": [3]}), path)
    with pytest.raises(SourceTableError, match="missing column 'url'.*--set source.url_col"):
        load_source(str(path))
    table = load_source(str(path), url_col="link", caption_col="alt")
    assert table.column_names == ["uid", "url", "caption", "score", "source_width"]


def test_a_datacomp_table_with_an_empty_uid_is_refused_in_one_line(tmp_path):
    table = _datacomp()
    table = table.set_column(0, "uid", pa.array(["a" * 32, None, ""]))
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(SourceTableError) as err:
        load_source(str(tmp_path / "t.parquet"))
    assert "2 empty uid(s)" in str(err.value) and "\n" not in str(err.value)


def test_the_schema_can_be_named_when_detection_would_guess_wrong(tmp_path):
    # a plain table that happens to have uid/url/text columns but whose uids are not to be trusted
    pq.write_table(_datacomp().select(["uid", "url", "text"]), tmp_path / "t.parquet")
    table = load_source(str(tmp_path / "t.parquet"), "plain", caption_col="text")
    assert table.column("uid").to_pylist()[0] == compute_uid("http://127.0.0.1/0.jpg", "a photo 0")
    assert table.column_names[3:] == ["source_uid"]  # carried, not trusted


def test_uid_lists_in_datacomp_parquet_and_text_form_keep_or_drop_the_same_uids(tmp_path):
    import numpy as np

    from filters.uid_list import UidListError, UidListParams, apply, from_datacomp, write_datacomp

    uids = [f"{i * 7919:032x}" for i in range(6)]
    table = pa.table({"uid": uids})
    listed = [uids[4], uids[1], uids[1]]  # out of order, repeated: DataComp's writer does not dedupe
    pairs = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in listed], np.dtype("u8,u8"))
    np.save(tmp_path / "datacomp.npy", np.sort(pairs))
    pq.write_table(pa.table({"uid": listed}), tmp_path / "list.parquet")
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    for name in ("datacomp.npy", "list.parquet", "list.txt"):
        kept = apply(table, UidListParams(path=str(tmp_path / name)))
        assert kept.keep.tolist() == [False, True, False, False, True, False], name
        assert kept.reason[0] == "uid_list:not_listed"
        dropped = apply(table, UidListParams(path=str(tmp_path / name), mode="drop"))
        assert dropped.keep.tolist() == (~kept.keep).tolist() and dropped.reason[1] == "uid_list:listed"
    ours = write_datacomp(tmp_path / "ours.npy", listed)
    assert from_datacomp(np.load(ours)) == sorted(set(listed))
    np.save(tmp_path / "wrong.npy", np.arange(3))
    for name, message in (("wrong.npy", "holds u8,u8 pairs"), ("absent.npy", "not found"), ("list.csv", ".npy")):
        with pytest.raises(UidListError, match=message):
            apply(table, UidListParams(path=str(tmp_path / name)))


def _served_metadata(served_pool, tmp_path, columns) -> tuple[str, pa.Table]:
    """The served demo pool's urls and captions under another schema's column names, plus scores."""
    pool_dir, _ = served_pool
    source = pq.read_table(pool_dir / "source.parquet")
    table = pa.table(columns(source))
    folder = tmp_path / "metadata"
    folder.mkdir()
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), folder / "part-00000.parquet")
    pq.write_table(table.slice(half), folder / "part-00001.parquet")
    return str(folder), table


def _small_run_overrides(tmp_path, path: str) -> list[str]:
    return [
        f"output_dir={tmp_path / 'runs'}",
        f"source.path={path}",
        "ray.dashboard=false",
        "download.image_size=64",
        "download.samples_per_shard=100",
        "download.min_image_size=16",
        "download.thread_count=16",
    ]


@pytest.mark.slow
def test_laion_a_from_laion_metadata_filters_before_download(ray_cluster, served_pool, tmp_path):
    """`laion_a_metadata` on LAION-schema parquets: no column flags, the thresholds run on the
    metadata, only the kept rows are fetched, and every row is accounted for."""
    import numpy as np

    from pipeline.config import load_recipe
    from pipeline.orchestrator import run_pipeline

    rng = np.random.default_rng(1)

    def laion(source: pa.Table) -> dict:
        n = source.num_rows
        return {
            "URL": source.column("url"),
            "TEXT": source.column("caption"),
            "WIDTH": pa.array(np.full(n, 96.0)),
            "HEIGHT": pa.array(np.full(n, 96.0)),
            "similarity": pa.array(rng.uniform(0.2, 0.4, n)),
            "punsafe": pa.array(rng.uniform(0, 1, n).astype(np.float32)),
            "pwatermark": pa.array(rng.uniform(0, 1, n).astype(np.float32)),
            "AESTHETIC_SCORE": pa.array(rng.uniform(3, 7, n).astype(np.float32)),
        }

    path, table = _served_metadata(served_pool, tmp_path, laion)
    overrides = [*_small_run_overrides(tmp_path, path), "subset.samples_per_shard=100"]
    result = run_pipeline(load_recipe("laion_a_metadata", overrides), run_name="laion", log=lambda m: None)
    m = result.manifests
    assert list(m) == ["prefilter", "download", "phash", "dedupe", "subset"]
    for manifest in m.values():
        manifest.check_balance()
    aesthetic = table.column("AESTHETIC_SCORE").to_numpy()
    punsafe = table.column("punsafe").to_numpy()
    assert m["prefilter"].in_count == table.num_rows
    assert m["prefilter"].dropped == {
        "aesthetic_score": int((aesthetic < 5).sum()),  # the first filter that rejects a row names it
        "punsafe": int(((aesthetic >= 5) & (punsafe > 0.5)).sum()),
    }
    assert m["download"].in_count == m["prefilter"].kept == int(((aesthetic >= 5) & (punsafe <= 0.5)).sum())
    wanted = {
        compute_uid(u, c)
        for u, c, a, p in zip(table["URL"].to_pylist(), table["TEXT"].to_pylist(), aesthetic, punsafe, strict=True)
        if a >= 5 and p <= 0.5
    }
    shards = m["download"].outputs["shards_dir"]
    fetched = pa.concat_tables([pq.read_table(p) for p in sorted(Path(shards).glob("*.parquet"))])
    assert set(fetched.column("uid").to_pylist()) == wanted
    assert min(fetched.column("aesthetic_score").to_pylist()) >= 5  # LAION's columns reach the shards
    assert m["subset"].kept == m["dedupe"].kept


@pytest.mark.slow
def test_datacomp_l14_top30_from_metadata_needs_no_embed_stage(ray_cluster, served_pool, tmp_path):
    import numpy as np

    from pipeline.config import load_recipe
    from pipeline.orchestrator import run_pipeline

    def datacomp(source: pa.Table) -> dict:
        n = source.num_rows
        return {
            "uid": [f"{i * 104729:032x}" for i in range(n)],
            "url": source.column("url"),
            "text": source.column("caption"),
            "original_width": pa.array(np.full(n, 96), pa.int64()),
            "original_height": pa.array(np.full(n, 96), pa.int64()),
            "clip_b32_similarity_score": pa.array(np.random.default_rng(2).uniform(0.1, 0.4, n).astype(np.float32)),
            "clip_l14_similarity_score": pa.array(np.random.default_rng(3).uniform(0.1, 0.4, n).astype(np.float32)),
        }

    path, table = _served_metadata(served_pool, tmp_path, datacomp)
    assert load_recipe("datacomp_clip_l14_top30", _small_run_overrides(tmp_path, path)).stages == [
        "prefilter", "download", "train"
    ]  # fmt: skip
    # the curation part: training on the download stage's shards is the tracking-outage test's chain
    overrides = [*_small_run_overrides(tmp_path, path), "stages=[prefilter, download]"]
    result = run_pipeline(load_recipe("datacomp_clip_l14_top30", overrides), run_name="l14", log=lambda m: None)
    m = result.manifests
    assert list(m) == ["prefilter", "download"]
    scores = table.column("clip_l14_similarity_score").to_numpy()
    n_keep = round(0.3 * table.num_rows)
    assert m["prefilter"].kept == m["download"].in_count == n_keep
    # DataComp's own rule (apply_filter.get_threshold): the score at rank 30%, then keep >= it
    threshold = -np.sort(-scores)[n_keep - 1]
    expected = sorted(u for u, s in zip(table["uid"].to_pylist(), scores, strict=True) if s >= threshold)
    listed = np.load(m["prefilter"].outputs["kept_uids"])
    assert listed.tolist() == [(int(u[:16], 16), int(u[16:], 16)) for u in expected]
    shards = Path(m["download"].outputs["shards_dir"])
    fetched = pa.concat_tables([pq.read_table(p) for p in sorted(shards.glob("*.parquet"))])
    assert set(fetched.column("uid").to_pylist()) == set(expected)  # only the kept rows, under DataComp's uids


def test_a_prefilter_that_needs_images_is_refused_in_one_line(tmp_path):
    from pipeline.config import load_recipe
    from pipeline.graph import build_stages

    pq.write_table(_laion(), tmp_path / "part-00000.parquet")
    base = [f"source.path={tmp_path}"]
    for strategy, expected in (
        ("[{name: aesthetic, threshold: 5.0}]", "'image_emb': it is computed after download"),
        ("[{name: dedupe}]", "dedupe needs the images"),
        ("[{name: rank, column: clip_l14_similarity_score, top_fraction: 0.3}]", "no stage gives it"),
    ):
        with pytest.raises(ValueError) as err:
            build_stages(load_recipe("laion_a_metadata", [*base, f"prefilter.strategy={strategy}"]))
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    build_stages(load_recipe("laion_a_metadata", base))  # aesthetic_score and punsafe are LAION's columns


@pytest.mark.slow
def test_datacomp_precomputed_embeddings_feed_the_clip_filters_without_a_model(ray_cluster, served_pool, tmp_path):
    """DataComp's .npz features (beside the first parquet only) as the embed stage's output: the
    clip_score filter ranks by their cosine; samples no .npz covers fail with a reason."""
    import numpy as np

    from pipeline.config import load_recipe
    from pipeline.orchestrator import run_pipeline

    def datacomp(source: pa.Table) -> dict:
        n = source.num_rows
        return {"uid": [f"{i * 7:032x}" for i in range(n)], "url": source.column("url"), "text": source["caption"]}

    path, table = _served_metadata(served_pool, tmp_path, datacomp)
    first = pq.read_table(Path(path) / "part-00000.parquet")
    rng = np.random.default_rng(4)
    image = rng.normal(size=(first.num_rows, 768)).astype(np.float16)
    text = (image + rng.normal(scale=2.0, size=image.shape)).astype(np.float16)
    np.savez(Path(path) / "part-00000.npz", l14_img=image, l14_txt=text, b32_img=image[:, :512], b32_txt=text[:, :512])
    overrides = [
        *_small_run_overrides(tmp_path, path),
        "stages=[download, embed, filter]",
        f"embed.precomputed={path}",
        "filter.strategy=[{name: clip_score, top_fraction: 0.5}]",
    ]
    result = run_pipeline(load_recipe("datacomp_small", overrides), run_name="npz", log=lambda m: None)
    m = result.manifests
    for manifest in m.values():
        manifest.check_balance()
    shards = Path(m["download"].outputs["shards_dir"])
    fetched = pa.concat_tables([pq.read_table(p) for p in sorted(shards.glob("*.parquet"))])
    ok = [u for u, s in zip(fetched["uid"].to_pylist(), fetched["status"].to_pylist(), strict=True) if s == "success"]
    covered = set(first["uid"].to_pylist())
    assert m["embed"].in_count == len(ok) and m["embed"].kept == len([u for u in ok if u in covered])
    assert m["embed"].failed == {"no_precomputed_embedding": len([u for u in ok if u not in covered])}

    def unit(x):
        x = x.astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    cosine = dict(zip(first["uid"].to_pylist(), (unit(image) * unit(text)).sum(axis=1), strict=True))
    ranked = sorted((u for u in ok if u in covered), key=lambda u: (-cosine[u], u))
    decisions = read_decisions(m["filter"].outputs["decisions"])
    kept = {u for u, k in zip(decisions["uid"].to_pylist(), decisions["keep"].to_pylist(), strict=True) if k}
    assert m["filter"].failed == {"not_embedded": len([u for u in ok if u not in covered])}
    assert kept == set(ranked[: len(kept)]) and len(kept) == round(0.5 * len(ranked))


def _laion_head(path: Path) -> Path:
    """A bare state dict with the layout of LAION's predictor (keys layers.0/2/4/6/7)."""
    import torch

    shapes = [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    state = {}
    for index, (out, inp) in zip((0, 2, 4, 6, 7), shapes, strict=True):
        state[f"layers.{index}.weight"] = torch.zeros(out, inp)
        state[f"layers.{index}.bias"] = torch.zeros(out)
    torch.save(state, path)
    return path


def test_laions_predictor_on_a_gelu_vit_l_14_is_refused_in_one_line(tmp_path):
    from pipeline.config import load_recipe
    from pipeline.graph import build_stages

    head = _laion_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    weights = tmp_path / "vit-l-14.safetensors"
    weights.write_bytes(b"checked when the run loads it")
    base = [f"embed.model={weights}", f"filter.strategy.1.head={head}", "source.path=urls.parquet"]
    with pytest.raises(ValueError) as err:
        build_stages(load_recipe("laion_a", [*base, "embed.model_name=ViT-L-14"]))
    assert "ViT-L-14-quickgelu" in str(err.value) and "\n" not in str(err.value)
    build_stages(load_recipe("laion_a", [*base, "embed.model_name=ViT-L-14-quickgelu"]))


@pytest.mark.slow
def test_openai_torchscript_checkpoints_are_refused_then_converted_once(tmp_path):
    """OpenAI ships TorchScript archives; a run never deserialises one. `convert-checkpoint` turns
    one into a model folder with the same weights (here a traced demo-tiny stands in for it)."""
    import subprocess
    import sys

    import torch

    from stages import clip_models

    torch.manual_seed(0)
    model, *_ = clip_models.create("demo-tiny")
    model.eval()
    size = model.visual.image_size
    image = torch.rand(2, 3, *(size if isinstance(size, tuple) else (size, size)))
    torch.jit.save(torch.jit.trace_module(model, {"encode_image": image}, check_trace=False), tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="TorchScript archive .* convert-checkpoint"):
        clip_models.load_checkpoint(tmp_path / "tiny.pt", "demo-tiny")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "convert-checkpoint", str(tmp_path / "tiny.pt"), str(tmp_path / "tiny")]
        + ["--model", "demo-tiny"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    converted, *_ = clip_models.load_model(tmp_path / "tiny")
    with torch.no_grad():
        assert torch.equal(converted.encode_image(image), model.encode_image(image))
