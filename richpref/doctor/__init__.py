"""`richpref doctor`: offline checks of models and pipelines, and a measured projection of a run's cost."""
