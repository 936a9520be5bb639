"""Layer 8, the command line: ``moe-unfuse`` and its commands (each one module in ``commands``)."""
