"""Helpers shared by test modules in several folders (import as ``scn_helpers``)."""

from __future__ import annotations

import torch


def scale_like_fixtures(model: torch.nn.Module) -> torch.nn.Module:
    """Scale random weights as the official-implementation fixtures were scaled (embeddings x300,
    linear weights x2), so that outputs are O(1) and convention errors visible."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.mul_(300.0)
            elif isinstance(module, torch.nn.Linear):
                module.weight.mul_(2.0)
    return model
