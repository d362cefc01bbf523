"""The HTTP gateway (FastAPI) and the torch-free contract it shares with the workers: settings, job
records, queue configuration, router registry and metric definitions."""
