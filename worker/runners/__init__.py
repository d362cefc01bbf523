"""One module per job kind (named by `JobKind.runner`): `run(job, settings, report)` and `CANCELLED`, the
exception its `report` raises to stop it. Imported in pool children only: this is where torch runs."""
