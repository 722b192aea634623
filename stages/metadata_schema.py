"""The published metadata tables users start from, recognised by their columns.

A url/caption table may be LAION's or DataComp's metadata exactly as it ships. Each known schema
says which columns hold the url and the caption, whether the table has its own `uid` (DataComp's
is kept, so official uid lists apply), and which metadata columns are carried to the per-uid
table, under stable lower-case names that never clash with the columns img2dataset writes
(`width`, `original_width`, `sha256`, ...). Filters reach them like any score, e.g.
`{name: rank, column: clip_l14_similarity_score, top_fraction: 0.3}`.

Sources of the column names (checked against the anchors' code and docs):
- LAION-400M / LAION-5B release parquets (`SAMPLE_ID, URL, TEXT, HEIGHT, WIDTH, LICENSE,
  [LANGUAGE], NSFW, similarity`): LAION's LAION-5B release post ("Dataset columns") and
  img2dataset's `dataset_examples/laion400m.md` / `laion5B.md` (`--url_col URL --caption_col TEXT`).
- The "-joined" LAION-2B collections add `hash` (mmh3 of URL+TEXT), `pwatermark` and `punsafe`:
  rom1504/laion-prepro `laion5B/watermark/big_join.py`; img2dataset's `laion-aesthetic.md` saves
  `similarity, hash, punsafe, pwatermark, aesthetic`.
- LAION-Aesthetics: V1 sets (laion2B-en-aesthetic, laion-art) name the score `aesthetic`; the V2
  "improved_aesthetics_*plus" parquets name it `AESTHETIC_SCORE` (float32) and add a pandas
  `__index_level_0__`.
- LAION's embedding-folder metadata (`metadata_N.parquet`) uses lower-case `url`/`caption`: plain.
- DataComp CommonPool: mlfoundations/datacomp `download_upstream.py` (img2dataset with
  `url_col="url"`, `caption_col="text"`, `bbox_col="face_bboxes"`, `save_additional_columns=["uid"]`)
  and its README; the pool's parquet holds `uid` (32 hex digits), `url`, `text`, `original_width`,
  `original_height` (int64), `clip_b32_similarity_score`, `clip_l14_similarity_score` (float32),
  `face_bboxes` (list of boxes) and `sha256`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SchemaName = Literal["auto", "laion", "datacomp", "plain", "normalised"]

# what img2dataset (or our writer) puts in every shard parquet: metadata must not take these names
RESERVED = {"uid", "url", "caption", "key", "status", "error_message", "width", "height", "reason"}
RESERVED |= {"original_width", "original_height", "exif", "sha256", "md5", "sha512"}


@dataclass(frozen=True)
class MetadataSchema:
    """How one published table maps onto the pipeline's columns."""

    name: str
    url: str
    caption: str
    uid: str | None = None  # the table's own uid column, kept as the sample's uid
    carried: dict[str, str] = field(default_factory=dict)  # metadata column -> per-uid table column
    signature: tuple[str, ...] = ()  # columns that identify the schema when present together

    def carried_names(self, present: list[str]) -> dict[str, str]:
        """Every other column of the table -> its name in the per-uid table.

        The schema's own names first; any other column keeps its name in lower case. A name that
        img2dataset (or an earlier column) already uses gets a `source_` prefix instead."""
        own = {self.url, self.caption, self.uid}
        names: dict[str, str] = {}
        for column in present:
            if column in own or column.startswith("__index_level_"):  # pandas' saved index
                continue
            new = self.carried.get(column, column.lower())
            if new in RESERVED or new in names.values():
                new = f"source_{column.lower()}"
            if new in RESERVED or new in names.values():
                raise ValueError(f"metadata columns '{column}' and another both map to '{new}'; rename one")
            names[column] = new
        return names


LAION = MetadataSchema(
    name="laion",
    url="URL",
    caption="TEXT",
    carried={
        "SAMPLE_ID": "laion_sample_id",
        "WIDTH": "source_width",
        "HEIGHT": "source_height",
        "similarity": "similarity",  # CLIP image-text cosine (ViT-B/32 for the English sets)
        "hash": "laion_hash",
        "punsafe": "punsafe",
        "pwatermark": "pwatermark",
        "LANGUAGE": "language",
        "LICENSE": "license",
        "NSFW": "nsfw_tag",  # LAION-400M's UNLIKELY/UNSURE/NSFW tag
        "aesthetic": "aesthetic_score",  # laion2B-en-aesthetic
        "AESTHETIC_SCORE": "aesthetic_score",  # improved aesthetics 5+/6+/6.5+
    },
    signature=("URL", "TEXT"),
)

DATACOMP = MetadataSchema(
    name="datacomp",
    url="url",
    caption="text",
    uid="uid",
    carried={
        "original_width": "source_width",
        "original_height": "source_height",
        "clip_b32_similarity_score": "clip_b32_similarity_score",
        "clip_l14_similarity_score": "clip_l14_similarity_score",
        "face_bboxes": "face_bboxes",
        "sha256": "source_sha256",
    },
    signature=("uid", "url", "text"),
)

PLAIN = MetadataSchema(name="plain", url="url", caption="caption")
# a table this pipeline wrote (the prefilter's kept rows): uids kept, columns already stable
NORMALISED = MetadataSchema(name="normalised", url="url", caption="caption", uid="uid")

KNOWN = {schema.name: schema for schema in (LAION, DATACOMP, PLAIN, NORMALISED)}


def detect(columns: list[str]) -> MetadataSchema:
    """The known schema whose signature columns the table has; plain url/caption otherwise."""
    for schema in (DATACOMP, LAION):
        if all(name in columns for name in schema.signature):
            return schema
    return PLAIN


def resolve(
    columns: list[str], schema: SchemaName = "auto", url_col: str | None = None, caption_col: str | None = None
) -> MetadataSchema:
    """The schema to read a table with: named or detected, with explicit url/caption columns winning."""
    base = detect(columns) if schema == "auto" else KNOWN[schema]
    if url_col is None and caption_col is None:
        return base
    return MetadataSchema(
        name=base.name,
        url=url_col or base.url,
        caption=caption_col or base.caption,
        uid=base.uid,
        carried=base.carried,
        signature=base.signature,
    )
