"""`model.init_checkpoint`: start from a backbone-only or full `.pt`, refuse what does not fit."""

from __future__ import annotations

import pytest
import torch

from maxdeeplab.models.config import ModelConfig, variant_overrides
from maxdeeplab.models.network import build_model
from maxdeeplab.platform.errors import ConfigError
from maxdeeplab.platform.training.checkpoint import load_initial_weights


def tiny(num_classes: int = 9):
    cfg = ModelConfig(**{**variant_overrides("max_deeplab_tiny"), "num_classes": num_classes})
    return build_model(cfg)


def test_backbone_only_weights_load_and_the_rest_keeps_its_init(tmp_path):
    torch.manual_seed(0)
    source, target = tiny(), tiny()
    encoder = {k: v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    assert encoder and len(encoder) < len(source.state_dict())
    torch.save(encoder, tmp_path / "backbone.pt")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    assert load_initial_weights(target, tmp_path / "backbone.pt") == len(encoder)
    after = target.state_dict()
    for key, value in after.items():
        expected = encoder[key] if key in encoder else before[key]
        assert torch.equal(value, expected), key


def test_weights_of_another_shape_or_model_are_refused(tmp_path):
    torch.save(tiny(num_classes=20).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"0 unknown and \d+ mis-shaped"):
        load_initial_weights(tiny(), tmp_path / "other.pt")
    torch.save({"no.such.tensor": torch.zeros(1)}, tmp_path / "alien.pt")
    with pytest.raises(ConfigError, match="1 unknown and 0 mis-shaped"):
        load_initial_weights(tiny(), tmp_path / "alien.pt")
    with pytest.raises(ConfigError, match="not found"):
        load_initial_weights(tiny(), tmp_path / "missing.pt")
