"""The url table read in chunks by tasks gives the same download parts as the whole table read at once."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.source_parts import piece_rows, plan_source, source_chunks
from stages.source_table import SourceTableError, load_source


def _urls(prefix: str, n: int) -> list[str]:
    return [f"http://127.0.0.1:9/{prefix}/{i}.jpg" for i in range(n)]


@pytest.fixture
def table_folder(tmp_path):
    """Three files in name order: a parquet of several row groups, a csv, a jsonl; rows repeat within
    a file and across files (the first must win), and captions hold unicode."""
    folder = tmp_path / "table"
    folder.mkdir()
    urls = _urls("a", 23)
    first = pa.table(
        {
            "url": [*urls, urls[3], urls[20]],
            "caption": [f"a cat {i} 🐈" for i in range(23)] + ["a cat 3 🐈", "a cat 20 🐈"],
            "punsafe": [i / 100 for i in range(25)],
        }
    )
    pq.write_table(first, folder / "0.parquet", row_group_size=4)  # seven row groups
    more = _urls("b", 5)
    (folder / "1.csv").write_text(
        "url,caption,punsafe\n"
        + "".join(f"{u},dog {i},0.5\n" for i, u in enumerate(more))
        + f"{urls[0]},a cat 0 🐈,0.1\n"
    )
    (folder / "2.jsonl").write_text(
        "".join(f'{{"url": "{u}", "caption": "bird {i}", "punsafe": 0.2}}\n' for i, u in enumerate(_urls("c", 4)))
        + f'{{"url": "{more[1]}", "caption": "dog 1", "punsafe": 0.5}}\n'
    )
    return folder


def _whole_table_parts(path: str, rows_per_part: int) -> tuple[int, list[list[str]]]:
    """The oracle: the whole table read at once, the first row of each uid kept, cut in order."""
    table = load_source(path)
    seen: set[str] = set()
    uids = []
    for uid in table.column("uid").to_pylist():
        if uid not in seen:
            uids.append(uid)
        seen.add(uid)
    return table.num_rows - len(uids), [uids[i : i + rows_per_part] for i in range(0, len(uids), rows_per_part)]


def test_chunks_in_tasks_give_the_parts_of_the_whole_table(table_folder, tmp_path):
    chunks = source_chunks(str(table_folder), rows_per_chunk=7)
    assert [(c.path.rsplit("/", 1)[1], c.row_groups) for c in chunks] == [
        ("0.parquet", (0,)),  # groups of 4 rows: 4 + 4 > 7
        ("0.parquet", (1,)),
        ("0.parquet", (2,)),
        ("0.parquet", (3,)),
        ("0.parquet", (4,)),
        ("0.parquet", (5, 6)),  # the last group holds 1 row
        ("1.csv", None),
        ("2.jsonl", None),
    ]
    duplicates, expected = _whole_table_parts(str(table_folder), 6)
    assert duplicates == 4
    plan = plan_source(str(table_folder), "auto", None, None, tmp_path / "work", 6, rows_per_chunk=7)
    assert (plan.n_in, plan.duplicate_rows) == (36, 4)
    assert plan.columns == ("uid", "url", "caption", "punsafe")
    parts = [piece_rows(plan.work_dir, pieces, plan.columns) for pieces in plan.parts]
    assert [p.column("uid").to_pylist() for p in parts] == expected
    assert parts[0].column("caption")[0].as_py() == "a cat 0 🐈"
    assert pa.concat_tables(parts).column("punsafe").null_count == 0


def test_the_same_parts_with_the_chunks_read_as_ray_tasks(ray_cluster, table_folder, tmp_path):
    from pipeline.executor import make_ray_map

    _, expected = _whole_table_parts(str(table_folder), 5)
    plan = plan_source(str(table_folder), "auto", None, None, tmp_path / "work", 5, make_ray_map(), rows_per_chunk=3)
    assert [piece_rows(plan.work_dir, p, plan.columns).column("uid").to_pylist() for p in plan.parts] == expected


def test_a_chunk_that_cannot_be_used_stops_the_plan_in_one_line_and_leaves_nothing(table_folder, tmp_path):
    (table_folder / "3.csv").write_text("link,caption\nhttp://x/1.jpg,one\n")
    with pytest.raises(SourceTableError) as err:
        plan_source(str(table_folder), "auto", None, None, tmp_path / "work", 5)
    assert "3.csv: missing column 'url'" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "work").exists()
    (table_folder / "3.csv").write_text("url,caption,punsafe\nhttp://x/1.jpg,one,high\n")
    with pytest.raises(SourceTableError, match="tables do not share a schema"):
        plan_source(str(table_folder), "auto", None, None, tmp_path / "work", 5)


def test_a_table_whose_first_file_has_its_own_uids_needs_them_in_every_file(tmp_path):
    """DataComp's layout is read from the first file; a later file without uids is refused, not given
    derived ones."""
    folder = tmp_path / "datacomp"
    folder.mkdir()
    pq.write_table(
        pa.table({"uid": ["a" * 32], "url": ["http://x/1.jpg"], "text": ["one two three"]}), folder / "0.parquet"
    )
    pq.write_table(pa.table({"url": ["http://x/2.jpg"], "text": ["four five six"]}), folder / "1.parquet")
    with pytest.raises(SourceTableError, match="1.parquet: missing column 'uid'"):
        plan_source(str(folder), "auto", None, None, tmp_path / "work", 5)
