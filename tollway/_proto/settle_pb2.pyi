from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SettleRequest(_message.Message):
    __slots__ = ("key_id", "model", "reserved_tokens", "actual_tokens", "charged_at_ms")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESERVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHARGED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    model: str
    reserved_tokens: int
    actual_tokens: int
    charged_at_ms: int
    def __init__(self, key_id: _Optional[str] = ..., model: _Optional[str] = ..., reserved_tokens: _Optional[int] = ..., actual_tokens: _Optional[int] = ..., charged_at_ms: _Optional[int] = ...) -> None: ...

class SettleResponse(_message.Message):
    __slots__ = ("delta", "counters")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    delta: int
    counters: int
    def __init__(self, delta: _Optional[int] = ..., counters: _Optional[int] = ...) -> None: ...
