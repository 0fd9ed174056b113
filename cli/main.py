"""The `neatft` commands (docs/cli.md). Each one calls the service and prints either for people (rich tables and
progress bars on stdout, errors on stderr) or, with `--json`, only JSON on stdout for scripts. Every failure ends
in `run`: the API's message and param on stderr and exit code 1, never a traceback; 2 is a usage error, and
`jobs follow` exits 3 for a failed job, 4 for a cancelled one (130 when stopped with Ctrl-C)."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import openai
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli import config, follow, transfer
from cli.client import CLIError, Service, check, from_openai
from neat_core.data.formats import validate_jsonl

stdout, stderr = Console(), Console(stderr=True)
MAX_LINE_BYTES = 4 * 1024 * 1024  # the service's default `max_line_bytes` (control/settings.py)


class _Mode:
    json = False  # set by any command's --json (an eager option, so it is known before the command runs)


def _json_mode(value: bool) -> bool:
    _Mode.json = _Mode.json or value
    return value


Json = Annotated[bool, typer.Option("--json", help="Print only JSON (for scripts).", callback=_json_mode,
                                    is_eager=True)]  # fmt: skip

app = typer.Typer(name="neatft", help="Fine-tune with NEAT from the command line.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)  # fmt: skip
files_app = typer.Typer(help="Upload and list training files.", no_args_is_help=True)
jobs_app = typer.Typer(help="Create, watch and control fine-tuning jobs.", no_args_is_help=True)
adapters_app = typer.Typer(help="Download trained adapters.", no_args_is_help=True)
models_app = typer.Typer(help="The models you may use.", no_args_is_help=True)
for sub, name in ((files_app, "files"), (jobs_app, "jobs"), (adapters_app, "adapters"), (models_app, "models")):
    app.add_typer(sub, name=name)


def _service() -> Service:
    return Service(config.resolve())


def _emit(obj: Any) -> None:
    print(json.dumps(obj, default=str), flush=True)


def _dump(model: Any) -> dict:
    return model.model_dump() if hasattr(model, "model_dump") else model


def _table(*columns: str) -> Table:
    return Table(*columns, box=None, header_style="bold")


# ----------------------------------------------------------------------------------------------------- login


@app.command()
def login(
    base_url: Annotated[str | None, typer.Option(help="The API's URL, ending in /v1.")] = None,
    api_key: Annotated[str | None, typer.Option(help="An API key (asked for, unechoed, when not given).")] = None,
    as_json: Json = False,
) -> None:
    """Check a base URL and key against the service and store them (file mode 0600) for the other commands."""
    try:
        saved = config.stored()
    except config.NotLoggedIn:  # an unreadable config file: logging in again replaces it
        saved = {}
    if base_url is None:
        default = saved.get("base_url") or config.DEFAULT_BASE_URL
        base_url = default if as_json else typer.prompt("Base URL", default=default)
    if api_key is None:
        if as_json:
            raise CLIError("--api-key is required with --json (nothing is prompted for).", param="api_key")
        api_key = typer.prompt("API key", hide_input=True)
    credentials = config.Credentials(base_url.rstrip("/"), api_key)
    Service(credentials).openai.models.list()  # a wrong URL or key is refused now, not at the next command
    path = config.save(credentials)
    if as_json:
        _emit({"base_url": credentials.base_url, "config": str(path)})
    else:
        stdout.print(f"Logged in to {credentials.base_url}; saved to {path}")


# ----------------------------------------------------------------------------------------------------- files


@files_app.command("upload")
def files_upload(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="A JSONL dataset.")],
    as_json: Json = False,
) -> None:
    """Validate a dataset locally (the API's own rules, line-numbered errors), then upload it."""
    # The format and every line are checked here; the limits are the server's to set and it applies them too
    # (its minimum number of examples; its longest line, by default this one), refusing with the same rows.
    report = validate_jsonl(file, min_examples=1, max_line_bytes=MAX_LINE_BYTES)
    if not report.ok:
        first = report.errors[0]
        raise CLIError(f"Invalid training file: {first['message']}", param="file", code="invalid_file",
                       errors=report.errors)  # fmt: skip
    if not as_json:
        stdout.print(f"{file.name}: {report.num_examples} {report.format} examples")
    uploaded = transfer.upload(_service().http, file, stdout, quiet=as_json)
    if as_json:
        _emit(uploaded)
    else:
        stdout.print(f"Uploaded {uploaded['id']} ({uploaded['bytes']:,} bytes)")


@files_app.command("list")
def files_list(as_json: Json = False) -> None:
    """List your files, newest first."""
    files = list(_service().openai.files.list())
    if as_json:
        return _emit([_dump(f) for f in files])
    table = _table("id", "filename", "purpose", "bytes", "created")
    for f in files:
        table.add_row(f.id, f.filename, f.purpose, f"{f.bytes:,}", _when(f.created_at))
    stdout.print(table)


def _when(timestamp: int | None) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "–"


# ------------------------------------------------------------------------------------------------------ jobs


def _value(text: str) -> Any:
    """A KEY=VALUE option's value: JSON when it parses (numbers, booleans, lists), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _pairs(items: list[str], option: str, parse=_value) -> dict[str, Any]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        pairs[key] = parse(value)
    return pairs


@jobs_app.command("create")
def jobs_create(
    model: Annotated[str, typer.Option(help="The base model, e.g. sentence-transformers/all-MiniLM-L6-v2.")],
    training_file: Annotated[str, typer.Option(help="An uploaded file's id (file-…).")],
    validation_file: Annotated[str | None, typer.Option(help="A file to validate on at checkpoints.")] = None,
    adapter: Annotated[str | None, typer.Option(help="The adapter method: neat (the default), lora, …")] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("-p", "--param", metavar="KEY=VALUE", help="An adapter hyperparameter: -p r=8 (repeatable)."),
    ] = None,
    method: Annotated[
        str, typer.Option(help="supervised (the default), or dpo: preference pairs (a preference-format file).")
    ] = "supervised",
    beta: Annotated[float | None, typer.Option(help="DPO's beta (0 < beta <= 2; default: auto, 0.1).")] = None,
    n_epochs: Annotated[int | None, typer.Option(help="Epochs (1–50; default: auto).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (1–256; default: auto).")] = None,
    learning_rate_multiplier: Annotated[float | None, typer.Option(help="Learning rate multiplier (> 0).")] = None,
    suffix: Annotated[str | None, typer.Option(help="Part of the fine-tuned model's name.")] = None,
    seed: Annotated[int | None, typer.Option(help="The training seed.")] = None,
    metadata: Annotated[list[str] | None, typer.Option(metavar="KEY=VALUE", help="Job metadata (repeatable).")] = None,
    follow_job: Annotated[bool, typer.Option("--follow", help="Then watch it (as `jobs follow`).")] = False,
    as_json: Json = False,
) -> None:
    """Create a fine-tuning job."""
    if method not in ("supervised", "dpo"):
        raise typer.BadParameter(f"{method!r} is not one of 'supervised', 'dpo'", param_hint="--method")
    if beta is not None and method != "dpo":  # the server would refuse it too; say so before asking it
        raise typer.BadParameter("beta is DPO's: give it with --method dpo", param_hint="--beta")
    given = {"n_epochs": n_epochs, "batch_size": batch_size, "learning_rate_multiplier": learning_rate_multiplier,
             "beta": beta}  # fmt: skip
    hyperparameters = {k: v for k, v in given.items() if v is not None}  # the rest: the server's "auto"
    adapter_body = _pairs(param or [], "--param")
    if adapter is not None:
        adapter_body["type"] = adapter
    optional = {"validation_file": validation_file, "suffix": suffix, "seed": seed,
                "metadata": _pairs(metadata or [], "--metadata", parse=str) or None}  # fmt: skip
    client = _service().openai
    job = client.fine_tuning.jobs.create(
        model=model,
        training_file=training_file,
        method={"type": method, method: {"hyperparameters": hyperparameters}},
        **{k: v for k, v in optional.items() if v is not None},
        extra_body={"adapter": adapter_body} if adapter_body else None,
    )
    if as_json and not follow_job:
        return _emit(_dump(job))
    if not as_json:
        stdout.print(f"Created {job.id} ({job.status})")
    if follow_job:
        raise typer.Exit(follow.follow(client, job.id, stdout, as_json=as_json))


@jobs_app.command("list")
def jobs_list(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    as_json: Json = False,
) -> None:
    """List your fine-tuning jobs, newest first."""
    jobs = _service().openai.fine_tuning.jobs.list(limit=limit).data
    if as_json:
        return _emit([_dump(j) for j in jobs])
    table = _table("id", "model", "status", "fine-tuned model", "created")
    for j in jobs:
        table.add_row(j.id, j.model, j.status, j.fine_tuned_model or "–", _when(j.created_at))
    stdout.print(table)


def _show_job(job, as_json: bool) -> None:
    if as_json:
        return _emit(_dump(job))
    table = Table.grid(padding=(0, 2))
    adapter = (job.model_extra or {}).get("adapter")
    rows = [("id", job.id), ("status", job.status), ("model", job.model),
            ("fine-tuned model", job.fine_tuned_model), ("training file", job.training_file),
            ("validation file", job.validation_file), ("adapter", json.dumps(adapter) if adapter else None),
            ("hyperparameters", json.dumps(job.hyperparameters.model_dump()) if job.hyperparameters else None),
            ("trained tokens", job.trained_tokens), ("created", _when(job.created_at)),
            ("finished", _when(job.finished_at)), ("error", job.error.message if job.error else None)]  # fmt: skip
    for name, value in rows:
        if value is not None:
            table.add_row(f"[dim]{name}[/dim]", str(value))
    stdout.print(table)


JobId = Annotated[str, typer.Argument(help="A job id (ftjob-…).")]


@jobs_app.command("get")
def jobs_get(job_id: JobId, as_json: Json = False) -> None:
    """Show a job."""
    _show_job(_service().openai.fine_tuning.jobs.retrieve(job_id), as_json)


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobId, as_json: Json = False) -> None:
    """Cancel a job (a running one stops after the step it is on)."""
    _show_job(_service().openai.fine_tuning.jobs.cancel(job_id), as_json)


@jobs_app.command("pause")
def jobs_pause(job_id: JobId, as_json: Json = False) -> None:
    """Pause a job: it saves a checkpoint and lets its worker go."""
    _show_job(_service().openai.fine_tuning.jobs.pause(job_id), as_json)


@jobs_app.command("resume")
def jobs_resume(job_id: JobId, as_json: Json = False) -> None:
    """Resume a paused job from its checkpoint."""
    _show_job(_service().openai.fine_tuning.jobs.resume(job_id), as_json)


@jobs_app.command("follow")
def jobs_follow(job_id: JobId, as_json: Json = False) -> None:
    """Watch a job until it ends: exit 0 when it succeeded, 3 when it failed, 4 when it was cancelled (130: Ctrl-C)."""
    raise typer.Exit(follow.follow(_service().openai, job_id, stdout, as_json=as_json))


# -------------------------------------------------------------------------------------------------- adapters


@adapters_app.command("download")
def adapters_download(
    job_id: JobId,
    format: Annotated[str, typer.Option("--format", help="native (stock peft) or lora (exact LoRA form).")] = "native",
    checkpoint: Annotated[int | None, typer.Option(help="A checkpoint's step instead of the final adapter.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Directory to extract into.")] = None,
    as_json: Json = False,
) -> None:
    """Download a job's adapter (or one checkpoint's) and extract it into a directory."""
    if format not in ("native", "lora"):
        raise typer.BadParameter("must be native or lora", param_hint="--format")
    params = {"format": format, **({"checkpoint": checkpoint} if checkpoint is not None else {})}
    dest = output or Path(f"{job_id}{f'-step-{checkpoint}' if checkpoint is not None else ''}-{format}")
    names = transfer.download(_service().http, f"fine_tuning/jobs/{job_id}/adapter", params, dest, stdout,
                              quiet=as_json)  # fmt: skip
    if as_json:
        return _emit({"job": job_id, "format": format, "checkpoint": checkpoint, "directory": str(dest),
                      "files": names})  # fmt: skip
    stdout.print(f"Extracted {', '.join(names)} into {dest}")


# ----------------------------------------------------------------------------------------------------- inference


@app.command()
def classify(
    model: Annotated[str, typer.Argument(help="A classification model: a fine-tuned one (ft:…).")],
    texts: Annotated[list[str], typer.Argument(help="The texts to classify.")],
    as_json: Json = False,
) -> None:
    """Classify texts (POST /v1/classifications)."""
    answer = check(_service().http.post("classifications", json={"model": model, "input": texts})).json()
    if as_json:
        return _emit(answer)
    table = _table("text", "label", "probability")
    for row in answer["data"]:
        probability = max(row.get("probabilities", {}).values(), default=None)
        table.add_row(texts[row["index"]], row["label"], "–" if probability is None else f"{probability:.3f}")
    stdout.print(table)


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="A chat model, base or fine-tuned.")],
    message: Annotated[str | None, typer.Option("--message", "-m", help="Ask once (or pipe it on stdin).")] = None,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    max_tokens: Annotated[int, typer.Option(help="The most tokens per answer.")] = 256,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (default: the server's).")] = None,
    as_json: Json = False,
) -> None:
    """Chat with a model, streaming its answers. Interactive on a terminal; one turn with --message or stdin."""
    if message is None and not sys.stdin.isatty():
        message = sys.stdin.read().strip()
        if not message:
            raise CLIError("No message on stdin (and no --message).", param="message")
    if message is None and as_json:
        raise CLIError("--json needs one message (--message or stdin); the interactive chat is for people.",
                       param="message")  # fmt: skip
    client = _service().openai
    history = [{"role": "system", "content": system}] if system else []
    options = {"max_tokens": max_tokens, **({"temperature": temperature} if temperature is not None else {})}
    if message is not None:
        history.append({"role": "user", "content": message})
        if as_json:
            return _emit(_dump(client.chat.completions.create(model=model, messages=history, **options)))
        _stream(client, model, history, options)
        return
    stdout.print(f"Chatting with {model}; an empty line or Ctrl-D ends.", style="dim")
    while True:
        try:
            turn = stdout.input("[bold]you> [/bold]")
        except EOFError:
            break
        if not turn.strip():
            break
        history.append({"role": "user", "content": turn})
        history.append({"role": "assistant", "content": _stream(client, model, history, options)})


def _stream(client: openai.OpenAI, model: str, history: list[dict], options: dict) -> str:
    """Print the answer token by token as it streams; the whole answer."""
    parts = []
    for chunk in client.chat.completions.create(model=model, messages=history, stream=True, **options):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            stdout.out(parts[-1], end="", highlight=False)
    stdout.out("")
    return "".join(parts)


@models_app.command("list")
def models_list(as_json: Json = False) -> None:
    """List the models you may use: the base models served and your fine-tuned ones (and their checkpoints)."""
    models = list(_service().openai.models.list())
    if as_json:
        return _emit([_dump(m) for m in models])
    table = _table("id", "owned by", "created")
    for m in models:
        table.add_row(m.id, m.owned_by, _when(m.created))
    stdout.print(table)


# ---------------------------------------------------------------------------------------------------- errors


def _report(error: CLIError) -> None:
    if _Mode.json:
        print(json.dumps(error.as_dict()), file=sys.stderr, flush=True)
        return
    where = f" (param: {error.param})" if error.param else ""
    # Text, not markup: an API message may hold brackets ("[1, 2]") that rich would take for styles.
    stderr.print(Text.assemble(("error:", "red"), f" {error.message}{where}"), highlight=False, soft_wrap=True)
    for row in error.errors:
        at = f"line {row['line']}" if row.get("line") else "file"
        line = Text.assemble(f"  {at}: {row.get('message')} ", (f"({row.get('code')})", "dim"))
        stderr.print(line, highlight=False, soft_wrap=True)


def run() -> None:
    """The console script: click reports usage errors (exit 2); everything else that goes wrong is reported here."""
    try:
        app(prog_name="neatft")  # standalone: it always ends in sys.exit, with the command's code
    except (CLIError, openai.APIError, config.NotLoggedIn, httpx.HTTPError, OSError) as exc:
        _report(_as_cli_error(exc))
        sys.exit(1)


def _as_cli_error(exc: Exception) -> CLIError:
    if isinstance(exc, CLIError):
        return exc
    if isinstance(exc, openai.APIError):
        return from_openai(exc)
    if isinstance(exc, config.NotLoggedIn):
        return CLIError(str(exc), code="not_logged_in")
    if isinstance(exc, httpx.HTTPError):
        return CLIError(f"Cannot reach the service: {exc}", code="unreachable")
    return CLIError(str(exc), code="os_error")
