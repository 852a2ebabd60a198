"""megafleet: a large-scale VM fleet orchestrator and emulation testbed."""

__version__ = "0.1.0"
