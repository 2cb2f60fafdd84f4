from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyUsageRequest(_message.Message):
    __slots__ = ("key_id", "model")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    model: str
    def __init__(self, key_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class Limit(_message.Message):
    __slots__ = ("scope", "quota", "name", "kind", "models", "limit", "used", "held", "remaining", "resets_in_seconds", "enforced")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESETS_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENFORCED_FIELD_NUMBER: _ClassVar[int]
    scope: str
    quota: str
    name: str
    kind: str
    models: _containers.RepeatedScalarFieldContainer[str]
    limit: str
    used: str
    held: str
    remaining: str
    resets_in_seconds: float
    enforced: bool
    def __init__(self, scope: _Optional[str] = ..., quota: _Optional[str] = ..., name: _Optional[str] = ..., kind: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., limit: _Optional[str] = ..., used: _Optional[str] = ..., held: _Optional[str] = ..., remaining: _Optional[str] = ..., resets_in_seconds: _Optional[float] = ..., enforced: _Optional[bool] = ...) -> None: ...

class KeyUsageResponse(_message.Message):
    __slots__ = ("key_id", "org", "project", "currency", "spent_today", "spent_this_month", "limits")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ORG_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    SPENT_TODAY_FIELD_NUMBER: _ClassVar[int]
    SPENT_THIS_MONTH_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    org: str
    project: str
    currency: str
    spent_today: str
    spent_this_month: str
    limits: _containers.RepeatedCompositeFieldContainer[Limit]
    def __init__(self, key_id: _Optional[str] = ..., org: _Optional[str] = ..., project: _Optional[str] = ..., currency: _Optional[str] = ..., spent_today: _Optional[str] = ..., spent_this_month: _Optional[str] = ..., limits: _Optional[_Iterable[_Union[Limit, _Mapping]]] = ...) -> None: ...
