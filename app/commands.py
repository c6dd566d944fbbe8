"""The `amend` command line for the API (Typer + rich), on `app.client`: adapters, merge, jobs.

    export AMEND_URL=http://127.0.0.1:8000 AMEND_API_KEY=$(cat .amend-data/dev-api-key)
    amend adapters upload adapters/one --name one
    amend merge ad_… ad_…:0.5 --method ctm --param rule=ties --rank 8 --watch
    amend jobs list --state running --json
    amend jobs watch jb_…
    amend adapters download ad_… merged/

Every command takes `--json` (machine-readable output on stdout). Errors print the API's code and exit 1;
a watched job that fails exits 2. `amend dev` and `amend reindex` are app/service_commands.py's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from app.client import ApiError, Client, JobFailed

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Amend: merge, compress and unlearn LoRA adapters.")
adapters_app = typer.Typer(no_args_is_help=True, help="Upload, list, inspect and download adapters.")
jobs_app = typer.Typer(no_args_is_help=True, help="List, inspect, watch and cancel jobs.")
app.add_typer(adapters_app, name="adapters")
app.add_typer(jobs_app, name="jobs")
console = Console(stderr=False)
errors = Console(stderr=True)

Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
_state: dict[str, Any] = {}


@app.callback()
def _options(
    url: Annotated[str, typer.Option(envvar="AMEND_URL", help="The API's base URL.")] = "http://127.0.0.1:8000",
    api_key: Annotated[str, typer.Option(envvar="AMEND_API_KEY", help="An API key.", show_default=False)] = "",
) -> None:
    _state["url"], _state["api_key"] = url, api_key


def make_client() -> Client:
    """The client every command uses (tests replace it)."""
    return Client(_state.get("url"), _state.get("api_key"))


def _run(action: Callable[[Client], Any]) -> Any:
    try:
        with make_client() as client:
            return action(client)
    except ApiError as error:
        errors.print(f"[red]error[/red] {error.status} {error.code}: {error.message}")
        raise typer.Exit(1) from None
    except JobFailed as failed:
        errors.print(f"[red]{failed}[/red]")
        _print_json(failed.job) if _state.get("json") else None
        raise typer.Exit(2) from None


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(_plain(value), indent=2) + "\n")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    table = Table()
    for column in columns:
        if column == "id":  # whole on one line, so it can be copied; the other columns wrap around it
            width = max((len(_cell(row.get(column))) for row in rows), default=2)
            table.add_column(column, no_wrap=True, min_width=width)
        else:
            table.add_column(column, overflow="fold")  # long values wrap instead of being cut short
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0%}" if 0 <= value <= 1 else f"{value:g}"
    return str(value)


def _show(value: Any, as_json: bool, columns: list[str]) -> None:
    _state["json"] = as_json
    if as_json:
        _print_json(value)
        return
    rows = _plain(value)
    _table(rows if isinstance(rows, list) else [rows], columns)
    result = rows.get("result") if isinstance(rows, dict) else None
    output = (result.get("adapter_id") or result.get("model_id")) if isinstance(result, dict) else None
    if output:  # one job that produced something: the id to download or to use next, on a line of its own
        console.print(f"output: {output}", soft_wrap=True)


ADAPTER_COLUMNS = ["id", "name", "rank", "n_modules", "size_bytes", "created_at"]
JOB_COLUMNS = ["id", "type", "method", "state", "progress", "stage", "created_at"]


# -- adapters --------------------------------------------------------------------------------------------
@adapters_app.command("upload")
def adapters_upload(directory: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
                    name: Annotated[str | None, typer.Option(help="Defaults to the directory's name.")] = None,
                    as_json: Json = False) -> None:
    """Upload a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    _show(_run(lambda c: c.upload_adapter(directory, name)), as_json, ADAPTER_COLUMNS)


@adapters_app.command("list")
def adapters_list(limit: Annotated[int, typer.Option(min=1, max=1000)] = 50, as_json: Json = False) -> None:
    """The tenant's adapters, newest first."""
    _show(_run(lambda c: [a for _, a in zip(range(limit), c.adapters(min(limit, 200)), strict=False)]),
          as_json, ADAPTER_COLUMNS)


@adapters_app.command("get")
def adapters_get(adapter_id: str, as_json: Json = False) -> None:
    """One adapter's record."""
    _show(_run(lambda c: c.adapter(adapter_id)), as_json, ADAPTER_COLUMNS + ["base_model", "sha256"])


@adapters_app.command("download")
def adapters_download(adapter_id: str, directory: Path, as_json: Json = False) -> None:
    """Both files of an adapter into DIRECTORY."""
    folder = _run(lambda c: c.download(adapter_id, directory))
    if as_json:
        _print_json({"adapter_id": adapter_id, "directory": str(folder)})
    else:
        console.print(f"downloaded {adapter_id} to {folder}")


# -- merge -----------------------------------------------------------------------------------------------
def _param_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@app.command("merge")
def merge(
    adapters: Annotated[list[str], typer.Argument(help="Adapter ids, each optionally ID:WEIGHT (e.g. ad_…:0.5).")],
    method: Annotated[str, typer.Option(help="cat, task_arithmetic, ties, dare_ties, ctm, …")] = "ctm",
    param: Annotated[list[str] | None, typer.Option(help="A method parameter KEY=VALUE (JSON values); repeat.")] = None,
    rank: Annotated[int | None, typer.Option(min=1, help="The output rank.")] = None,
    name: Annotated[str | None, typer.Option(help="The merged adapter's name.")] = None,
    webhook_url: Annotated[str | None, typer.Option(help="Notified when the job ends.")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the job with a progress bar until it ends.")] = False,
    as_json: Json = False,
) -> None:
    """Merge adapters into one; prints the job (or, with --watch, the finished job)."""
    weighted: list[str | tuple[str, float]] = []
    for item in adapters:
        adapter_id, _, weight = item.partition(":")
        weighted.append((adapter_id, float(weight)) if weight else adapter_id)
    params = {key: _param_value(value) for key, _, value in (p.partition("=") for p in param or [])}
    output: dict[str, Any] = {k: v for k, v in (("rank", rank), ("name", name)) if v is not None}

    def run(client: Client) -> Any:
        job = client.merge(weighted, method=method, params=params, output=output, webhook_url=webhook_url)
        return client.wait(job.id, progress=not as_json) if watch else job

    _state["json"] = as_json
    _show(_run(run), as_json, JOB_COLUMNS)


# -- jobs ------------------------------------------------------------------------------------------------
@jobs_app.command("list")
def jobs_list(
    state: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed, cancelled")] = None,
    type_: Annotated[str | None, typer.Option("--type", help="merge, compress, unlearn")] = None,
    method: Annotated[str | None, typer.Option()] = None,
    adapter: Annotated[str | None, typer.Option(help="Jobs that read or produced this adapter.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    as_json: Json = False,
) -> None:
    """The tenant's jobs, newest first."""
    filters = {k: v for k, v in (("state", state), ("type", type_), ("method", method), ("adapter", adapter)) if v}
    _show(_run(lambda c: [j for _, j in zip(range(limit), c.jobs(min(limit, 200), **filters), strict=False)]),
          as_json, JOB_COLUMNS)


@jobs_app.command("get")
def jobs_get(job_id: str, as_json: Json = False) -> None:
    """One job."""
    _show(_run(lambda c: c.job(job_id)), as_json, JOB_COLUMNS + ["finished_at"])


@jobs_app.command("watch")
def jobs_watch(job_id: str, as_json: Json = False) -> None:
    """Follow a job with a live progress bar until it ends (exit 2 when it fails or is cancelled)."""
    _state["json"] = as_json
    _show(_run(lambda c: c.wait(job_id, progress=not as_json)), as_json, JOB_COLUMNS + ["finished_at"])


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, as_json: Json = False) -> None:
    """Cancel a queued or running job."""
    _show(_run(lambda c: c.cancel(job_id)), as_json, JOB_COLUMNS)


@jobs_app.command("events")
def jobs_events(job_id: str, as_json: Json = False) -> None:
    """A job's event log."""
    _show(_run(lambda c: c.events(job_id)), as_json, ["id", "time", "state", "progress", "stage"])


@app.command("dev", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def dev(ctx: typer.Context) -> None:
    """Run API + worker + Redis + S3 on the embedded defaults (app/service_commands.py; `amend dev --port N`)."""
    from app.service_commands import main

    raise typer.Exit(main(["dev", *ctx.args]))


@app.command("reindex")
def reindex() -> None:
    """Rebuild the Redis index from object storage (app/service_commands.py)."""
    from app.service_commands import main

    raise typer.Exit(main(["reindex"]))


def run(argv: list[str]) -> int:
    try:
        app(args=argv, prog_name="amend")
    except SystemExit as done:
        return int(done.code or 0) if not isinstance(done.code, str) else 1
    return 0
