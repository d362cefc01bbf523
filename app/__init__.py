"""The service around `harmonica_core`: the FastAPI gateway (`main`, `api/`), the torch-free contract it shares
with the workers (`contract/`), and the local launcher (`run`, `embedded_redis`, `logs`)."""
