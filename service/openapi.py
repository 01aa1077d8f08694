"""What Litestar's generated OpenAPI document leaves out, filled in from the models.

Request models that refuse unknown fields say so; every field shows its bounds, also
inside `X | None` (Litestar drops them there), and those that come from settings; the
streaming routes show their text/event-stream bodies.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Parameter,
    Schema,
)

from service.protocol import REQUEST_MODELS, STRICT_REQUESTS
from service.settings import Settings

# one server-sent event, as clients parse it: `data` holds a JSON document
SSE_EVENT = Schema(
    type=OpenAPIType.OBJECT,
    properties={
        "data": Schema(type=OpenAPIType.STRING, description="JSON: a token, done or error event"),
        "event": Schema(type=OpenAPIType.STRING),
        "id": Schema(type=OpenAPIType.STRING),
        "retry": Schema(type=OpenAPIType.INTEGER),
    },
    required=["data"],
)


_BOUNDS = {
    "minimum": "minimum",
    "maximum": "maximum",
    "exclusiveMinimum": "exclusive_minimum",
    "exclusiveMaximum": "exclusive_maximum",
    "minLength": "min_length",
    "maxLength": "max_length",
    "minItems": "min_items",
    "maxItems": "max_items",
    "minProperties": "min_properties",
    "maxProperties": "max_properties",
}


def _copy_bounds(source: dict[str, Any], target: Schema) -> None:
    """Copy the bounds of pydantic's JSON schema for a field onto Litestar's, branch by
    branch: Litestar drops the bounds inside `X | None` and other unions."""
    for key, attribute in _BOUNDS.items():
        if key in source:
            setattr(target, attribute, source[key])
    branches = source.get("anyOf") or source.get("oneOf") or []
    if target.one_of is not None and len(branches) == len(target.one_of):
        for branch, schema in zip(branches, target.one_of, strict=True):
            if isinstance(schema, Schema):
                _copy_bounds(branch, schema)
    if isinstance(source.get("items"), dict) and isinstance(target.items, Schema):
        _copy_bounds(source["items"], target.items)
    # a mapping's values, and its keys
    values = source.get("additionalProperties")
    if isinstance(values, dict) and isinstance(target.additional_properties, Schema):
        _copy_bounds(values, target.additional_properties)
    keys = source.get("propertyNames")
    if isinstance(keys, dict) and target.property_names is None:
        target.property_names = Schema(type=OpenAPIType.STRING)
        _copy_bounds(keys, target.property_names)


def complete_openapi(app: Litestar, settings: Settings) -> None:
    """What Litestar's generated document leaves out: closed request models, the limits
    that come from settings, and the SSE bodies."""
    schema = app.openapi_schema
    components = schema.components.schemas if schema.components else {}
    for model in STRICT_REQUESTS:
        if model.__name__ in components:
            components[model.__name__].additional_properties = False
    limits = {
        "max_tokens": settings.max_new_tokens,
        "max_completion_tokens": settings.max_new_tokens,
        "logprobs": settings.max_logprobs,
        "top_logprobs": settings.max_logprobs,
    }
    for model in REQUEST_MODELS:
        target = components.get(model.__name__)
        if target is None or target.properties is None:
            continue
        wanted = model.model_json_schema()["properties"]
        for field, prop in target.properties.items():
            if isinstance(prop, Schema) and field in wanted:
                _copy_bounds(wanted[field], prop)
                if field in limits:
                    for branch in prop.one_of or [prop]:
                        if isinstance(branch, Schema) and branch.type == OpenAPIType.INTEGER:
                            branch.maximum = limits[field]
                    prop.maximum = None
    peek = schema.paths.get("/v1/sessions/{session_id}/next") if schema.paths else None
    for parameter in (peek.get.parameters or []) if peek is not None and peek.get else []:
        top = isinstance(parameter, Parameter) and parameter.name == "top"
        if top and isinstance(parameter, Parameter) and isinstance(parameter.schema, Schema):
            parameter.schema.maximum = settings.max_logprobs
    for path in ("/v1/generate", "/v1/completions", "/v1/chat/completions"):
        item = schema.paths.get(path) if schema.paths else None
        operation = item.post if item is not None else None
        if operation is None or operation.responses is None:
            continue
        ok = operation.responses.get("200")
        if isinstance(ok, OpenAPIResponse) and ok.content is not None:
            ok.content["text/event-stream"] = OpenAPIMediaType(schema=SSE_EVENT)
