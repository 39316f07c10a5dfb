from django.urls import path

from . import views

urlpatterns = [
    path("crunch/", views.start, name="start"),
    path("crunch/<str:task_id>/", views.progress, name="progress"),
]
