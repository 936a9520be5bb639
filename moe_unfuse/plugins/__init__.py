"""Layer 2, plugins: the hook specifications and the plugin manager that fills the registry.

Imports only :mod:`moe_unfuse.base`. The manager loads the default plugins by name on first use
(the one declared exception to the layer order, ``tests/test_architecture.py``).
"""
