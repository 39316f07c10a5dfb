"""The example Django project. Importing it loads the task app, as in Celery's layout, so
``@shared_task`` functions bind to it."""

from .celery import app as celery_app

__all__ = ["celery_app"]
