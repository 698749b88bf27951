"""The field's vocabulary: MANO layer, cameras, rotations, the rasterizer, the sample schema, dataset readers.

Importing this package loads nothing and writes nothing; submodules are imported where they are used.
"""
