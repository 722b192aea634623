"""Every stage the pipeline knows, in pipeline order: adding a stage is one module + one entry here.

The order is the order a recipe lists them in; the orchestrator derives the wiring (which stage
feeds which) from each stage's declared `Inputs`, never from this list's positions.
"""

from __future__ import annotations

from stages.dedupe import Dedupe
from stages.demo_pool import DemoPool
from stages.download import Download
from stages.embed import Embed
from stages.evaluate import Evaluate
from stages.filter import Filter
from stages.heads import Heads
from stages.phash import Phash
from stages.prefilter import Prefilter
from stages.seed_models import SeedModels
from stages.subset import Subset
from stages.train import Train

STAGES = [DemoPool, Prefilter, Download, Phash, Dedupe, SeedModels, Embed, Heads, Filter, Subset, Train, Evaluate]

# What a recipe gets when it names no source or stages: the self-contained demo.
DEFAULT_SOURCE = DemoPool.source_kind
DEFAULT_STAGES = [DemoPool.name, Download.name, Phash.name, Dedupe.name, Subset.name, Train.name, Evaluate.name]
