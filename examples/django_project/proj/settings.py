"""Settings of the example project: Django's, and the task queue's under ``CELERY_``."""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = True
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
INSTALLED_APPS = ["progressapp"]
ROOT_URLCONF = "proj.urls"
DATABASES: dict = {}  # the example keeps nothing in a database
USE_TZ = True
TIME_ZONE = "UTC"

# The task queue, read by proj/celery.py through config_from_object(namespace="CELERY").
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_NAMESPACE = os.environ.get("CELERY_NAMESPACE", "django-example")
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {"progressapp.tasks.*": {"queue": "default"}}
CELERY_RESULT_EXPIRES = 3600
