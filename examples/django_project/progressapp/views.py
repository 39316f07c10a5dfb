"""Start an interactive task, then show its progress (HTML, or JSON with ?format=json)."""

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect
from django.utils.html import format_html
from django.views.decorators.http import require_GET, require_POST
from proj.celery import app

from .tasks import crunch


@require_POST
def start(request: HttpRequest) -> HttpResponse:
    steps = int(request.POST.get("steps", "20"))
    handle = crunch.start(steps)
    return redirect("progress", task_id=handle.id)


@require_GET
def progress(request: HttpRequest, task_id: str) -> HttpResponse:
    snapshot = app.attach(task_id).snapshot()
    event = snapshot.progress
    data = {
        "id": task_id,
        "state": snapshot.state.value,
        "current": event.current if event else None,
        "total": event.total if event else None,
        "message": event.message if event else None,
        "result": snapshot.result,
    }
    if request.GET.get("format") == "json":
        return JsonResponse(data)
    refresh = "" if snapshot.state.value in ("succeeded", "failed", "cancelled", "revoked") \
        else '<meta http-equiv="refresh" content="1">'
    return HttpResponse(format_html(
        "<!doctype html><html><head>{}<title>crunch {}</title></head><body>"
        "<h1>crunch {}</h1><p>{}: {} / {} {}</p></body></html>",
        format_html(refresh) if refresh else "", task_id, task_id, data["state"],
        data["current"] or 0, data["total"] or "?", data["message"] or ""))
