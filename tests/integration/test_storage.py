"""The storage client against a real S3 server (SeaweedFS checks signatures and SHA-256 checksums)."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from app.errors import NotFound
from app.storage import Storage

pytestmark = pytest.mark.integration


@pytest.fixture
def storage(stack):
    settings = stack.settings("k:t").model_copy(
        update={"s3_multipart_threshold": 5 * 2**20, "s3_multipart_chunk": 5 * 2**20}
    )
    store = Storage(settings)
    store.ensure_bucket()
    return store


def test_multipart_stream_round_trip_with_checksums(storage):
    payload = os.urandom(12 * 2**20 + 123)  # three parts
    digest = storage.put_file("t/big.bin", io.BytesIO(payload))
    assert digest == hashlib.sha256(payload).hexdigest()
    assert storage.size("t/big.bin") == len(payload)
    assert b"".join(storage.iter_chunks("t/big.bin", 1 << 20)) == payload
    assert b"".join(storage.iter_range("t/big.bin", 5 * 2**20 - 7, 2**20 + 11, 4096)) == payload[
        5 * 2**20 - 7 : 6 * 2**20 + 4
    ]  # a range across a part boundary
    assert storage.get_range_and_size("t/big.bin", 3, 5) == (payload[3:8], len(payload))


def test_small_put_json_list_and_delete_prefix(storage):
    storage.put_json("t/p/a.json", {"a": 1})
    storage.put_bytes("t/p/b.bin", b"xyz")
    assert storage.get_json("t/p/a.json") == {"a": 1}
    assert sorted(storage.list_keys("t/p/")) == ["t/p/a.json", "t/p/b.bin"]
    assert storage.delete_prefix("t/p/") == 2
    assert list(storage.list_keys("t/p/")) == []
    with pytest.raises(NotFound):
        storage.get_bytes("t/p/a.json")
    assert not storage.exists("t/p/b.bin")


def test_wrong_checksum_is_rejected_by_the_server(storage):
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError):
        storage.client.put_object(
            Bucket=storage.bucket, Key="t/bad", Body=b"data",
            ChecksumSHA256="AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )
    assert not storage.exists("t/bad")


def test_failed_multipart_upload_leaves_nothing(storage):
    class Broken(io.BytesIO):
        calls = 0

        def read(self, size=-1):
            Broken.calls += 1
            if Broken.calls > 2:
                raise OSError("client went away")
            return super().read(size)

    with pytest.raises(OSError):
        storage.put_file("t/partial.bin", Broken(os.urandom(16 * 2**20)))
    assert not storage.exists("t/partial.bin")
