"""Versions of an unlearning target (an adapter, or a model): version 1 is the artifact as registered; each
`unlearn_pending` job that succeeds adds the next, with its job, audit record and metrics. `current` names the
version a schedule's next run starts from; it moves when the schedule's `promote` says so (`auto`: the job met
its goal and the report's guards hold) or by `POST …/versions/{v}/promote`.

One record per target (`tenants/{tenant}/versions/{target id}/record.json`, through app/documents.py), changed
atomically. A target asked for by its id means its current version, unless a version is pinned: job inputs
(`resolve_inputs`, at submission: the job record names the version's id) and GET, download and lineage
(`resolve`, `?version=N`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from app import documents
from app.errors import NotFound, Unprocessable
from app.records import Records, now
from app.schemas.deletion import Promote, Target, TargetVersion, TargetVersions
from app.schemas.jobs import JobRecord

KIND = "versions"
R = TypeVar("R")


@dataclass(frozen=True)
class Asked(Generic[R]):
    """What a GET or download of a target's id reads: `record`, version `number` of `target`."""

    target: str
    number: int
    record: R


def target_id(target: Target) -> str:
    return target.adapter or target.model


def _initial(records: Records, tenant: str, target: Target) -> TargetVersions:
    kind = "adapter" if target.adapter else "model"
    if target.adapter:
        created = records.get_adapter(tenant, target.adapter).created_at
    else:
        created = records.get_resource("models", tenant, target.model).created_at
    first = TargetVersion(version=1, model_id=target.model, adapter_id=target.adapter, created_at=created,
                          promoted_at=created)
    return TargetVersions(id=target_id(target), tenant=tenant, kind=kind, target=target, current=1, versions=[first])


def get(records: Records, tenant: str, target: Target) -> TargetVersions:
    """The target's versions (version 1 alone until an unlearning run adds one)."""
    try:
        return documents.get(records, KIND, TargetVersions, tenant, target_id(target))
    except NotFound:
        return _initial(records, tenant, target)


def _ensure(records: Records, tenant: str, target: Target) -> None:
    try:
        documents.get(records, KIND, TargetVersions, tenant, target_id(target))
    except NotFound:
        documents.put(records, KIND, _initial(records, tenant, target))


def current(records: Records, tenant: str, target: Target) -> TargetVersion:
    found = get(records, tenant, target)
    return found.versions[found.current - 1]


def guards_hold(promote: Promote, summary: dict[str, Any]) -> tuple[bool, str]:
    """Whether a job's report allows automatic promotion, and why not."""
    if promote.mode == "never":
        return False, "promote: never (left for review)"
    if summary.get("goal_met") is False:
        return False, f"goal not met: {summary.get('goal_reason')}"
    before, after = summary.get("before") or {}, summary.get("after") or {}
    if promote.max_retain_accuracy_drop is not None and "retain_accuracy" in before and "retain_accuracy" in after:
        drop = before["retain_accuracy"] - after["retain_accuracy"]
        if drop > promote.max_retain_accuracy_drop:
            return False, f"retain accuracy fell {drop:.3g} > {promote.max_retain_accuracy_drop}"
    if promote.max_retain_nll_rise is not None and "retain_nll" in before and "retain_nll" in after:
        rise = after["retain_nll"] - before["retain_nll"]
        if rise > promote.max_retain_nll_rise:
            return False, f"retain NLL rose {rise:.3g} > {promote.max_retain_nll_rise}"
    return True, "goal met and guards hold"


def add_from_job(records: Records, job: JobRecord, target: Target, promote: Promote, requests: list[str]) -> int:
    """Record a succeeded unlearning job's output as the target's next version; promote it when allowed.
    Idempotent per job (a listener called twice adds one version). Returns the version number."""
    _ensure(records, job.tenant, target)
    result = job.result
    summary = (result.report if result else None) or {}
    allowed, why = guards_hold(promote, summary)
    number: list[int] = []

    def change(record: TargetVersions) -> bool:
        mine = [v for v in record.versions if v.job_id == job.id]
        if mine:
            number.append(mine[0].version)
            return False
        version = TargetVersion(
            version=len(record.versions) + 1, parent_version=record.current,
            model_id=(result.model_id if result and result.model_id else target.model),
            adapter_id=result.adapter_id if result else None, job_id=job.id,
            audit_key=result.audit_key if result else None, created_at=now(), requests=requests,
            metrics={k: summary[k] for k in ("before", "after", "goal_met") if k in summary}, promotion=why,
        )
        record.versions.append(version)
        if allowed:
            record.current, version.promoted_at = version.version, now()
        number.append(version.version)
        return True

    documents.mutate(records, KIND, TargetVersions, job.tenant, target_id(target), change)
    return number[0]


def for_id(records: Records, tenant: str, kind: str, record_id: str) -> TargetVersions:
    """The versions of an adapter or model by its id, for the routes (the caller has checked it exists)."""
    try:
        return documents.get(records, KIND, TargetVersions, tenant, record_id)
    except NotFound:  # never unlearned: version 1 alone, made and current since the record was (as _initial)
        created = (records.get_adapter(tenant, record_id) if kind == "adapter"
                   else records.get_resource("models", tenant, record_id)).created_at
        first = TargetVersion(version=1, model_id=record_id if kind == "model" else None,
                              adapter_id=record_id if kind == "adapter" else None, created_at=created,
                              promoted_at=created)
        target = Target(model=record_id) if kind == "model" else Target(model=record_id, adapter=record_id)
        return TargetVersions(id=record_id, tenant=tenant, kind=kind, target=target, current=1,  # type: ignore[arg-type]
                              versions=[first])


def promote_version(records: Records, tenant: str, kind: str, record_id: str, version: int) -> TargetVersions:
    """Make `version` current (404 for a version that does not exist)."""
    try:
        documents.get(records, KIND, TargetVersions, tenant, record_id)
    except NotFound:
        if version != 1:
            raise NotFound(f"version {version} of {record_id} not found") from None
        return for_id(records, tenant, kind, record_id)  # only version 1 exists, and it is current

    def change(record: TargetVersions) -> bool:
        if not 1 <= version <= len(record.versions):
            raise NotFound(f"version {version} of {record.id} not found")
        record.current = version
        record.versions[version - 1].promoted_at = now()
        record.versions[version - 1].promotion = "promoted by request"
        return True

    return documents.mutate(records, KIND, TargetVersions, tenant, record_id, change)


def resolve(records: Records, tenant: str, kind: str, record_id: str, version: int | None = None) -> tuple[str, int]:
    """(the id to read, its version number) for `record_id` asked for as a target: `version` when given (a pin),
    else the current one. An id with no versions is version 1 of itself (a pin other than 1 is a 404). A model
    whose version is an adapter over it (an unlearning run with output `adapter`) cannot be read as a model:
    pinned, that is a 422; as the current version the model reads the model that adapter sits on."""
    try:
        found = documents.get(records, KIND, TargetVersions, tenant, record_id)
    except NotFound:
        if version not in (None, 1):
            raise NotFound(f"{kind} {record_id} has no version {version}: it has version 1 only") from None
        return record_id, 1
    number = version or found.current
    if not 1 <= number <= len(found.versions):
        raise NotFound(f"version {number} of {record_id} not found (it has {len(found.versions)})")
    chosen = found.versions[number - 1]
    if kind == "adapter":
        return chosen.adapter_id or record_id, number
    if chosen.adapter_id is None:
        return chosen.model_id or record_id, number
    if version is not None:
        raise Unprocessable(f"version {number} of model {record_id} is an adapter over it ({chosen.adapter_id}): "
                            f"read it as /v1/adapters/{chosen.adapter_id}", code="version_is_adapter")
    base = chosen.model_id or record_id
    below = [v.version for v in found.versions[:number] if v.adapter_id is None and (v.model_id or record_id) == base]
    return base, below[-1] if below else 1


# (id field, its pin field, kind) of each job type's inputs; merge adapters are items {id, version}
PINNED_FIELDS = {
    "unlearn": [("adapter", "adapter_version", "adapter"), ("model", "model_version", "model")],
    "compress": [("adapter", "adapter_version", "adapter"), ("base_model", "base_model_version", "model"),
                 ("model", "model_version", "model")],
}


def _resolve_item(records: Records, tenant: str, item: dict[str, Any], id_field: str, pin_field: str,
                  kind: str) -> bool:
    """Resolve one input in place: the id becomes the version read; the pin stays only while the id still names
    the target (its version 1), so a spec resolved once reads the same thing when it is submitted again."""
    new, _ = resolve(records, tenant, kind, item[id_field], item.get(pin_field))
    if new == item[id_field]:
        return False
    item[id_field], item[pin_field] = new, None
    return True


def resolve_inputs(records: Records, tenant: str, spec: Any) -> Any:
    """A job spec with each input adapter and model named by a target's id replaced by the version it reads: the
    pinned one (`version` on a merge input, `<field>_version` on unlearn and compress inputs) or else the current
    one (called by `app.jobs.submit.submit`, so the job record names what the job read). Ids of versions and of
    artifacts never unlearned are left as they are. An unlearning job's model under an adapter is that adapter's
    base: it is resolved only when pinned."""
    data = spec.model_dump(mode="json", by_alias=True)
    changed = False
    for item in data.get("adapters") or []:
        changed = _resolve_item(records, tenant, item, "id", "version", "adapter") or changed
    for id_field, pin_field, kind in PINNED_FIELDS.get(data.get("type", ""), []):
        if data.get(pin_field) is not None and not data.get(id_field):
            raise Unprocessable(f"{pin_field} pins a version of {id_field}, which the job does not name")
        base_of_adapter = data["type"] == "unlearn" and id_field == "model" and data.get("adapter")
        if isinstance(data.get(id_field), str) and not (base_of_adapter and data.get(pin_field) is None):
            changed = _resolve_item(records, tenant, data, id_field, pin_field, kind) or changed
    return type(spec).model_validate(data) if changed else spec


def add_rebuild(records: Records, job: JobRecord, kind: str, descendant: str, output: str,
                requests: list[str]) -> str:
    """Record a rebuilt descendant (`output`, made by `job` from an unlearned version) as `descendant`'s next
    version, current at once; returns the id of the version it replaced. Idempotent per job."""
    target = Target(model=descendant, adapter=descendant) if kind == "adapter" else Target(model=descendant)
    _ensure(records, job.tenant, target)
    replaced: list[str] = []

    def change(record: TargetVersions) -> bool:
        before = record.versions[record.current - 1]
        replaced.append((before.adapter_id if kind == "adapter" else before.model_id) or descendant)
        if any(v.job_id == job.id for v in record.versions):
            return False
        version = TargetVersion(
            version=len(record.versions) + 1, parent_version=record.current,
            model_id=output if kind == "model" else None, adapter_id=output if kind == "adapter" else None,
            job_id=job.id, created_at=now(), requests=requests, promoted_at=now(),
            promotion="rebuilt from the unlearned version (the one it replaces was made from forgotten data)",
        )
        record.versions.append(version)
        record.current = version.version
        return True

    documents.mutate(records, KIND, TargetVersions, job.tenant, target_id(target), change)
    return replaced[0]
