"""Layer 7, tools over the pipeline: golden tests, audits, spec drafting, and the README's tables."""
