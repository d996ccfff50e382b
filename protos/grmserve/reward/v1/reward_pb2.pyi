from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("text", "messages")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    text: str
    messages: ChatMessages
    def __init__(self, text: _Optional[str] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ...) -> None: ...

class Pair(_message.Message):
    __slots__ = ("prompt", "response")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    response: str
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., response: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("pairs", "truncate", "request_id")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[Pair]
    truncate: bool
    request_id: str
    def __init__(self, pairs: _Optional[_Iterable[_Union[Pair, _Mapping]]] = ..., truncate: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "metadata")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    metadata: CallMetadata
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., metadata: _Optional[_Union[CallMetadata, _Mapping]] = ...) -> None: ...

class ScoreCandidatesRequest(_message.Message):
    __slots__ = ("prompt", "responses", "truncate", "request_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    responses: _containers.RepeatedScalarFieldContainer[str]
    truncate: bool
    request_id: str
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., responses: _Optional[_Iterable[str]] = ..., truncate: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class ScoreCandidatesResponse(_message.Message):
    __slots__ = ("scores", "best_index", "metadata")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    BEST_INDEX_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    best_index: int
    metadata: CallMetadata
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., best_index: _Optional[int] = ..., metadata: _Optional[_Union[CallMetadata, _Mapping]] = ...) -> None: ...

class CallMetadata(_message.Message):
    __slots__ = ("request_id", "sequence_tokens", "truncated", "computed_tokens", "queue_seconds", "compute_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sequence_tokens: _containers.RepeatedScalarFieldContainer[int]
    truncated: _containers.RepeatedScalarFieldContainer[bool]
    computed_tokens: int
    queue_seconds: float
    compute_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., sequence_tokens: _Optional[_Iterable[int]] = ..., truncated: _Optional[_Iterable[bool]] = ..., computed_tokens: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "precision", "max_tokens", "max_pairs_per_request", "max_candidates", "head_type", "checkpoint_format", "chat_template", "server_version", "device", "max_message_bytes")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_PAIRS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    HEAD_TYPE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    precision: str
    max_tokens: int
    max_pairs_per_request: int
    max_candidates: int
    head_type: str
    checkpoint_format: str
    chat_template: bool
    server_version: str
    device: str
    max_message_bytes: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., precision: _Optional[str] = ..., max_tokens: _Optional[int] = ..., max_pairs_per_request: _Optional[int] = ..., max_candidates: _Optional[int] = ..., head_type: _Optional[str] = ..., checkpoint_format: _Optional[str] = ..., chat_template: _Optional[bool] = ..., server_version: _Optional[str] = ..., device: _Optional[str] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...
