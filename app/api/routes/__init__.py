"""One `APIRouter` per resource; `app.main` includes them in this order: generate, train, jobs, routers, models,
health."""
