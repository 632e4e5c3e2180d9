"""Work made of several flows or stages: RPO rounds, relabelling a Pick-a-Pic dataset."""
