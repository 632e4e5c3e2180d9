"""Processes richpref owns for the user: the Prefect server and API, work pools, flow entrypoints."""
