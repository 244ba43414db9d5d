import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("session_id", "seq", "values", "reset")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    values: _containers.RepeatedScalarFieldContainer[float]
    reset: bool
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ..., reset: _Optional[bool] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("session_ids", "seqs", "values", "resets")
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    RESETS_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    seqs: _containers.RepeatedScalarFieldContainer[int]
    values: bytes
    resets: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ..., seqs: _Optional[_Iterable[int]] = ..., values: _Optional[bytes] = ..., resets: _Optional[_Iterable[bool]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("events", "include_state", "batch", "model", "model_version")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    include_state: bool
    batch: EventBatch
    model: str
    model_version: int
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., include_state: _Optional[bool] = ..., batch: _Optional[_Union[EventBatch, _Mapping]] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class NamedState(_message.Message):
    __slots__ = ("name", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("session_id", "seq", "step", "output", "duplicate", "code", "error", "hidden", "cell", "states", "model_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    step: int
    output: _containers.RepeatedScalarFieldContainer[float]
    duplicate: bool
    code: int
    error: str
    hidden: _containers.RepeatedScalarFieldContainer[float]
    cell: _containers.RepeatedScalarFieldContainer[float]
    states: _containers.RepeatedCompositeFieldContainer[NamedState]
    model_version: int
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., step: _Optional[int] = ..., output: _Optional[_Iterable[float]] = ..., duplicate: _Optional[bool] = ..., code: _Optional[int] = ..., error: _Optional[str] = ..., hidden: _Optional[_Iterable[float]] = ..., cell: _Optional[_Iterable[float]] = ..., states: _Optional[_Iterable[_Union[NamedState, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...

class ResultBatch(_message.Message):
    __slots__ = ("steps", "outputs", "codes", "duplicates", "errors", "model_versions")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedScalarFieldContainer[int]
    outputs: bytes
    codes: _containers.RepeatedScalarFieldContainer[int]
    duplicates: _containers.RepeatedScalarFieldContainer[bool]
    errors: _containers.RepeatedScalarFieldContainer[str]
    model_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, steps: _Optional[_Iterable[int]] = ..., outputs: _Optional[bytes] = ..., codes: _Optional[_Iterable[int]] = ..., duplicates: _Optional[_Iterable[bool]] = ..., errors: _Optional[_Iterable[str]] = ..., model_versions: _Optional[_Iterable[int]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("results", "batch", "code", "error")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    batch: ResultBatch
    code: int
    error: str
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ..., batch: _Optional[_Union[ResultBatch, _Mapping]] = ..., code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("session_id", "model")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "step", "last_seq", "hidden", "cell", "created", "updated", "output", "states", "model", "model_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    last_seq: int
    hidden: _containers.RepeatedScalarFieldContainer[float]
    cell: _containers.RepeatedScalarFieldContainer[float]
    created: _timestamp_pb2.Timestamp
    updated: _timestamp_pb2.Timestamp
    output: _containers.RepeatedScalarFieldContainer[float]
    states: _containers.RepeatedCompositeFieldContainer[NamedState]
    model: str
    model_version: int
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., last_seq: _Optional[int] = ..., hidden: _Optional[_Iterable[float]] = ..., cell: _Optional[_Iterable[float]] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., output: _Optional[_Iterable[float]] = ..., states: _Optional[_Iterable[_Union[NamedState, _Mapping]]] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelArchitecture(_message.Message):
    __slots__ = ("cell", "layers", "hidden_size", "proj_size", "head", "output_activation", "source_framework", "source_file")
    CELL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROJ_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FRAMEWORK_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FILE_FIELD_NUMBER: _ClassVar[int]
    cell: str
    layers: int
    hidden_size: int
    proj_size: int
    head: str
    output_activation: str
    source_framework: str
    source_file: str
    def __init__(self, cell: _Optional[str] = ..., layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., proj_size: _Optional[int] = ..., head: _Optional[str] = ..., output_activation: _Optional[str] = ..., source_framework: _Optional[str] = ..., source_file: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("event_size", "hidden_size", "output_size", "exporter_version", "fingerprint", "execution_provider", "source", "state_names", "onnxruntime_version", "live_sessions", "max_sessions", "state_sizes", "architecture", "metadata", "model", "version", "versions", "retire_policy")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPORTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_NAMES_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    STATE_SIZES_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    RETIRE_POLICY_FIELD_NUMBER: _ClassVar[int]
    event_size: int
    hidden_size: int
    output_size: int
    exporter_version: str
    fingerprint: str
    execution_provider: str
    source: str
    state_names: _containers.RepeatedScalarFieldContainer[str]
    onnxruntime_version: str
    live_sessions: int
    max_sessions: int
    state_sizes: _containers.RepeatedScalarFieldContainer[int]
    architecture: ModelArchitecture
    metadata: _containers.ScalarMap[str, str]
    model: str
    version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    retire_policy: str
    def __init__(self, event_size: _Optional[int] = ..., hidden_size: _Optional[int] = ..., output_size: _Optional[int] = ..., exporter_version: _Optional[str] = ..., fingerprint: _Optional[str] = ..., execution_provider: _Optional[str] = ..., source: _Optional[str] = ..., state_names: _Optional[_Iterable[str]] = ..., onnxruntime_version: _Optional[str] = ..., live_sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., state_sizes: _Optional[_Iterable[int]] = ..., architecture: _Optional[_Union[ModelArchitecture, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., retire_policy: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersionStatus(_message.Message):
    __slots__ = ("model", "version", "state", "reason", "live_sessions", "newest")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    state: str
    reason: str
    live_sessions: int
    newest: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., live_sessions: _Optional[int] = ..., newest: _Optional[bool] = ...) -> None: ...

class ModelList(_message.Message):
    __slots__ = ("versions", "default_model")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionStatus]
    default_model: str
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersionStatus, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("session_id", "model", "to_version", "mode")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    to_version: int
    mode: str
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., to_version: _Optional[int] = ..., mode: _Optional[str] = ...) -> None: ...
