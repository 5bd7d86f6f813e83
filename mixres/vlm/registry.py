"""The VLM's part tables: encoders, adapters, strategies, decoder blocks.

Each part registers itself with a decorator next to its definition, so adding an
adapter or a strategy is one new class and no edit elsewhere (no isinstance ladders).
All are `mixres.registry.Registry`, the one registry type of mixres.
"""

from __future__ import annotations

from mixres.registry import Registry

__all__ = ["Registry", "ENCODERS", "ADAPTERS", "STRATEGIES", "BLOCKS", "register_encoder",
           "register_adapter", "register_strategy", "register_block"]

ENCODERS = Registry("VLM encoder")
ADAPTERS = Registry("adapter")
STRATEGIES = Registry("strategy")
BLOCKS = Registry("decoder block")

register_encoder = ENCODERS.register
register_adapter = ADAPTERS.register
register_strategy = STRATEGIES.register
register_block = BLOCKS.register
