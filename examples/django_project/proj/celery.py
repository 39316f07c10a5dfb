"""The project's task app, set up the way a Celery project's ``proj/celery.py`` is.

Run a worker from this directory with ``itask worker -A proj``.
"""

import os

from interactive_tasks import App

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = App("proj")
# Every setting whose name starts with CELERY_ in settings.py, Celery's way.
app.config_from_object("django.conf:settings", namespace="CELERY")
# <app>.tasks of every app in INSTALLED_APPS, imported when the tasks are first needed.
app.autodiscover_tasks()
