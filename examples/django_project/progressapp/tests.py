"""Run with a worker started from this directory (``itask worker -A proj``), then
``python manage.py test progressapp``."""

import time

from django.test import SimpleTestCase
from proj.celery import app


class CrunchTests(SimpleTestCase):
    def test_the_task_is_discovered_from_installed_apps(self) -> None:
        app.finalize()
        self.assertIn("progressapp.tasks.crunch", app.tasks)

    def test_the_view_starts_the_task_and_shows_its_progress(self) -> None:
        response = self.client.post("/crunch/", {"steps": "20"})
        self.assertEqual(response.status_code, 302)
        url = response["Location"]
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            data = self.client.get(url, {"format": "json"}).json()
            if data["current"] is not None:
                seen.append(data["current"])
            if data["state"] == "succeeded":
                break
            time.sleep(0.1)
        self.assertEqual(data["state"], "succeeded")
        self.assertEqual((data["current"], data["total"], data["result"]), (20, 20, 20))
        self.assertTrue(any(0 < current < 20 for current in seen), seen)
        page = self.client.get(url)
        self.assertContains(page, "succeeded: 20 / 20 step 20 of 20")
