"""Data stage: a user's images become a seeded train/val/test split of decodable samples.

Takes a data source (class folders, train/val/test folders, a path,label CSV, builtin:digits).
Gives a `DataSplit` (pipeline.core.samples), found by `sources` and drawn by `split`, and images
decoded and preprocessed for a model's input (`images`).
"""
