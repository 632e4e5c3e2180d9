"""richpref's Prefect flows, thin compositions of the library's stages and steps.

prefect.yaml names them by entrypoint (`flows/curate.py:curate`), and `richpref` starts them by the
same entrypoints (`richpref.ops.entrypoints.load_flow`). The library never imports this package.
"""
