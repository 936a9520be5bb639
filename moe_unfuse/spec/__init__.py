"""Layer 3, specs: reading, merging and validating spec files, the shape-expression language, and
the catalog of every spec the plugins register. Imports only the layers below.
"""
