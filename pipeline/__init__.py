"""Pipeline: the jobs that join the stages (train, evaluate, batch candidates) and the CLI."""
