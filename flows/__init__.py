"""Prefect flows: the pipeline composed from the tasks in `tasks/`."""
