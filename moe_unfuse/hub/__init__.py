"""Layer 5, the hub checkpoint: tensor naming, checkpoint reading and writing, the quantization
policy, the export contract and its engine rules, loading, and tiny models built from configs.
"""
