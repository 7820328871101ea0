"""Screenshots of the Dagster UI for the README (docs/img/ui/*.png), taken in a real headless browser.

Needs, outside the project's venv (neither is a project dependency):
    apt-get install -y chromium                                   # /usr/bin/chromium
    python -m venv /tmp/shotvenv && /tmp/shotvenv/bin/pip install playwright   # no `playwright install`

Then, with a project materialized and its UI running:
    OMP_NUM_THREADS=1 .venv/bin/hyperinf demo --n-pool 600 --n-target 100 --workdir /tmp/uidemo
    .venv/bin/hyperinf ui --config /tmp/uidemo/hyperinf.yaml --port 3111 &
    /tmp/shotvenv/bin/python docs/screenshots.py --url http://127.0.0.1:3111

Each page is opened at 1600x1000 and shot once its content has rendered (the UI polls without end, so there
is no "network idle" to wait for): the global asset lineage, the influence_scores, curated_subset and
mislabel_report asset pages, the latest refresh_job run, its job's Runs tab and the Overview timeline.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}
SETTLE_MS = 2500  # after the awaited text shows: lazy panels (metadata tables, graph layout) finish drawing
# Before any page script runs: no "Join the Dagster community" dialog (CommunityNux.tsx shows it on localhost
# until dismissed) and the navigation collapsed to icons (NavCollapseProvider.tsx), so tables get the width.
INIT_SCRIPT = ("window.localStorage.setItem('communityNux', JSON.stringify('1'));"
               "window.localStorage.setItem('dagster-nav-collapsed', 'true');")
LOCATION = "__repository__@hyperinf"


@dataclass(frozen=True)
class Shot:
    name: str  # docs/img/ui/<name>.png
    path: str  # the UI route
    wait_for: str  # text that shows once the page has its content
    # Asset pages: wide enough for the example tables' text column, tall enough for every metadata entry (the
    # UI scrolls inside its own panel, so Playwright's full_page would not reach them).
    width: int = VIEWPORT["width"]
    height: int = VIEWPORT["height"]
    keys: str | None = None  # pressed before waiting: the lineage's groups open with Alt+E
    click: str | None = None  # a button clicked once the content shows: the timeline's "1hr" range


def latest_run_id(url: str, job: str) -> str:
    """The id of the job's latest run, from the webserver's GraphQL API."""
    query = "query($f: RunsFilter) { runsOrError(filter: $f, limit: 1) { ... on Runs { results { runId } } } }"
    body = json.dumps({"query": query, "variables": {"f": {"pipelineName": job}}}).encode()
    request = urllib.request.Request(f"{url}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        runs = json.loads(resp.read())["data"]["runsOrError"]["results"]
    if not runs:
        raise SystemExit(f"no {job} run yet: materialize the project first (`hyperinf run` or `hyperinf demo`)")
    return runs[0]["runId"]


def shots(run_id: str) -> list[Shot]:
    """The pages the README shows, in its order."""
    return [
        Shot("asset_graph", "/asset-groups", "influence_scores", keys="Alt+KeyE"),
        # the Events tab: the latest materialization's metadata, full width
        Shot("influence_scores", "/assets/influence_scores?view=events", "most_harmful", 1920, 2000),
        Shot("curated_subset", "/assets/curated_subset?view=events", "preview", 1920, 1400),
        Shot("mislabel_report", "/assets/mislabel_report?view=events", "detection", 1920, 1400),
        Shot("run", f"/runs/{run_id}", "RUN_SUCCESS"),
        Shot("job_runs", f"/locations/{LOCATION}/jobs/refresh_job/runs", run_id[:8]),
        Shot("timeline", "/overview/activity/timeline", "refresh_job", click="1hr"),
    ]


def take(page: Page, base: str, shot: Shot, out_dir: Path) -> Path:
    """Open one page, wait for its content, save the PNG."""
    page.set_viewport_size({"width": shot.width, "height": shot.height})
    page.goto(base + shot.path, wait_until="domcontentloaded")
    if shot.keys:
        page.get_by_text("Materialize", exact=False).first.wait_for(timeout=90_000)
        page.keyboard.press(shot.keys)
    page.get_by_text(shot.wait_for, exact=False).first.wait_for(timeout=90_000)
    if shot.click:
        page.get_by_role("button", name=shot.click, exact=True).click()
    page.wait_for_timeout(SETTLE_MS)
    path = out_dir / f"{shot.name}.png"
    page.screenshot(path=str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3111", help="the running UI (hyperinf ui --port ...)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img" / "ui", help="where the PNGs go")
    parser.add_argument("--browser", default="/usr/bin/chromium", help="the Chromium executable")
    parser.add_argument("--only", nargs="*", help="shoot only these names (default: all)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = [s for s in shots(latest_run_id(args.url, "refresh_job")) if not args.only or s.name in args.only]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.browser, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.add_init_script(INIT_SCRIPT)
            for shot in wanted:
                path = take(page, args.url, shot, args.out)
                print(f"{path} ({path.stat().st_size // 1024} KB)")
        finally:
            browser.close()


if __name__ == "__main__":
    main()
