"""Data stage: a user's images become a seeded train/val/test split of decodable samples.

Takes a data source (class folders, train/val/test folders, a path,label CSV, builtin:digits).
Gives a `DataSplit` (pipeline.core.samples), found by `sources` and drawn by `split`, and images
decoded and preprocessed for a model's input (`images`). The data check's record and its
file-only checks are `check`, the facts it reads of every file (hash, size, colour, thumbnail) `facts`.
"""
