"""Read-only views of a run: duckdb inspect, HTML report, dataset card, plots."""
