"""The HTTP gateway's own code: dependencies, errors, the body limit, API keys, request and response bodies,
submission and one router per resource (`routes/`). Only `app.main` imports it; workers never do."""
