from django.apps import AppConfig


class ProgressAppConfig(AppConfig):
    name = "progressapp"
