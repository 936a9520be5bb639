"""The built-in ``moe-unfuse`` commands, one module each."""
