"""Layer 4, the unfusing core: the plan a spec makes for a module, the per-expert views, offload,
coverage, drift, unfusing in place and registration with a quantizer backend.

Not named ``unfuse``: a subpackage of that name would replace the public function
``moe_unfuse.unfuse`` on the package the moment it is imported.
"""
