"""Imported last by the forkserver of a local cluster (richpref/run/early_cluster.py). That process
moves what its imports made (torch, transformers, diffusers, Prefect, Dask) to the garbage collector's
permanent generation now, so that the workers it forks start with it frozen: a worker's first model
load then skips the full collection over those objects that `freeze_loaded_modules` makes (about 1 s
of a worker's CPU before its first model here, eight workers at once; docs/benchmarks.md), and no
collection in a worker writes to those shared pages. It also freezes what is left at its exit
(`freeze_at_exit`) instead of walking it: its exit, which the command waits for, took 1.5 s and now
takes 0.2 s."""
import gc

from richpref.models.runtime import freeze_at_exit

gc.collect()
gc.freeze()
freeze_at_exit()
