"""The registry and the API contract list the same methods, with the same parameter models."""

from __future__ import annotations

from typing import get_args

from app.main import create_app
from app.schemas.compress import COMPRESS_PARAMS, CompressMethod
from app.schemas.jobs import MergeMethod, UnlearnMethod
from app.schemas.merge import MERGE_PARAMS
from app.schemas.unlearn import UNLEARN_PARAMS
from workers.engines import registry


def test_merge_methods_match_the_api_schema():
    assert registry.names("merge") == sorted(get_args(MergeMethod)) == sorted(MERGE_PARAMS)
    for name in registry.names("merge"):
        assert registry.get("merge", name).params_model is MERGE_PARAMS[name]


def test_unlearn_methods_match_the_api_schema():
    assert registry.names("unlearn") == sorted(get_args(UnlearnMethod)) == sorted(UNLEARN_PARAMS)
    for name in registry.names("unlearn"):
        assert registry.get("unlearn", name).params_model is UNLEARN_PARAMS[name]


def test_compress_methods_match_the_api_schema():
    assert registry.names("compress") == sorted(get_args(CompressMethod)) == sorted(COMPRESS_PARAMS)
    for name in registry.names("compress"):
        assert registry.get("compress", name).params_model is COMPRESS_PARAMS[name]


def test_openapi_enumerates_the_registered_methods():
    schemas = create_app().openapi()["components"]["schemas"]
    merge_enum = schemas["MergeJobCreate"]["properties"]["method"]["enum"]
    assert sorted(merge_enum) == registry.names("merge")
    compress_enum = schemas["CompressJobCreate"]["properties"]["method"]["enum"]
    assert sorted(compress_enum) == registry.names("compress")


def test_unknown_method_is_a_typed_error():
    import pytest

    with pytest.raises(registry.UnknownMethod):
        registry.get("merge", "linear")
