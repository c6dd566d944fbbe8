"""Validate a Hugging Face transformers model before anything is stored — without torch.

Two ways in, one set of rules for the files:
- `extract_archive`: a tar (optionally gzip) read in one streaming pass. Refused: absolute paths, `..`
  components, symlinks, hard links, devices and FIFOs, nested directories (one top-level directory is
  stripped), duplicate names, more than `max_files` files, more than `max_bytes` uncompressed bytes (a tar
  bomb is refused from the member headers before its bytes are written, and the copy is bounded too).
  Hidden files (.DS_Store, ._* AppleDouble files) and documentation (README, LICENSE, NOTICE, *.md — what a
  Hugging Face snapshot carries beside the model) are skipped, never stored (`skipped`).
- `collect_directory`: a directory under an operator-configured root (AMEND_MODEL_ROOTS). The resolved
  path must lie inside a root (403 otherwise), and so must every symlink's target.

Files (`check_name`): pickle checkpoints (`.bin`, `.pt`, `.pth`, `.pkl`, `.ckpt`) are 415 — loading them
runs code; Python files are custom code and refused; anything else not on the allowlist (config, generation
config, `*.safetensors` and their index, tokenizer and preprocessor files) is refused as an unknown type.

`validate_model_files` then checks `config.json` — one architecture naming the family (`*ForCausalLM` ->
causal_lm, `*ForSequenceClassification` / `*ForImageClassification` -> classifier), no `auto_map` (custom
code needs trust_remote_code, which Amend never enables) — and every safetensors file's header, dtypes and
finiteness with the adapter checks.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from app.audit import canonical_json
from app.checks.adapter import ALL_DTYPES, check_finite, read_header
from app.errors import Forbidden, InvalidModel, NotFound, PayloadTooLarge, UnsupportedMediaType
from app.publish import publish
from app.schemas.lineage import Parent
from app.schemas.models import ModelFile, ModelRecord
from app.uploads import PICKLE_SUFFIXES

if TYPE_CHECKING:
    from app.records import Records
    from app.settings import Settings

CODE_SUFFIXES = (".py", ".pyc", ".so", ".sh")
KNOWN_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "preprocessor_config.json",
        "image_processor_config.json",
        "chat_template.jinja",
        "chat_template.json",
    }
)
TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model",
     "sentencepiece.bpe.model"}
)
JSON_FILES_WITH_AUTO_MAP = ("config.json", "tokenizer_config.json", "preprocessor_config.json",
                            "image_processor_config.json")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelSummary:
    family: str
    architecture: str
    model_type: str
    num_labels: int | None
    has_tokenizer: bool


_DOCUMENTATION = re.compile(r"^((readme|license|licence|notice|copying)(\.(md|txt|rst))?|[^/]*\.md)$", re.IGNORECASE)


def skipped(name: str) -> bool:
    """Files a model directory or archive may carry that are neither read nor stored: hidden files and
    documentation. Pickle checkpoints are not among them: they are refused, so nobody assumes they were used."""
    return name.startswith(".") or _DOCUMENTATION.match(name) is not None


def check_name(name: str) -> None:
    """Refuse a file by name: pickle (415), code, or anything not on the allowlist (400)."""
    lower = name.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise UnsupportedMediaType(
            f"{name!r} is a pickle checkpoint; loading it would run code. Save the model with "
            "safe_serialization=True (model.safetensors) instead."
        )
    if lower.endswith(CODE_SUFFIXES):
        raise InvalidModel(
            f"{name!r} is code: custom model code needs trust_remote_code, which Amend never enables",
            code="custom_code",
        )
    if not _NAME.match(name):
        raise InvalidModel(f"file name {name!r} is not allowed (letters, digits, '.', '_', '-')")
    if name not in KNOWN_FILES and not lower.endswith(".safetensors"):
        raise InvalidModel(
            f"unknown file type {name!r}: a model holds config.json, *.safetensors and tokenizer files only"
        )


def _member_parts(name: str) -> tuple[str, ...]:
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise InvalidModel(f"archive member {name!r} has an absolute path")
    if "\\" in name or "\x00" in name:
        raise InvalidModel(f"archive member {name!r} has a malformed path")
    parts = tuple(part for part in PurePosixPath(name).parts if part not in ("", "."))
    if ".." in parts:
        raise InvalidModel(f"archive member {name!r} escapes the archive ('..' path)")
    return parts


def extract_archive(archive: Path, dest: Path, *, max_files: int, max_bytes: int) -> dict[str, Path]:
    """Stream a tar(.gz) into `dest`, checking every member; returns file name -> extracted path."""
    staged: list[tuple[tuple[str, ...], Path]] = []
    total = 0
    entries = 0
    dest.mkdir(parents=True, exist_ok=True)
    try:
        tar = tarfile.open(archive, mode="r|*")
    except (tarfile.TarError, OSError, EOFError):
        raise InvalidModel("the archive is not a tar or tar.gz file") from None
    try:
        with tar:
            for member in tar:
                entries += 1
                if entries > max_files + 64:
                    raise InvalidModel(f"the archive has more than {max_files} files")
                parts = _member_parts(member.name)
                if member.issym() or member.islnk():
                    raise InvalidModel(f"archive member {member.name!r} is a link; links are refused")
                if member.isdir():
                    continue
                if not member.isreg():
                    raise InvalidModel(f"archive member {member.name!r} is not a regular file (device or FIFO)")
                if not parts:
                    raise InvalidModel(f"archive member {member.name!r} has an empty path")
                if len(parts) > 2:
                    raise InvalidModel(f"archive member {member.name!r} is nested: put the files at the top level")
                if skipped(parts[-1]):
                    continue  # .DS_Store, ._* AppleDouble, .gitattributes, README.md: never extracted, never stored
                check_name(parts[-1])
                if len(staged) >= max_files:
                    raise InvalidModel(f"the archive has more than {max_files} files")
                total += member.size
                if total > max_bytes:
                    raise PayloadTooLarge(f"the archive expands to more than {max_bytes} bytes")
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - regular files always have data
                    raise InvalidModel(f"archive member {member.name!r} has no data")
                target = dest / f"member-{len(staged)}"
                with source, target.open("wb") as sink:
                    shutil.copyfileobj(source, sink, _COPY_CHUNK)
                if target.stat().st_size != member.size:
                    raise InvalidModel(f"archive member {member.name!r} is truncated")
                staged.append((parts, target))
    except (tarfile.TarError, EOFError, OSError) as error:
        raise InvalidModel(f"the archive is corrupt: {error}") from None
    if not staged:
        raise InvalidModel("the archive holds no files")
    tops = {parts[0] for parts, _ in staged if len(parts) == 2}
    if tops and (len(tops) > 1 or any(len(parts) == 1 for parts, _ in staged)):
        raise InvalidModel("the archive mixes directories: put every file at the top level or in one directory")
    files: dict[str, Path] = {}
    for parts, target in staged:
        name = parts[-1]
        if name in files:
            raise InvalidModel(f"the archive holds {name!r} twice")
        final = dest / name
        target.rename(final)
        files[name] = final
    return files


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def collect_directory(path: str, roots: list[str], *, max_files: int, max_bytes: int) -> dict[str, Path]:
    """The files of a directory under one of `roots`; returns file name -> path (symlinks resolved)."""
    if not roots:
        raise Forbidden("registering models by path is disabled: the operator has set no AMEND_MODEL_ROOTS")
    if "\x00" in path:
        raise InvalidModel("path contains a NUL byte")
    requested = Path(path)
    if not requested.is_absolute():
        raise InvalidModel("path must be absolute")
    resolved_roots = [Path(root).resolve() for root in roots]
    try:
        directory = requested.resolve(strict=True)
    except (RuntimeError, OSError, ValueError):  # missing, a symlink loop, unreadable
        directory = None
    root = next((r for r in resolved_roots if directory is not None and _inside(directory, r)), None)
    if root is None or directory is None:
        # the same answer whether the path is missing or outside: no probing of the file system
        raise Forbidden(f"{path!r} is not a directory under the configured model roots")
    if not directory.is_dir():
        raise NotFound(f"{path!r} is not a directory")
    files: dict[str, Path] = {}
    total = 0
    for entry in sorted(directory.iterdir()):
        if skipped(entry.name):
            continue  # .git, .cache, hidden editor files, README.md, LICENSE
        target = entry.resolve()
        if not _inside(target, root):
            raise Forbidden(f"{entry.name!r} is a symlink that leaves the model root")
        if target.is_dir():
            raise InvalidModel(f"{entry.name!r} is a directory: put the model's files at the top level")
        if not target.is_file():
            raise InvalidModel(f"{entry.name!r} is not a regular file")
        check_name(entry.name)
        files[entry.name] = target
        if len(files) > max_files:
            raise InvalidModel(f"the directory has more than {max_files} files")
        total += target.stat().st_size
        if total > max_bytes:
            raise PayloadTooLarge(f"the model's files exceed {max_bytes} bytes")
    if not files:
        raise InvalidModel("the directory holds no model files")
    return files


def _read_json(name: str, path: Path, max_bytes: int) -> dict[str, Any]:
    if path.stat().st_size > max_bytes:
        raise PayloadTooLarge(f"{name} is larger than {max_bytes} bytes")
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidModel(f"{name} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidModel(f"{name} must be a JSON object")
    return value


def family_of(architecture: str) -> str:
    if architecture.endswith("ForCausalLM"):
        return "causal_lm"
    if architecture.endswith(("ForSequenceClassification", "ForImageClassification")):
        return "classifier"
    raise InvalidModel(
        f"architecture {architecture!r} is not supported: use a *ForCausalLM, *ForSequenceClassification "
        "or *ForImageClassification model"
    )


def parse_model_config(config: dict[str, Any]) -> tuple[str, str, str, int | None]:
    """(family, architecture, model_type, num_labels) from a transformers config.json."""
    if "auto_map" in config:
        raise InvalidModel(
            "config.json has auto_map: the model needs custom code (trust_remote_code), which Amend never "
            "enables; register a model whose architecture transformers ships",
            code="custom_code",
        )
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and len(architectures) == 1 and isinstance(architectures[0], str)):
        raise InvalidModel("config.json must name exactly one architecture in 'architectures'")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise InvalidModel("config.json has no model_type")
    architecture = architectures[0]
    family = family_of(architecture)
    num_labels: int | None = None
    if family == "classifier":
        id2label = config.get("id2label")
        raw = len(id2label) if isinstance(id2label, dict) and id2label else config.get("num_labels", 2)
        if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= 1_000_000:
            raise InvalidModel("config.json: num_labels must be a positive integer")
        num_labels = raw
    return family, architecture, model_type, num_labels


def validate_model_files(
    files: dict[str, Path], *, max_config_bytes: int, max_header_bytes: int, max_tensors: int
) -> ModelSummary:
    """Check a model's files (already collected and name-checked); returns what its record shows."""
    for name in files:
        check_name(name)
    if "config.json" not in files:
        raise InvalidModel("the model has no config.json")
    for name in JSON_FILES_WITH_AUTO_MAP:
        if name in files and name != "config.json" and "auto_map" in _read_json(name, files[name], max_config_bytes):
            raise InvalidModel(
                f"{name} has auto_map: it needs custom code (trust_remote_code), which Amend never enables",
                code="custom_code",
            )
    family, architecture, model_type, num_labels = parse_model_config(
        _read_json("config.json", files["config.json"], max_config_bytes)
    )
    weights = sorted(name for name in files if name.lower().endswith(".safetensors"))
    if not weights:
        raise InvalidModel("the model has no *.safetensors weights")
    for name in weights:
        path = files[name]
        tensors = read_header(path, max_header_bytes, max_tensors, dtypes=ALL_DTYPES, error=InvalidModel)
        with path.open("rb") as source:
            (header_len,) = struct.unpack("<Q", source.read(8))
        check_finite(path, tensors, 8 + header_len, error=InvalidModel)
    if "model.safetensors.index.json" in files:
        index = _read_json("model.safetensors.index.json", files["model.safetensors.index.json"], max_header_bytes)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InvalidModel("model.safetensors.index.json has no valid weight_map")
        missing = sorted(set(weight_map.values()) - set(weights))
        if missing:
            raise InvalidModel(f"model.safetensors.index.json names missing shards {missing[:5]}")
    return ModelSummary(
        family=family,
        architecture=architecture,
        model_type=model_type,
        num_labels=num_labels,
        has_tokenizer=bool(TOKENIZER_FILES & set(files)),
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_sha256(files: list[ModelFile]) -> str:
    """A model's identity: SHA-256 of the canonical JSON list of {name, size, sha256}, sorted by name."""
    listing = [item.model_dump() for item in sorted(files, key=lambda f: f.name)]
    return hashlib.sha256(canonical_json(listing)).hexdigest()


def store_archive(
    records: Records, settings: Settings, *, tenant: str, model_id: str, archive: Path, scratch: Path, name: str
) -> ModelRecord:
    """Register an uploaded tar(.gz) (direct or presigned): extract it into `scratch`, checked, then `store_model`."""
    files = extract_archive(
        archive, scratch / "files", max_files=settings.max_model_files, max_bytes=settings.max_model_bytes
    )
    archive.unlink()
    return store_model(records, settings, tenant=tenant, model_id=model_id, files=files, name=name, source="upload")


def store_model(
    records: Records,
    settings: Settings,
    *,
    tenant: str,
    model_id: str,
    files: dict[str, Path],
    name: str,
    source: str,
    source_job_id: str | None = None,
    parents: list[Parent] | None = None,
) -> ModelRecord:
    """Validate `files`, then publish them under keys.model(tenant, id, "files/<name>") and the record last
    (`app.publish.publish`: counted against the quota, undone on failure)."""
    summary = validate_model_files(
        files,
        max_config_bytes=settings.max_config_bytes,
        max_header_bytes=settings.max_safetensors_header_bytes,
        max_tensors=settings.max_tensors,
    )
    size = sum(path.stat().st_size for path in files.values())
    ordered = sorted(files.items())

    def record(digests: dict[str, str]) -> ModelRecord:
        stored = [
            ModelFile(name=file_name, size=path.stat().st_size, sha256=digests[f"files/{file_name}"])
            for file_name, path in ordered
        ]
        return ModelRecord(
            id=model_id,
            tenant=tenant,
            name=name,
            family=summary.family,  # type: ignore[arg-type]
            architecture=summary.architecture,
            model_type=summary.model_type,
            num_labels=summary.num_labels,
            has_tokenizer=summary.has_tokenizer,
            files=stored,
            size_bytes=size,
            sha256=manifest_sha256(stored),
            source=source,  # type: ignore[arg-type]
            source_job_id=source_job_id,
            parents=parents or [],
            created_at=datetime.now(UTC),
        )

    return publish(
        records,
        "models",
        tenant=tenant,
        resource_id=model_id,
        files={f"files/{file_name}": path for file_name, path in ordered},
        record=record,
        size=size,
        limit=settings.max_bytes_per_tenant,
        hint="delete models or adapters first",
    )
