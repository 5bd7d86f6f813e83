"""The VLM's part tables: vision towers, adapters, strategies, decoder blocks.

Each part registers itself with a decorator next to its definition, so adding an
adapter or a strategy is one new class and no edit elsewhere (no isinstance ladders).
All are `mixres.registry.Registry`, the one registry type of mixres.
"""

from __future__ import annotations

from mixres.registry import Registry

__all__ = ["Registry", "TOWERS", "ADAPTERS", "STRATEGIES", "BLOCKS", "register_tower",
           "register_adapter", "register_strategy", "register_block"]

TOWERS = Registry("vision tower")
ADAPTERS = Registry("adapter")
STRATEGIES = Registry("strategy")
BLOCKS = Registry("decoder block")

register_tower = TOWERS.register
register_adapter = ADAPTERS.register
register_strategy = STRATEGIES.register
register_block = BLOCKS.register
