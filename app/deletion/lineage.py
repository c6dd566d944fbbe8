"""Lineage: each adapter and model a job publishes names its parents on its record (`parents_of`, from the job's
spec, called where outputs are published: `workers/jobs/outputs.publish_adapter` and the unlearning job's model
publish); `lineage` walks them both ways for `GET /v1/{adapters|models}/{id}/lineage`.

Computed from the records, not kept in a second index: the parents on each record are the truth, and a walk
reads the tenant's adapter and model records once (through the Redis index, a page of MGETs), so there is
nothing to rebuild or to drift after `amend reindex` or a failed publish. This is O(artifacts of the tenant) per
call - fine for thousands; a reverse index (parent -> children sets, rebuilt by reindex) is the step when it is
not.

Versions: an id that is a target's version is named with `version_of` and `version` (a plain artifact is version
1 of itself). Job inputs are resolved to the target's current version at submission (`resolve_inputs`), so a
parent is always the version actually used.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from app import documents
from app.errors import AmendError, NotFound
from app.records import Records
from app.schemas.deletion import TargetVersions, UnlearningRequestRecord
from app.schemas.jobs import JobRecord
from app.schemas.lineage import LineageNode, LineagePublic, Parent

VERSIONS = "versions"  # app.deletion.versions.KIND
REQUESTS = "requests"  # app.deletion.requests.KIND
REBUILD_PREFIX = "rebuild:"  # idempotency key of a descendant's rebuild: rebuild:{descendant}:{unlearning job}


def _versions(records: Records, tenant: str, target_id: str) -> TargetVersions | None:
    try:
        return documents.get(records, VERSIONS, TargetVersions, tenant, target_id)
    except NotFound:
        return None


def _record(records: Records, tenant: str, kind: str, record_id: str) -> Any:
    if kind == "adapter":
        return records.get_adapter(tenant, record_id)
    return records.get_resource("models", tenant, record_id)


def version_of(records: Records, tenant: str, kind: str, record_id: str) -> tuple[str, int]:
    """(target id, version number) of an adapter or model id: a target's own id is its version 1 unless its
    versions say otherwise; an unlearning run's or a rebuild's output is found through its job."""
    own = _versions(records, tenant, record_id)
    if own is not None:
        return record_id, 1
    try:
        record = _record(records, tenant, kind, record_id)
        job = records.get_job(record.source_job_id, tenant) if record.source_job_id else None
    except NotFound:
        return record_id, 1
    if job is None:
        return record_id, 1
    target: str | None = None
    if job.idempotency_key and job.idempotency_key.startswith(REBUILD_PREFIX):
        target = job.idempotency_key.split(":")[1]
    elif job.spec.get("requests"):
        try:
            request = documents.get(records, REQUESTS, UnlearningRequestRecord, tenant, job.spec["requests"][0])
            target = request.target.adapter or request.target.model
        except NotFound:
            target = None
    found = _versions(records, tenant, target) if target else None
    for version in found.versions if found else []:
        if version.job_id == job.id:
            return found.id, version.version  # type: ignore[union-attr]
    return record_id, 1


def _artifact(records: Records, tenant: str, kind: str, record_id: str, role: str) -> Parent:
    target, number = version_of(records, tenant, kind, record_id)
    return Parent(kind=kind, id=record_id, role=role, version_of=target, version=number)  # type: ignore[arg-type]


def parents_of(records: Records, job: JobRecord) -> list[Parent]:
    """The parents of a job's output, from its spec (inputs already resolved to versions at submission)."""
    spec, tenant = job.spec, job.tenant
    parents = [_artifact(records, tenant, "adapter", item["id"], "input") for item in spec.get("adapters", [])]
    if spec.get("adapter"):
        role = "predecessor" if job.type == "unlearn" else "input"
        parents.append(_artifact(records, tenant, "adapter", spec["adapter"], role))
    for field in ("base_model", "model"):
        if spec.get(field):
            role = "predecessor" if job.type == "unlearn" and not spec.get("adapter") else field
            parents.append(_artifact(records, tenant, "model", spec[field], role))
    forget, learn = spec.get("forget") or {}, spec.get("learn") or {}
    datasets = (("forget", forget.get("dataset")), ("learn", learn.get("dataset")), ("retain", spec.get("retain")),
                ("eval", spec.get("eval")))
    for role, dataset in datasets:
        if dataset:
            parents.append(Parent(kind="dataset", id=dataset, role=role))
    parents += [Parent(kind="request", id=request, role="request") for request in spec.get("requests") or []]
    return parents


def _all(records: Records, tenant: str) -> dict[str, LineageNode]:
    """Every live adapter and model of the tenant as a lineage node, with the type of the job that made it."""
    nodes: dict[str, LineageNode] = {}
    for kind in ("adapter", "model"):
        cursor: str | None = None
        while True:
            if kind == "adapter":
                page, cursor = records.list_adapters(tenant, 500, cursor)
            else:
                page, cursor = records.list_resources("models", tenant, 500, cursor)
            for record in page:
                if not getattr(record, "deleted", False):
                    nodes[record.id] = LineageNode(id=record.id, kind=kind, name=record.name,  # type: ignore[arg-type]
                                                   source_job_id=record.source_job_id, parents=record.parents)
            if not cursor:
                break
    jobs = [n.source_job_id for n in nodes.values() if n.source_job_id]
    types = {job.id: job.type for job in records.get_jobs(jobs, tenant)} if jobs else {}
    for node in nodes.values():
        node.job_type = types.get(node.source_job_id or "")
    return nodes


def _walk(start: str, edges: dict[str, list[str]], nodes: dict[str, LineageNode]) -> list[LineageNode]:
    seen, order, queue = {start}, [], deque(edges.get(start, []))
    while queue:
        current = queue.popleft()
        if current in seen or current not in nodes:
            continue
        seen.add(current)
        order.append(nodes[current])
        queue.extend(edges.get(current, []))
    return order


def _children(nodes: dict[str, LineageNode]) -> dict[str, list[str]]:
    children: dict[str, list[str]] = {}
    for node in nodes.values():
        for parent in node.parents:
            if parent.kind in ("adapter", "model") and node.id not in children.setdefault(parent.id, []):
                children[parent.id].append(node.id)
    return children


def lineage(records: Records, tenant: str, kind: str, record_id: str) -> LineagePublic:
    """Ancestors and descendants of an adapter or model (the caller has checked that it exists)."""
    nodes = _all(records, tenant)
    record = _record(records, tenant, kind, record_id)
    parents_edges = {n.id: [p.id for p in n.parents if p.kind in ("adapter", "model")] for n in nodes.values()}
    return LineagePublic(id=record_id, kind=kind, parents=record.parents,  # type: ignore[arg-type]
                         ancestors=_walk(record_id, parents_edges, nodes),
                         descendants=_walk(record_id, _children(nodes), nodes))


def stale_descendants(records: Records, tenant: str, source_id: str) -> list[LineageNode]:
    """Everything merged or compressed from `source_id`, directly or through other merges and compressions
    (not the unlearning runs' versions made from it)."""
    nodes = _all(records, tenant)
    children = _children(nodes)
    kept = {n: [c for c in cs if nodes.get(c) and nodes[c].job_type in ("merge", "compress")]
            for n, cs in children.items()}
    return _walk(source_id, kept, nodes)


_celery: dict[str, Any] = {}


def _submit_rebuild(records: Records, settings: Any, tenant: str, descendant: LineageNode, old: str, new: str,
                    unlearn_job_id: str) -> str:
    """Re-run the job that made `descendant` with `new` in place of `old`, as the next version of it
    (`rebuilt` records the version when the job succeeds). Returns the job id."""
    from app.jobs.submit import submit
    from app.queue import make_celery
    from app.schemas.jobs import job_create_adapter

    producer = records.get_job(descendant.source_job_id or "", tenant)
    spec = json.loads(json.dumps(producer.spec))
    for item in spec.get("adapters") or []:
        if item["id"] == old:
            item["id"], item["version"] = new, None
    for field in ("adapter", "model", "base_model"):
        if spec.get(field) == old:
            spec[field], spec[f"{field}_version"] = new, None
    celery = _celery.get(settings.redis_url) or _celery.setdefault(settings.redis_url, make_celery(settings))
    key = f"{REBUILD_PREFIX}{descendant.id}:{unlearn_job_id}"
    return submit(records, settings, celery, tenant, job_create_adapter.validate_python(spec),
                  idempotency_key=key).job.id


def _kind_of(records: Records, tenant: str, record_id: str) -> str:
    try:
        records.get_adapter(tenant, record_id)
    except NotFound:
        return "model"
    return "adapter"


def rebuild_children(records: Records, settings: Any, tenant: str, old: str, new: str,
                     unlearn_job_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """Submit a rebuild of each artifact merged or compressed directly from `old`, with `new` substituted:
    ({descendant id: job id}, {descendant id: why it was not rebuilt}). Their own descendants are rebuilt when
    these succeed (`rebuilt`)."""
    nodes = _all(records, tenant)
    children = [c for c in _children(nodes).get(old, []) if nodes[c].job_type in ("merge", "compress")]
    old_kind = nodes[old].kind if old in nodes else _kind_of(records, tenant, old)
    new_kind = _kind_of(records, tenant, new)
    jobs: dict[str, str] = {}
    refused: dict[str, str] = {}
    for child in children:
        node = nodes[child]
        if old_kind != new_kind:
            # a model target unlearned into an adapter over it (output "adapter"): the producing job reads a
            # model (extract's base_model/model), and an adapter cannot stand in for one
            refused[child] = (f"{old} was unlearned into an adapter ({new}), and the {node.job_type} job that made "
                              f"{child} reads a model: rebuild it from a version unlearned with output 'weights'")
            continue
        if not node.source_job_id:
            refused[child] = f"{child} names no job that made it"
            continue
        try:
            jobs[child] = _submit_rebuild(records, settings, tenant, node, old, new, unlearn_job_id)
        except AmendError as error:  # refused at admission (an input gone, quota, a key used differently)
            refused[child] = f"{error.code}: {error.message}"
    return jobs, refused


def rebuilt(records: Records, settings: Any, job: JobRecord) -> None:
    """A rebuild job succeeded: its output becomes the descendant's next version (current at once: the one it
    replaces was made from forgotten data), traced to the unlearning job's requests; then what was made from
    the descendant is rebuilt from the new version in turn."""
    from app.deletion import versions

    _, descendant, unlearn_job_id = (job.idempotency_key or "").split(":", 2)
    output = (job.result.adapter_id or job.result.model_id) if job.result else None
    if not output:
        return
    requests = records.get_job(unlearn_job_id, job.tenant).spec.get("requests") or []
    kind = "adapter" if job.result and job.result.adapter_id else "model"
    previous = versions.add_rebuild(records, job, kind, descendant, output, requests)
    rebuild_children(records, settings, job.tenant, previous, output, unlearn_job_id)
