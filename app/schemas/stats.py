"""`GET /v1/stats`: the live workers (from their heartbeats) and the queues' lengths."""

from __future__ import annotations

from pydantic import BaseModel, Field


class WorkerDevicePublic(BaseModel):
    spec: str = Field(description="AMEND_DEVICE as configured: auto, cpu, cuda, cuda:N.")
    device: str = Field(description="The resolved device: cpu or cuda:N.")
    class_: str = Field(alias="class", description="cpu or cuda: the device class that picks the queues.")
    name: str = Field(description="The GPU's or CPU's name.")
    total_memory: int = Field(description="Bytes.")
    free_memory: int = Field(description="Bytes free at the last heartbeat.")


class WorkerPublic(BaseModel):
    name: str
    host: str
    pid: int
    queues: list[str]
    device: WorkerDevicePublic
    started_at: float = Field(description="Unix seconds.")
    seen_at: float = Field(description="Unix seconds of the last heartbeat.")


class StatsPublic(BaseModel):
    jobs: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="The caller's tenant's jobs by state, then by type (zeros left out).")
    workers: list[WorkerPublic]
    queues: dict[str, int] = Field(description="Messages waiting in each job queue.")
