"""The data layer: the only code that knows the layout of a workspace's `data/` folder.

`layout` names every path; `manifest`, `embeddings`, `index` and `pairs` read (and check) what
the steps wrote; `tables` reads any stored Parquet output checked against its schema; `catalog`
is the DuckDB catalogue over them; `outputs` checks that no output overwrites what cbir does not
own. Steps read and write through it; it imports kernels, never a step.
"""
