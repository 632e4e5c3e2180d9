"""The shard runner (keys, manifests, leases, commits), its plan, and the Prefect/Dask orchestration around it."""
