"""What the gateway and the workers share, torch-free: settings, the job kinds, job records, the Celery app,
the router registry, metric definitions and the reconciler. Workers import this package (and `app.logs`),
never `app.api`."""
