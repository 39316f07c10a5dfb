from django.urls import include, path

urlpatterns = [path("", include("progressapp.urls"))]
