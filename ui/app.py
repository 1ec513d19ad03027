"""The Starlette app: pages rendered by Jinja2 (autoescaping on), charts drawn by plotly.js served
from the plotly package itself (no CDN: clusters are often air-gapped), a strict Content Security
Policy (scripts only from this server, no inline script), read-only routes only.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from tinv.api.storage import MANIFEST_FILE, NotFound, StorageError

from . import views as V
from .sources import Run, Source
from .storage_view import StorageView, TensorBoardCache, checkpoint_file_uri, image_uri, read_grid, read_job

HERE = Path(__file__).resolve().parent
LOG_TAIL = 200
# Path segments a file route accepts: names the trainer writes, never '..' or hidden files.
SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9._+=-]*$")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "font-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def plotly_js() -> Path:
    """plotly.min.js as the plotly wheel installs it."""
    import plotly

    path = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise RuntimeError(f"{path}: plotly.min.js is missing from the plotly package; reinstall 'tinv[ui]'")
    return path


class SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(self, request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        return response


@dataclass
class UI:
    source: Source
    tb: TensorBoardCache
    templates: Jinja2Templates

    # ------------------------------------------------------------------ helpers
    def _cluster_extras(self, run) -> tuple[list, list, str | None]:
        """A run's Events and log tails (cluster source only); a failure is a message on the page."""
        events: list = []
        if not self.source.cluster:
            return events, [], None
        try:
            events = self.source.events(run)
            return events, self.source.logs(run, LOG_TAIL), None
        except Exception as err:  # noqa: BLE001 - the rest of the page still renders
            return events, [], f"cannot read Events and pod logs: {err}"

    def render(self, request: Request, name: str, status_code: int = 200, **ctx: Any) -> Response:
        ctx.setdefault("source_label", self.source.label)
        ctx.setdefault("cluster", self.source.cluster)
        return self.templates.TemplateResponse(request, name, ctx, status_code=status_code)

    def get_run(self, kind: str, request: Request) -> Run:
        ns, name = request.path_params["ns"], request.path_params["name"]
        try:
            run = self.source.run(kind, ns, name)
        except Exception as err:  # noqa: BLE001 - the API unreachable: say so
            raise HTTPException(503, f"cannot read {ns}/{name}: {err}") from None
        if run is None:
            raise HTTPException(404, f"no {'TextualInversionJob' if kind == 'job' else 'GenerationGrid'} {ns}/{name}")
        return run

    def job_view(self, run: Run) -> StorageView:
        if not run.root:
            return StorageView(problem=run.problem or "no run root yet (the operator has not accepted this job)")
        if run.root.startswith("pvc://") and run.problem:
            return StorageView(problem=run.problem)
        try:
            store = self.source.store(run)
        except StorageError as err:  # e.g. an endpoint outside the operator's policy
            return StorageView(problem=str(err))
        view = read_job(store, run.root, self.tb)
        view.problem = view.problem or run.problem
        return view

    # ------------------------------------------------------------------ runs list
    def _rows(self, request: Request) -> tuple[list[dict[str, Any]], dict[str, Any], str | None]:
        q = request.query_params
        query = {
            "q": q.get("q", ""),
            "kind": q.get("kind", "") if q.get("kind", "") in ("", "job", "grid") else "",
            "phase": q.get("phase", "") if q.get("phase", "") in ("", *V.PHASES) else "",
            "sort": q.get("sort", "age") if q.get("sort", "age") in V.SORT_KEYS else "age",
            "desc": q.get("desc", "") in ("1", "true"),
        }
        now = dt.datetime.now(dt.timezone.utc)
        try:
            runs = self.source.runs()
        except Exception as err:  # noqa: BLE001
            return [], query, f"cannot list runs from {self.source.label}: {err}"
        rows = [V.row(r, now) for r in runs]
        query["total"] = len(rows)
        query["counts"] = V.counts(rows)
        return V.filter_sort(rows, query["q"], query["kind"], query["phase"], query["sort"], query["desc"]), query, None

    def runs_page(self, request: Request) -> Response:
        rows, query, error = self._rows(request)
        return self.render(request, "runs.html", rows=rows, query=query, error=error, phases=V.PHASES)

    def runs_partial(self, request: Request) -> Response:
        rows, query, error = self._rows(request)
        return self.render(request, "_rows.html", rows=rows, query=query, error=error, phases=V.PHASES)

    # ------------------------------------------------------------------ job
    def job_page(self, request: Request) -> Response:
        run = self.get_run("job", request)
        view = self.job_view(run)
        training, concepts, origin = V.submitted(run, view)
        prompts = list((training.get("validation") or {}).get("prompts") or [])
        ckpts = V.checkpoints(run, view)
        snippets = [
            {"uuid": c["uuid"], "step": c["step"], "mode": mode, "text": V.resume_snippet(run, view, c["uuid"], mode)}
            for c in ckpts
            for mode in ("continue", "fork")
            if c["uuid"]
        ]
        events, logs, cluster_error = self._cluster_extras(run)
        return self.render(
            request,
            "job.html",
            run=run,
            view=view,
            stats=V.throughput(run, view),
            curves=V.curves(view),
            checkpoints=ckpts,
            snippets=snippets,
            training_yaml=V.to_yaml(training),
            concepts=concepts,
            origin=origin,
            validation=V.validation_steps(view, prompts),
            conditions=V.conditions(run),
            events=events,
            logs=logs,
            cluster_error=cluster_error,
            spec_yaml=V.to_yaml(run.doc) if run.doc else "",
            log_tail=LOG_TAIL,
        )

    def job_curves(self, request: Request) -> Response:
        run = self.get_run("job", request)
        view = self.job_view(run)
        return JSONResponse({"curves": V.curves(view), "stats": V.throughput(run, view), "phase": run.phase, "problem": view.problem})

    def validation_image(self, request: Request) -> Response:
        run = self.get_run("job", request)
        if not run.root:
            raise HTTPException(404, "no such validation image")
        try:  # only the TensorBoard cache: a page of thumbnails must not re-read every manifest
            scalars = self.tb.get(self.source.store(run), run.root, final=run.phase in ("Succeeded", "Failed"))
        except (StorageError, OSError) as err:
            raise HTTPException(502, str(err)) from None
        png = scalars.images.get(f"validation/{request.path_params['index']}", {}).get(int(request.path_params["step"]))
        if png is None:
            raise HTTPException(404, "no such validation image")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    def checkpoint_file(self, request: Request) -> Response:
        run = self.get_run("job", request)
        uuid, name = request.path_params["uuid"], request.path_params["file"]
        if not (SAFE_SEGMENT.match(uuid) and SAFE_SEGMENT.match(name)) or not run.root:
            raise HTTPException(404, "no such file")
        try:  # only files the checkpoint's manifest lists (a complete checkpoint's own files)
            manifest = self.source.store(run).read_json(checkpoint_file_uri(run.root, uuid, MANIFEST_FILE))
        except NotFound:
            raise HTTPException(404, f"no complete checkpoint {uuid}") from None
        except (StorageError, ValueError) as err:
            raise HTTPException(502, str(err)) from None
        if name == MANIFEST_FILE or name not in (manifest.get("files") or {}):
            raise HTTPException(404, f"checkpoint {uuid} has no file {name}")
        return self._read(run, checkpoint_file_uri(run.root, uuid, name), "application/octet-stream",
                          {"Content-Disposition": f'attachment; filename="{uuid[:8]}-{name}"'})

    def _read(self, run: Run, uri: str, media_type: str, headers: dict[str, str] | None = None) -> Response:
        try:
            data = self.source.store(run).read_bytes(uri)
        except NotFound:
            raise HTTPException(404, "no such file") from None
        except StorageError as err:
            raise HTTPException(502, str(err)) from None
        return Response(data, media_type=media_type, headers=headers)

    # ------------------------------------------------------------------ grid
    def grid_page(self, request: Request) -> Response:
        run = self.get_run("grid", request)
        if not run.root:
            view = StorageView(problem=run.problem or "no run root yet (the operator has not accepted this grid)")
        elif run.root.startswith("pvc://") and run.problem:
            view = StorageView(problem=run.problem)
        else:
            try:
                view = read_grid(self.source.store(run), run.root)
                view.problem = view.problem or run.problem
            except StorageError as err:  # e.g. an endpoint outside the operator's policy
                view = StorageView(problem=str(err))
        events, logs, cluster_error = self._cluster_extras(run)
        spec = (run.doc or {}).get("spec") or {}
        return self.render(
            request,
            "grid.html",
            run=run,
            view=view,
            stats=V.throughput(run, view),
            shards=V.shard_rows(view, run),
            images=V.gallery(run, view),
            sheets=V.contact_sheets(view),
            conditions=V.conditions(run),
            events=events,
            logs=logs,
            cluster_error=cluster_error,
            spec_yaml=V.to_yaml(run.doc) if run.doc else "",
            embeddings=(run.status.get("resolvedEmbeddings") or (view.index or {}).get("embeddings") or spec.get("embeddings") or []),
            log_tail=LOG_TAIL,
        )

    def grid_image(self, request: Request) -> Response:
        run = self.get_run("grid", request)
        rel = request.path_params["path"]
        parts = rel.split("/")
        if not run.root or len(parts) > 2 or not all(SAFE_SEGMENT.match(p) for p in parts) or not rel.endswith(".png"):
            raise HTTPException(404, "no such image")
        return self._read(run, image_uri(run.root, rel), "image/png", {"Cache-Control": "max-age=600"})

    # ------------------------------------------------------------------ compare
    def compare_page(self, request: Request) -> Response:
        chosen = [c for c in request.query_params.getlist("run") if "/" in c]
        try:
            jobs = [r for r in self.source.runs() if r.kind == "job"]
        except Exception as err:  # noqa: BLE001
            jobs, chosen = [], []
            return self.render(request, "compare.html", jobs=jobs, chosen=chosen, series=[], error=str(err))
        series = []
        for key in chosen:
            ns, name = key.split("/", 1)
            run = self.source.run("job", ns, name)
            if run is None:
                series.append({"key": key, "name": key, "points": [], "problem": "no such job"})
                continue
            view = self.job_view(run)
            series.append({"key": key, "name": name, "points": V.curves(view)["loss"], "problem": view.problem})
        return self.render(request, "compare.html", jobs=jobs, chosen=chosen, series=series, error=None)

    def healthz(self, request: Request) -> Response:
        return Response("ok\n", media_type="text/plain")


async def http_error(request: Request, exc: HTTPException) -> Response:
    templates: Jinja2Templates = request.app.state.templates
    return templates.TemplateResponse(
        request, "error.html", {"status": exc.status_code, "detail": exc.detail, "source_label": request.app.state.source.label, "cluster": request.app.state.source.cluster},
        status_code=exc.status_code,
    )


def create_app(source: Source, tb: TensorBoardCache | None = None) -> Starlette:
    templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescape on for .html
    templates.env.filters["num"] = _num
    templates.env.filters["size"] = _size
    templates.env.filters["when"] = _when
    ui = UI(source=source, tb=tb or TensorBoardCache(), templates=templates)
    plotly_path = plotly_js()
    routes = [
        Route("/", ui.runs_page),
        Route("/partials/runs", ui.runs_partial),
        Route("/jobs/{ns}/{name}", ui.job_page),
        Route("/api/jobs/{ns}/{name}/curves", ui.job_curves),
        Route("/jobs/{ns}/{name}/validation/{index:int}/{step:int}.png", ui.validation_image),
        Route("/jobs/{ns}/{name}/checkpoints/{uuid}/{file}", ui.checkpoint_file),
        Route("/grids/{ns}/{name}", ui.grid_page),
        Route("/grids/{ns}/{name}/images/{path:path}", ui.grid_image),
        Route("/compare", ui.compare_page),
        Route("/healthz", ui.healthz),
        Route("/static/plotly.min.js", lambda request: FileResponse(plotly_path, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)], exception_handlers={HTTPException: http_error})
    app.state.templates = templates
    app.state.source = source
    app.state.ui = ui
    return app


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _when(value: Any) -> str:
    """RFC 3339 as 'YYYY-MM-DD HH:MM:SS' (UTC); the full value stays in the element's title."""
    t = V.parse_time(value) if isinstance(value, str) else None
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if t else (value or "-")


def _size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""
