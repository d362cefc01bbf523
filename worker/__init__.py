"""Celery workers that run generation and router training with `harmonica_core`."""
