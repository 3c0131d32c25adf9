"""What a world gives the protocol, and the registry that finds it by name.

A world (digits, scenes) is one ``World`` value in its own package; the protocol finds
it by the dotted path in ``WORLDS``, so this package never imports a world (imports
point down: the worlds' experiments use the protocol, not the reverse). Adding a world
is one line here and one ``World`` there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from hypersd_core.protocol.runner import RunSpec

WORLDS: dict[str, str] = {
    "digits": "hypersd_core.digits.protocol:WORLD",
    "scenes": "hypersd_core.scenes.protocol:WORLD",
}


@dataclass(frozen=True)
class World:
    """A world's pieces of the protocol.

    Attributes:
        name: the ``--world`` argument.
        runs: the run graph (rows, presets, parents, ablations) in priority order.
        shipped: the main runs a finished protocol exports as the world's adapters.
        eval_main: "module:function" of the world's evaluation command (argv -> exit code):
            generates every row and measures it (the world's eval measures).
        report_main: "module:function" of its report command (tables with intervals,
            the budget table, who leads with Holm's correction).
        ship: exports a finished root's shipped runs (None: the world ships nothing yet).
        pack: packs a root's records and adapters into a tar.gz (None: no pack step).
    """

    name: str
    runs: Callable[[], list[RunSpec]]
    shipped: tuple[str, ...]
    eval_main: str
    report_main: str
    ship: Callable | None = None
    pack: Callable | None = None

    def __post_init__(self):
        for field_name in ("eval_main", "report_main"):
            if ":" not in getattr(self, field_name):
                raise ValueError(f"World.{field_name} must be 'module:function', got "
                                 f"{getattr(self, field_name)!r}")


def resolve(path: str):
    module, attr = path.split(":", 1)
    return getattr(importlib.import_module(module), attr)


def load_world(name: str) -> World:
    """The registered world ``name``; one clear error for an unknown or missing one."""
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; known: {', '.join(sorted(WORLDS))}")
    try:
        world = resolve(WORLDS[name])
    except (ImportError, AttributeError) as err:
        raise ValueError(f"world {name!r} is registered as {WORLDS[name]} but does not load "
                         f"({type(err).__name__}: {err})") from None
    if not isinstance(world, World):
        raise ValueError(f"{WORLDS[name]} is not a protocol World")
    return world
