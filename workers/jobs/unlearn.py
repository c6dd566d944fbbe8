"""The pipeline handler for unlearn jobs: fetch the model (+ adapter) and datasets, unlearn, store the
output, the report and a signed audit record.

- `adapter` given: that adapter is loaded trainable (`PeftModel.from_pretrained(..., is_trainable=True)`);
  the output is a new adapter.
- output `adapter`, no adapter: a fresh LoRA carries the change (the spec's `lora`; default `all-linear`,
  r=8, alpha=32), recorded in the audit record's inputs.
- output `weights`: the whole model is trained and registered as a new model (safetensors).
Output ids derive from the job id (`ad_<suffix>` / `md_<suffix>`), so a redelivered job whose output, report
and audit already exist finishes without recomputing (`existing_result`). Storage order: report, audit,
then the output's record last (publish by final PUT).

A continual job (`learn`, method `ug_clu`) also loads its learn rows; delete wins: learn rows whose row hash is
a forget row's are dropped before training. The audit record's `learn` names the learned rows (dataset, ids,
row hashes, and the dropped ids) beside `forget`.

The run is goal-driven unless the params fix `steps` (`workers/engines/unlearn/driver.py`). A run that did not
meet its goal stores its output and succeeds with `goal_met: false`, the reason in the summary and a
warning event — or, with `require_goal`, stores nothing and fails with `goal_not_met`.
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
from pathlib import Path
from typing import Any

from app import audit
from app.checks.model import file_sha256, manifest_sha256, store_model
from app.deletion.requests import honoured
from app.errors import NotFound
from app.records import now
from app.schemas.jobs import FreshLora, JobResult, UnlearnJobCreate
from app.schemas.models import ModelFile, ModelRecord
from app.schemas.unlearn import UNLEARN_PARAMS
from app.storage import keys
from workers.jobs.context import InputRejected, JobCancelled, JobContext
from workers.jobs.inputs import (
    adapter_record,
    dataset_record,
    fetch_adapter,
    fetch_dataset,
    fetch_model,
    model_record,
)
from workers.jobs.outputs import audit_key, output_adapter_id, output_model_id, parents_of, publish_adapter, report_key
from workers.upkeep.scratch import job_scratch

log = logging.getLogger(__name__)

SUMMARY_SPLITS = ("before", "after")
SUMMARY_EXTRAS = ("gap", "time_vs_reference", "seeds", "robust", "probes")


def existing_result(context: JobContext) -> JobResult | None:
    """The result of a redelivered unlearn job whose output, report and audit are all already stored."""
    records, job = context.records, context.job
    output = job.spec.get("output", "adapter")
    try:
        if output == "weights":
            model = records.get_resource("models", job.tenant, output_model_id(job.id))
            adapter_id = None
        else:
            adapter_id = records.get_adapter(job.tenant, output_adapter_id(job.id)).id
        report = records.storage.get_json(report_key(job))
        if not records.storage.exists(audit_key(job)):
            return None
    except NotFound:
        return None
    summary = report.get("summary") or {}
    return JobResult(
        adapter_id=adapter_id,
        adapter_ids=[adapter_id] if adapter_id else [],
        model_id=model.id if output == "weights" else None,
        report=summary,
        report_key=report_key(job),
        audit_key=audit_key(job),
        warnings=goal_warnings(summary),
    )


def goal_warnings(summary: dict[str, Any]) -> list[str]:
    """The warning a succeeded job carries when its run did not meet the goal."""
    if summary.get("goal_met") is False:
        return [f"goal not met: {summary.get('goal_reason') or 'no reason recorded'}"]
    return []


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "transformers", "peft", "amend"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def load_learn(
    context: JobContext, spec: UnlearnJobCreate, root: Path, forgotten: set[str], family: str, tokenizer: Any,
    max_length: int,
) -> tuple[Any, dict[str, Any] | None]:
    """A continual job's learn rows (None without `learn`) and their audit entry. Delete wins: rows whose hash is
    a forget row's (`forgotten`) are dropped and listed; a job left with no row to learn is refused."""
    from workers.formats.hf_models import load_data

    if spec.learn is None:
        return None, None
    records, job = context.records, context.job
    record = dataset_record(records, job.tenant, spec.learn.dataset)
    hashes = records.storage.get_json(keys.dataset(job.tenant, record.id, "manifest.json"))["row_sha256"]
    wanted = spec.learn.rows if spec.learn.rows is not None else list(range(record.rows))
    if wanted and wanted[-1] >= record.rows:
        raise InputRejected(f"learn row {wanted[-1]} does not exist in dataset {record.id}")
    kept = [i for i in wanted if hashes[i] not in forgotten]
    dropped = [i for i in wanted if hashes[i] in forgotten]
    if not kept:
        raise InputRejected("every learn row is also a forget row (delete wins): nothing is left to learn")
    rows = load_data(fetch_dataset(records, record, root), record, kept, family, tokenizer, max_length)
    entry = {
        "dataset_id": record.id,
        "dataset_sha256": record.sha256,
        "row_ids": kept,
        "row_sha256": [hashes[i] for i in kept],
        "dropped_row_ids": dropped,
    }
    return rows, entry


def run(context: JobContext) -> JobResult:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from workers.device import autocast_dtype, current
    from workers.engines.unlearn import GoalNotMet, UnlearnCancelled
    from workers.engines.unlearn.protocol import unlearn_job
    from workers.formats.hf_models import load_data, load_model, max_tokens, model_output_files, stored_dtype

    job, records, settings = context.job, context.records, context.settings
    spec = UnlearnJobCreate.model_validate(job.spec)
    params = UNLEARN_PARAMS[spec.method].model_validate(spec.params)
    torch.manual_seed(params.seed)
    model_in: ModelRecord = model_record(records, job.tenant, spec.model)
    family = model_in.family
    with job_scratch(job.id) as scratch:
        root = Path(scratch)
        context.progress(0.02, "fetching the model")
        model_dir = fetch_model(records, model_in, root / "model")
        model, tokenizer = load_model(model_dir, model_in)
        max_length = max_tokens(model)
        adapter_in: dict[str, Any] | None = None
        fresh_lora: dict[str, Any] | None = None
        # the reference retrains the model itself (weights, or the base under a fresh LoRA) from scratch, or the
        # input adapter from a fresh initialisation (`retrain`'s reinitialize)
        reference_model = copy.deepcopy(model) if spec.reference == "retrain" and not spec.adapter else None
        if spec.adapter:
            adapter = adapter_record(records, job.tenant, spec.adapter)
            _, weights = fetch_adapter(records, adapter, root / "adapter")
            try:
                model = PeftModel.from_pretrained(model, weights.parent, is_trainable=True)
            except (RuntimeError, ValueError, KeyError) as error:  # shapes or module names do not match
                raise InputRejected(f"adapter {adapter.id} does not fit model {model_in.id}: {error}") from None
            adapter_in = {"id": adapter.id, "sha256": adapter.sha256}
            reference_model = copy.deepcopy(model) if spec.reference == "retrain" else None
        elif spec.output == "adapter":
            lora = spec.lora or FreshLora()
            config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=lora.target_modules)
            try:
                model = get_peft_model(model, config)
            except ValueError as error:  # e.g. target modules that the model does not have
                raise InputRejected(f"the fresh LoRA does not fit model {model_in.id}: {error}") from None
            fresh_lora = lora.model_dump(mode="json")

        context.progress(0.08, "fetching the data")
        forget_record = dataset_record(records, job.tenant, spec.forget.dataset)
        manifest = records.storage.get_json(keys.dataset(job.tenant, forget_record.id, "manifest.json"))
        row_ids = spec.forget.rows if spec.forget.rows is not None else list(range(forget_record.rows))
        if row_ids and row_ids[-1] >= forget_record.rows:
            raise InputRejected(f"forget row {row_ids[-1]} does not exist in dataset {forget_record.id}")
        forget = load_data(
            fetch_dataset(records, forget_record, root), forget_record, row_ids, family, tokenizer, max_length
        )
        learn, learn_audit = load_learn(context, spec, root, {manifest["row_sha256"][i] for i in row_ids},
                                        family, tokenizer, max_length)
        inputs: dict[str, Any] = {"model": {"id": model_in.id, "sha256": model_in.sha256},
                                  "adapter": adapter_in, "fresh_lora": fresh_lora}
        splits: dict[str, Any] = {}
        for role, dataset_id in (("retain", spec.retain), ("eval", spec.eval_)):
            if dataset_id is None:
                splits[role], inputs[role] = None, None
                continue
            record = dataset_record(records, job.tenant, dataset_id)
            splits[role] = load_data(
                fetch_dataset(records, record, root), record, None, family, tokenizer, max_length
            )
            inputs[role] = {"id": record.id, "sha256": record.sha256, "rows": record.rows}

        def engine_progress(fraction: float, stage: str) -> None:
            context.progress(0.1 + 0.8 * fraction, stage)

        try:
            outcome = unlearn_job(
                model, family, spec.method, params, forget, splits["retain"], splits["eval"],
                tokenizer=tokenizer, progress=engine_progress, should_cancel=context.should_cancel, goal=spec.goal,
                device=current().torch_device, autocast=autocast_dtype(current(), settings.precision),
                seeds=spec.seeds, reference_model=reference_model,
                reference_params=spec.reference_params, probes=spec.probes, learn=learn,
            )
        except UnlearnCancelled:
            context.check_cancelled()  # raises LeaseLost or JobCancelled, whichever stopped the engine
            raise JobCancelled from None

        engine_report = outcome.report
        goal = engine_report["goal"]
        if spec.require_goal and not goal["met"]:
            raise GoalNotMet(f"the unlearning goal was not met: {goal['reason']}")
        context.progress(0.92, "storing the output")
        trained: Any = outcome.model
        out_dir = root / "output"
        out_dir.mkdir()
        if spec.output == "weights":
            trained.to(stored_dtype(model_dir)).save_pretrained(out_dir, safe_serialization=True)
            files = model_output_files(out_dir, model_dir)
            listing = [ModelFile(name=n, size=p.stat().st_size, sha256=file_sha256(p)) for n, p in files.items()]
            output = {"kind": "weights", "id": output_model_id(job.id), "sha256": manifest_sha256(listing)}
        else:
            trained.peft_config["default"].base_model_name_or_path = (
                adapter.base_model if spec.adapter and adapter.base_model else model_in.id
            )
            # embeddings are never LoRA targets here; False also keeps peft from looking the base up online
            trained.save_pretrained(out_dir, save_embedding_layers=False)
            output = {
                "kind": "adapter",
                "id": output_adapter_id(job.id),
                "sha256": file_sha256(out_dir / "adapter_model.safetensors"),
            }

        metrics = {split: engine_report.get(split, {}) for split in SUMMARY_SPLITS}
        summary = {
            "method": spec.method,
            "family": family,
            "output": output,
            "steps": engine_report.get("steps"),
            "forget_rows": len(row_ids),
            **({"learn_rows": len(learn_audit["row_ids"])} if learn_audit else {}),
            "goal_met": goal["met"],
            "goal_reason": goal["reason"],
            "goal_kind": goal["kind"],
            "stopped_by": goal["stopped_by"],
            "lr": goal["lr"],
            **metrics,
            **{key: engine_report[key] for key in SUMMARY_EXTRAS if key in engine_report},
        }
        report = {"summary": summary, "job_id": job.id, **engine_report}
        audit_record = {
            "version": 1,
            "job_id": job.id,
            "tenant": job.tenant,
            "created_at": now().isoformat(),
            "method": spec.method,
            "family": family,
            "params": params.model_dump(mode="json", by_alias=True),
            "seed": params.seed,
            "inputs": inputs,
            "forget": {
                "dataset_id": forget_record.id,
                "dataset_sha256": forget_record.sha256,
                "row_ids": row_ids,
                "row_sha256": [manifest["row_sha256"][i] for i in row_ids],
            },
            **({"learn": learn_audit} if learn_audit else {}),
            **({"requests": honoured(records, job.tenant, spec.requests, manifest["row_sha256"])}
               if spec.requests else {}),
            "output": output,
            "versions": _versions(),
            "metrics": metrics,
            "goal": {"met": goal["met"], "reason": goal["reason"], "kind": goal["kind"]},
            "report_key": report_key(job),
        }
        signed = audit.sign(audit_record, settings.audit_hmac_key.get_secret_value())
        log.info(
            "unlearned; storing the output",
            extra={"job_id": job.id, "method": spec.method, "output": output["kind"], "output_id": output["id"],
                   "forget_rows": len(row_ids)},
        )
        name = spec.name or f"{model_in.name}-{spec.method}"
        if spec.output == "weights":
            records.storage.put_json(report_key(job), report)
            records.storage.put_json(audit_key(job), signed)
            stored = store_model(
                records, settings, tenant=job.tenant, model_id=output_model_id(job.id), files=files, name=name,
                source="job", source_job_id=job.id, parents=parents_of(records, job),
            )
            return JobResult(
                model_id=stored.id, report=summary, report_key=report_key(job), audit_key=audit_key(job),
                warnings=goal_warnings(summary),
            )
        records.storage.put_json(audit_key(job), signed)
        result = publish_adapter(context, out_dir, name, report)  # writes the report, then the record last
        return result.model_copy(update={"audit_key": audit_key(job), "warnings": goal_warnings(summary)})
