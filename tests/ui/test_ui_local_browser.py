"""The UI against a real local run, in a real headless Chromium.

The run is trained and rendered by `tinv run` (tiny model, conftest.local_run); its concept token,
initializer, validation prompts, grid prompts and negative prompt are hostile HTML. The pages must
show them as text and run none of them, load nothing from outside the UI server, draw as many loss
points as TensorBoard holds, list every checkpoint with working downloads, show every grid image.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
import yaml

from uikit import (
    CHECKPOINT_EVERY, GRID_NAME, HOSTILE_TEXT, HOSTILE_TOKEN, JOB_NAME, STEPS, Page, assert_local_only, browser, job_doc,
    needs_chromium, serve,
)

pytestmark = [pytest.mark.slow, needs_chromium]


@pytest.fixture(scope="module")
def site(local_run):
    from tinv.ui.sources import LocalSource

    source = LocalSource(local_run["root"], [str(local_run["job_file"]), str(local_run["grid_file"])])
    with serve(source) as base, browser() as b:
        yield {"base": base, "browser": b, **local_run}


@pytest.fixture
def page(site, tmp_path):
    p = Page(site["browser"], site["base"], tmp_path)
    yield p
    assert not p.dialogs, f"a dialog opened: {p.dialogs}"
    assert p.pwned() == [], "hostile input ran as script"
    assert_local_only(p.requests, site["base"])
    assert not p.errors, f"console errors: {p.errors}"
    p.close()


def _assert_escaped(page: Page) -> None:
    """The hostile strings are on the page as text, and none became an element."""
    body = page.page.inner_text("body")
    assert HOSTILE_TOKEN in body or HOSTILE_TEXT in body
    assert page.page.locator("img[onerror], img[src='x']").count() == 0
    assert page.page.evaluate("[...document.scripts].filter(s => !s.src && s.type !== 'application/json').length") == 0
    assert page.pwned() == []


def test_runs_list_shows_both_runs_and_filters_sorts_and_updates_live(site, page):
    page.goto("/")
    rows = page.page.locator("#runs-table tbody tr")
    assert rows.count() == 2
    job_row = page.page.locator(f"tr[data-name='{JOB_NAME}']")
    assert job_row.get_attribute("data-phase") == "Succeeded"
    assert f"{STEPS}/{STEPS}" in job_row.inner_text()
    progress = json.loads((site["job_root"] / "progress.json").read_text())
    assert progress["latest_checkpoint"]["uuid"][:8] in job_row.inner_text()

    page.page.fill("input[name=q]", "grid")
    page.wait_js("document.querySelectorAll('#runs-table tbody tr').length === 1")
    assert page.page.locator("#runs-table tbody tr").get_attribute("data-name") == GRID_NAME
    page.page.fill("input[name=q]", "")
    page.page.select_option("select[name=kind]", "job")
    page.wait_js(f"document.querySelector('#runs-table tbody tr').dataset.name === '{JOB_NAME}' && document.querySelectorAll('#runs-table tbody tr').length === 1")
    page.page.select_option("select[name=kind]", "")
    page.page.click("a.sort[data-sort=name]")
    page.wait_js("document.querySelectorAll('#runs-table tbody tr').length === 2 && document.querySelector('a.sort.active').dataset.sort === 'name'")
    names = page.page.eval_on_selector_all("#runs-table tbody tr", "rs => rs.map(r => r.dataset.name)")
    assert names == sorted(names)

    # a new run appears without a reload: write its progress.json the way the trainer does
    fresh = site["root"] / "default" / "ui-live-job-local"
    fresh.mkdir(parents=True)
    (fresh / "progress.json").write_text(json.dumps({"state": "running", "step": 3, "total_steps": 10, "summary": "3/10 (30%)", "job": {"name": "ui-live-job"}}))
    try:
        page.page.wait_for_selector("tr[data-name='ui-live-job'][data-phase='Running']", timeout=10000)
        assert "3/10" in page.page.locator("tr[data-name='ui-live-job']").inner_text()
        page.screenshot("ui-runs")
    finally:
        (fresh / "progress.json").unlink()
        fresh.rmdir()


def test_job_page_curves_checkpoints_downloads_and_snippet(site, page):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tinv.api.storage import Store, list_checkpoints
    from tinv.api.validation import validate_document

    resp = page.goto(f"/jobs/default/{JOB_NAME}")
    assert resp.status == 200
    page.wait_js("document.getElementById('loss-chart').data !== undefined")

    acc = EventAccumulator(str(site["job_root"] / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    reported = acc.Scalars("train/loss")
    assert page.page.is_visible("#loss-chart") and not page.page.is_visible("#no-scalars")
    drawn = page.page.evaluate("document.getElementById('loss-chart').data[0].x")
    assert len(drawn) == len(reported) == STEPS and drawn == [e.step for e in reported]
    assert page.page.evaluate("document.getElementById('loss-chart').data.length") == 2, "raw and smoothed loss"
    page.page.fill("#smoothing", "0")  # no smoothing: only the raw curve
    page.page.dispatch_event("#smoothing", "input")
    assert page.page.evaluate("document.getElementById('loss-chart').data.length") == 1
    assert len(page.page.evaluate("document.getElementById('lr-chart').data[0].x")) == len(acc.Scalars("train/learning_rate"))

    kept = list_checkpoints(Store(), str(site["job_root"]))
    table = page.page.eval_on_selector_all("table.ckpts tbody tr", "rs => rs.map(r => [r.dataset.uuid, Number(r.dataset.step)])")
    assert table == [[c["uuid"], c["step"]] for c in reversed(kept)] and [c["step"] for c in kept] == [STEPS - CHECKPOINT_EVERY, STEPS]
    link = page.page.locator(f"tr[data-uuid='{kept[-1]['uuid']}'] a.dl", has_text="learned_embeds.safetensors")
    with urllib.request.urlopen(site["base"] + link.get_attribute("href")) as r:
        assert r.read() == (site["job_root"] / "checkpoints" / kept[-1]["uuid"] / "learned_embeds.safetensors").read_bytes()

    # the validation images by step decoded in the browser
    page.scroll_through()
    sizes = page.page.eval_on_selector_all("table.val img", "is => is.map(i => i.naturalWidth)")
    assert len(sizes) >= 2 * (STEPS // CHECKPOINT_EVERY) - 2 and all(w > 0 for w in sizes)

    # fork from the older checkpoint, copy the YAML: it is a valid job that names that checkpoint
    page.page.click(f"tr[data-uuid='{kept[0]['uuid']}'] button:text('fork')")
    page.page.click("#copy")
    page.wait_js("document.getElementById('copy').textContent === 'copied'")
    copied = page.page.evaluate("navigator.clipboard.readText()")
    doc = yaml.safe_load(copied)
    model, problems = validate_document(doc)
    assert not problems, problems
    assert doc["spec"]["resumeFrom"] == {"job": JOB_NAME, "checkpoint": kept[0]["uuid"], "mode": "fork"}
    assert doc["spec"]["concepts"] == job_doc()["spec"]["concepts"], "as submitted"
    _assert_escaped(page)
    assert HOSTILE_TOKEN in page.page.inner_text("#hyperparameters")
    page.screenshot("ui-job")


def test_grid_page_shows_every_image_with_its_parameters(site, page):
    index = json.loads((site["grid_root"] / "images" / "index.json").read_text())
    page.goto(f"/grids/default/{GRID_NAME}")
    page.scroll_through()
    files = page.page.eval_on_selector_all("figure.image", "fs => fs.map(f => f.dataset.file)")
    assert sorted(files) == sorted(i["file"] for i in index["images"]) and len(files) == 8
    decoded = page.page.eval_on_selector_all("figure.image img", "is => is.filter(i => i.naturalWidth === 64).length")
    assert decoded == len(files), "every image decoded"
    first = page.page.locator("figure.image").first
    first.locator("summary").click()
    cmd = first.locator("code.reproduce").inner_text()
    assert cmd.startswith("tinv reproduce ") and cmd.endswith(" --check") and files[0] in cmd
    params = first.locator("table.params").inner_text()
    assert "guidance_scale" in params and HOSTILE_TOKEN in params
    assert page.page.locator("#shards table.shards tbody tr").count() >= 1
    assert page.page.locator("#sheets img").count() == 2
    _assert_escaped(page)
    page.screenshot("ui-grid")


def test_compare_draws_one_curve_per_job(site, page):
    """Two jobs' loss curves on one chart: the real run, and a copy of its folder under another name."""
    import shutil

    copy = site["root"] / "default" / "ui-det-logo-copy-local"
    shutil.copytree(site["job_root"], copy)
    progress = json.loads((copy / "progress.json").read_text())
    progress["job"]["name"] = "ui-det-logo-copy"
    (copy / "progress.json").write_text(json.dumps(progress))
    try:
        page.goto("/compare")
        page.page.check(f"input[name=run][value='default/{JOB_NAME}']")
        page.page.check("input[name=run][value='default/ui-det-logo-copy']")
        page.page.click("form.pick button[type=submit]")
        page.page.wait_for_load_state("networkidle")
        page.wait_js("document.getElementById('compare-chart').data !== undefined")
        traces = page.page.evaluate("document.getElementById('compare-chart').data.map(t => [t.name, t.x.length])")
        assert sorted(traces) == sorted([[JOB_NAME, STEPS], ["ui-det-logo-copy", STEPS]])
        page.screenshot("ui-compare")
    finally:
        shutil.rmtree(copy)


def test_unreachable_storage_is_a_message_on_that_run(site, tmp_path):
    """A job whose storage endpoint refuses connections: its page says so; the other pages are unharmed."""
    from uikit import free_port

    from tinv.ui.sources import LocalSource

    dead = tmp_path / "dead.yaml"
    dead.write_text(yaml.safe_dump(job_doc("ui-dead-storage", uri="s3://nowhere/runs", endpoint=f"http://127.0.0.1:{free_port()}")))
    source = LocalSource(site["root"], [str(site["job_file"]), str(dead)], env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"})
    with serve(source) as base:
        p = Page(site["browser"], base, tmp_path)
        try:
            p.goto("/")
            row = p.page.locator("tr[data-name='ui-dead-storage']")
            assert "unreachable" in row.inner_text()
            assert p.page.locator(f"tr[data-name='{JOB_NAME}'] .problem").count() == 0
            resp = p.goto("/jobs/default/ui-dead-storage")
            assert resp.status == 200
            problem = p.page.inner_text("#storage-problem")
            assert "unreachable" in problem and "s3://nowhere/runs" in problem
            assert HOSTILE_TOKEN in p.page.inner_text("#hyperparameters"), "the spec still shows"
            assert p.page.is_visible("#no-scalars") and not p.page.is_visible("#loss-chart"), "no empty axes"
            p.screenshot("ui-dead-storage")
        finally:
            p.close()
