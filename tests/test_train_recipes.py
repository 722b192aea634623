"""Training recipes reach the model and the transform; accumulation is one large batch, micro-batched.

No Ray here: the model and transform a recipe builds, and one backward step, checked directly."""

from __future__ import annotations

import pytest
import torch
from open_clip.loss import ClipLoss

from pipeline.config import ConfigError, load_recipe
from stages import clip_models
from stages.train import Train, TrainConfig
from stages.train.step import backward_step

AUGREG = [
    "train.aug_cfg.scale=[0.33,1.0]",
    "train.aug_cfg.re_prob=0.35",
    "train.aug_cfg.use_timm=true",
    "train.drop_path=0.1",
]


def _built(config: TrainConfig):
    model, transform, _, _ = clip_models.create(
        config.model, aug_cfg=config.aug_cfg.model_dump(), **config.model_overrides()
    )
    return model, transform


def _crop_scale(transform) -> tuple[float, float]:
    return next(tuple(t.scale) for t in transform.transforms if "RandomResizedCrop" in type(t).__name__)


def _erasing(transform) -> float | None:
    return next((t.probability for t in transform.transforms if type(t).__name__ == "RandomErasing"), None)


def _stochastic_depth(model) -> float:
    """The deepest block's drop probability (timm's schedule rises linearly to drop_path)."""
    return max((m.drop_prob for m in model.visual.modules() if type(m).__name__ == "DropPath"), default=0.0)


def test_the_laion_a_convnext_recipe_has_the_model_cards_figures():
    recipe = load_recipe("laion_a_convnext_base_w")
    c = recipe.train
    assert (c.model, c.batch_size, c.samples_seen, c.lr, c.warmup, c.grad_clip) == (
        "convnext_base_w", 81_920, 13_034_626_688, 1e-3, 10_000, 5.0,
    )  # fmt: skip
    assert c.samples_seen == 64 * c.checkpoint_every_samples == 64 * 203_666_042
    assert c.precision == "bf16" and c.grad_checkpointing and c.local_loss and c.gather_with_grad and c.ddp_static_graph
    assert recipe.stages[-1] == "train" and [s.name for s in recipe.filter.strategy] == ["dedupe", "aesthetic"]
    lines = "\n".join(Train(recipe).budget_lines())
    assert "batch 81,920" in lines and "in 64 intervals of 203,666,042" in lines and "A100-hours" in lines
    assert "RandomResizedCrop scale (0.9, 1.0)" in lines and "random erasing" not in lines
    augreg = "\n".join(Train(load_recipe("laion_a_convnext_base_w_320", AUGREG)).budget_lines())
    assert "scale (0.33, 1.0), random erasing 0.35, stochastic depth 0.1" in augreg
    assert load_recipe("laion_a_convnext_base_w_320").download.image_size == 320


def test_the_augreg_settings_reach_the_transform_and_the_image_tower():
    """The recipe's train section, on a ConvNeXt small enough for a CPU (timm's convnext_atto)."""
    small = ["train.model=demo-tiny-convnext", "train.force_image_size=48"]
    plain = load_recipe("laion_a_convnext_base_w", small).train
    model, transform = _built(plain)
    assert _crop_scale(transform) == (0.9, 1.0) and _erasing(transform) is None
    assert _stochastic_depth(model) == 0.0  # the card's non-augreg models: none, though the config says 0.1
    assert model.visual.image_size == (48, 48)
    augreg = load_recipe("laion_a_convnext_base_w", [*small, *AUGREG]).train
    model, transform = _built(augreg)
    assert _crop_scale(transform) == (0.33, 1.0) and _erasing(transform) == pytest.approx(0.35)
    assert _stochastic_depth(model) == pytest.approx(0.1)


def test_settings_open_clip_would_ignore_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="set use_timm: true"):
        load_recipe("laion_a_convnext_base_w", ["train.aug_cfg.re_prob=0.35"])
    with pytest.raises(ValueError, match="has no stochastic depth"):
        Train(load_recipe("demo", ["train.drop_path=0.1", "train.zeroshot_frequency=0"])).check([])


def test_a_batch_that_does_not_divide_runs_rounded_down_and_says_so():
    config = TrainConfig(batch_size=81_920, workers=3, accum_freq=2, samples_seen=10**9)
    assert config.micro_batch == 13_653 and config.step_batch == 81_918
    assert config.total_steps == 10**9 // 81_918
    assert config.batch_note() == "3 worker(s) x 2 micro-batch(es) of 13,653; 2 of batch 81,920 unused per step"
    with pytest.raises(ValueError, match="smaller than train.workers x train.accum_freq"):
        TrainConfig(batch_size=4, workers=3, accum_freq=2)


def _gradients(model, accum_freq: int, images, texts) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    backward_step(model, ClipLoss(), images, texts, accum_freq)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_accumulated_gradients_equal_one_large_batch():
    torch.manual_seed(0)
    model, _, _, tokenizer = clip_models.create("demo-tiny")
    images = torch.randn(32, 3, 64, 64)
    texts = tokenizer([f"a photo of thing {i % 7} number {i}" for i in range(32)])
    whole = _gradients(model, 1, images, texts)
    accumulated = _gradients(model, 4, images, texts)
    assert whole.keys() == accumulated.keys() and "logit_scale" in whole
    for name, grad in whole.items():
        assert torch.allclose(accumulated[name], grad, rtol=1e-4, atol=1e-6), name
    # the contrastive loss needs the whole batch: four separate small batches are not the same thing
    model.zero_grad(set_to_none=True)
    for chunk_images, chunk_texts in zip(images.chunk(4), texts.chunk(4), strict=True):
        backward_step(model, ClipLoss(), chunk_images, chunk_texts)
    separate = model.visual.conv1.weight.grad
    assert not torch.allclose(separate / 4, whole["visual.conv1.weight"], rtol=1e-2, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be split into 64 micro-batches"):
        backward_step(model, ClipLoss(), images, texts, 64)
