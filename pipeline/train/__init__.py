"""Training stage: an adapted model and a split in, the best weights and their history out.

`loop` is the epoch loop (torch); `fastpath` runs a frozen backbone once through onnxruntime and
trains on cached features (`features`); `solve` fits a linear head in closed form; `auto` chooses a
strategy by measuring; `rank` compares models by the same probe. The data check's feature half:
`twins` (near duplicates), `label_issues` (likely label errors), `check` (all of it into a
`DataCheck`), `grouping` (duplicates kept in one part of a split), `balance` (unequal classes).
"""
