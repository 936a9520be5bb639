"""Layer 1, the base: errors, options, versions, the kind protocols, layout ops and host memory.

Imports nothing from the rest of the package; everything else may import it.
"""
