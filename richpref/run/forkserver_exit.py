"""Imported last by the forkserver of a local cluster (richpref/run/early_cluster.py): that process
then freezes its objects at exit, as a model worker does (`freeze_at_exit`), instead of walking what
torch, transformers and diffusers left: its exit, which the command waits for, took 1.5 s and now
takes 0.2 s (docs/benchmarks.md)."""
from richpref.models.runtime import freeze_at_exit

freeze_at_exit()
