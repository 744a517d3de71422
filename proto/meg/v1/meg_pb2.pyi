from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PayloadKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYLOAD_KIND_UNSPECIFIED: _ClassVar[PayloadKind]
    PAYLOAD_KIND_DIGITAL: _ClassVar[PayloadKind]
    PAYLOAD_KIND_ANALOG: _ClassVar[PayloadKind]
PAYLOAD_KIND_UNSPECIFIED: PayloadKind
PAYLOAD_KIND_DIGITAL: PayloadKind
PAYLOAD_KIND_ANALOG: PayloadKind

class ChannelSpec(_message.Message):
    __slots__ = ("model", "params", "bandwidth_hz", "delay_ms", "modulation", "seed", "fec", "code_rate", "csi", "pilots", "feedback_delay_ms", "snr_trace_db", "trace_step_ms")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_HZ_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MODULATION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FEC_FIELD_NUMBER: _ClassVar[int]
    CODE_RATE_FIELD_NUMBER: _ClassVar[int]
    CSI_FIELD_NUMBER: _ClassVar[int]
    PILOTS_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    SNR_TRACE_DB_FIELD_NUMBER: _ClassVar[int]
    TRACE_STEP_MS_FIELD_NUMBER: _ClassVar[int]
    model: str
    params: _containers.ScalarMap[str, float]
    bandwidth_hz: float
    delay_ms: float
    modulation: str
    seed: int
    fec: str
    code_rate: float
    csi: str
    pilots: int
    feedback_delay_ms: float
    snr_trace_db: _containers.RepeatedScalarFieldContainer[float]
    trace_step_ms: float
    def __init__(self, model: _Optional[str] = ..., params: _Optional[_Mapping[str, float]] = ..., bandwidth_hz: _Optional[float] = ..., delay_ms: _Optional[float] = ..., modulation: _Optional[str] = ..., seed: _Optional[int] = ..., fec: _Optional[str] = ..., code_rate: _Optional[float] = ..., csi: _Optional[str] = ..., pilots: _Optional[int] = ..., feedback_delay_ms: _Optional[float] = ..., snr_trace_db: _Optional[_Iterable[float]] = ..., trace_step_ms: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "seed", "steps", "guidance_scale", "codec", "codec_params", "channel", "split_step", "reference", "height", "width", "csi")
    class CodecParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CODEC_PARAMS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    SPLIT_STEP_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CSI_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    codec: str
    codec_params: _containers.ScalarMap[str, str]
    channel: ChannelSpec
    split_step: int
    reference: bool
    height: int
    width: int
    csi: ChannelStateInfo
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., codec: _Optional[str] = ..., codec_params: _Optional[_Mapping[str, str]] = ..., channel: _Optional[_Union[ChannelSpec, _Mapping]] = ..., split_step: _Optional[int] = ..., reference: _Optional[bool] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., csi: _Optional[_Union[ChannelStateInfo, _Mapping]] = ...) -> None: ...

class ChannelStateInfo(_message.Message):
    __slots__ = ("snr_estimate_db", "pilot_symbols", "age_ms")
    SNR_ESTIMATE_DB_FIELD_NUMBER: _ClassVar[int]
    PILOT_SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    AGE_MS_FIELD_NUMBER: _ClassVar[int]
    snr_estimate_db: float
    pilot_symbols: int
    age_ms: float
    def __init__(self, snr_estimate_db: _Optional[float] = ..., pilot_symbols: _Optional[int] = ..., age_ms: _Optional[float] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("queue_ms", "text_encode_ms", "denoise_ms", "encode_ms", "batch_size")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    DENOISE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    text_encode_ms: float
    denoise_ms: float
    encode_ms: float
    batch_size: int
    def __init__(self, queue_ms: _Optional[float] = ..., text_encode_ms: _Optional[float] = ..., denoise_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class StreamHeader(_message.Message):
    __slots__ = ("wire_version", "request_id", "model_id", "codec_id", "codec_params", "tensors", "payload_kind", "payload_bytes", "payload_symbols", "timings", "split_step", "total_steps", "guidance_scale", "prompt", "codec_set", "codec_set_hash", "choice")
    class CodecParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WIRE_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    CODEC_PARAMS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CODEC_SET_FIELD_NUMBER: _ClassVar[int]
    CODEC_SET_HASH_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    wire_version: str
    request_id: str
    model_id: str
    codec_id: str
    codec_params: _containers.ScalarMap[str, str]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    payload_kind: PayloadKind
    payload_bytes: int
    payload_symbols: int
    timings: StageTimings
    split_step: int
    total_steps: int
    guidance_scale: float
    prompt: str
    codec_set: str
    codec_set_hash: str
    choice: CodecChoice
    def __init__(self, wire_version: _Optional[str] = ..., request_id: _Optional[str] = ..., model_id: _Optional[str] = ..., codec_id: _Optional[str] = ..., codec_params: _Optional[_Mapping[str, str]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., payload_kind: _Optional[_Union[PayloadKind, str]] = ..., payload_bytes: _Optional[int] = ..., payload_symbols: _Optional[int] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., split_step: _Optional[int] = ..., total_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., prompt: _Optional[str] = ..., codec_set: _Optional[str] = ..., codec_set_hash: _Optional[str] = ..., choice: _Optional[_Union[CodecChoice, _Mapping]] = ...) -> None: ...

class CodecChoice(_message.Message):
    __slots__ = ("chosen", "reason", "snr_estimate_db", "modulation", "fec", "code_rate", "expected_quality")
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SNR_ESTIMATE_DB_FIELD_NUMBER: _ClassVar[int]
    MODULATION_FIELD_NUMBER: _ClassVar[int]
    FEC_FIELD_NUMBER: _ClassVar[int]
    CODE_RATE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_QUALITY_FIELD_NUMBER: _ClassVar[int]
    chosen: str
    reason: str
    snr_estimate_db: float
    modulation: str
    fec: str
    code_rate: float
    expected_quality: float
    def __init__(self, chosen: _Optional[str] = ..., reason: _Optional[str] = ..., snr_estimate_db: _Optional[float] = ..., modulation: _Optional[str] = ..., fec: _Optional[str] = ..., code_rate: _Optional[float] = ..., expected_quality: _Optional[float] = ...) -> None: ...

class PayloadChunk(_message.Message):
    __slots__ = ("seq", "data", "symbols")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    data: bytes
    symbols: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, seq: _Optional[int] = ..., data: _Optional[bytes] = ..., symbols: _Optional[_Iterable[float]] = ...) -> None: ...

class ReferenceFeatures(_message.Message):
    __slots__ = ("tensors", "float32_data")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    FLOAT32_DATA_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    float32_data: bytes
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., float32_data: _Optional[bytes] = ...) -> None: ...

class ChannelReport(_message.Message):
    __slots__ = ("model", "snr_db", "bandwidth_hz", "delay_ms", "symbols", "airtime_ms", "bit_errors", "bits", "modulation", "channel_ms", "erased", "side_info_symbols", "pilot_symbols")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SNR_DB_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_HZ_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    AIRTIME_MS_FIELD_NUMBER: _ClassVar[int]
    BIT_ERRORS_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    MODULATION_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_MS_FIELD_NUMBER: _ClassVar[int]
    ERASED_FIELD_NUMBER: _ClassVar[int]
    SIDE_INFO_SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    PILOT_SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    model: str
    snr_db: float
    bandwidth_hz: float
    delay_ms: float
    symbols: int
    airtime_ms: float
    bit_errors: int
    bits: int
    modulation: str
    channel_ms: float
    erased: _containers.RepeatedCompositeFieldContainer[ByteRange]
    side_info_symbols: int
    pilot_symbols: int
    def __init__(self, model: _Optional[str] = ..., snr_db: _Optional[float] = ..., bandwidth_hz: _Optional[float] = ..., delay_ms: _Optional[float] = ..., symbols: _Optional[int] = ..., airtime_ms: _Optional[float] = ..., bit_errors: _Optional[int] = ..., bits: _Optional[int] = ..., modulation: _Optional[str] = ..., channel_ms: _Optional[float] = ..., erased: _Optional[_Iterable[_Union[ByteRange, _Mapping]]] = ..., side_info_symbols: _Optional[int] = ..., pilot_symbols: _Optional[int] = ...) -> None: ...

class ByteRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class StreamTrailer(_message.Message):
    __slots__ = ("total_chunks", "total_bytes", "total_symbols", "crc32", "channel")
    TOTAL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    total_chunks: int
    total_bytes: int
    total_symbols: int
    crc32: int
    channel: ChannelReport
    def __init__(self, total_chunks: _Optional[int] = ..., total_bytes: _Optional[int] = ..., total_symbols: _Optional[int] = ..., crc32: _Optional[int] = ..., channel: _Optional[_Union[ChannelReport, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("header", "chunk", "reference", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: StreamHeader
    chunk: PayloadChunk
    reference: ReferenceFeatures
    trailer: StreamTrailer
    def __init__(self, header: _Optional[_Union[StreamHeader, _Mapping]] = ..., chunk: _Optional[_Union[PayloadChunk, _Mapping]] = ..., reference: _Optional[_Union[ReferenceFeatures, _Mapping]] = ..., trailer: _Optional[_Union[StreamTrailer, _Mapping]] = ...) -> None: ...

class SessionOpen(_message.Message):
    __slots__ = ("session_id", "prompt_ids", "split_layer", "codec", "codec_params", "channel", "max_tokens", "csi")
    class CodecParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CODEC_PARAMS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CSI_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    split_layer: int
    codec: str
    codec_params: _containers.ScalarMap[str, str]
    channel: ChannelSpec
    max_tokens: int
    csi: ChannelStateInfo
    def __init__(self, session_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., split_layer: _Optional[int] = ..., codec: _Optional[str] = ..., codec_params: _Optional[_Mapping[str, str]] = ..., channel: _Optional[_Union[ChannelSpec, _Mapping]] = ..., max_tokens: _Optional[int] = ..., csi: _Optional[_Union[ChannelStateInfo, _Mapping]] = ...) -> None: ...

class TokenUp(_message.Message):
    __slots__ = ("position", "token_id")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    position: int
    token_id: int
    def __init__(self, position: _Optional[int] = ..., token_id: _Optional[int] = ...) -> None: ...

class SessionClose(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class SessionUp(_message.Message):
    __slots__ = ("open", "token", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: SessionOpen
    token: TokenUp
    close: SessionClose
    def __init__(self, open: _Optional[_Union[SessionOpen, _Mapping]] = ..., token: _Optional[_Union[TokenUp, _Mapping]] = ..., close: _Optional[_Union[SessionClose, _Mapping]] = ...) -> None: ...

class SessionAccepted(_message.Message):
    __slots__ = ("session_id", "model_id", "split_layer", "num_layers", "hidden_size")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model_id: str
    split_layer: int
    num_layers: int
    hidden_size: int
    def __init__(self, session_id: _Optional[str] = ..., model_id: _Optional[str] = ..., split_layer: _Optional[int] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ...) -> None: ...

class UplinkReport(_message.Message):
    __slots__ = ("symbols", "attempts", "airtime_ms")
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    AIRTIME_MS_FIELD_NUMBER: _ClassVar[int]
    symbols: int
    attempts: int
    airtime_ms: float
    def __init__(self, symbols: _Optional[int] = ..., attempts: _Optional[int] = ..., airtime_ms: _Optional[float] = ...) -> None: ...

class HiddenStates(_message.Message):
    __slots__ = ("position", "rows", "header", "data", "symbols", "crc32", "channel", "uplink")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    UPLINK_FIELD_NUMBER: _ClassVar[int]
    position: int
    rows: int
    header: StreamHeader
    data: bytes
    symbols: _containers.RepeatedScalarFieldContainer[float]
    crc32: int
    channel: ChannelReport
    uplink: UplinkReport
    def __init__(self, position: _Optional[int] = ..., rows: _Optional[int] = ..., header: _Optional[_Union[StreamHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., symbols: _Optional[_Iterable[float]] = ..., crc32: _Optional[int] = ..., channel: _Optional[_Union[ChannelReport, _Mapping]] = ..., uplink: _Optional[_Union[UplinkReport, _Mapping]] = ...) -> None: ...

class SessionDown(_message.Message):
    __slots__ = ("accepted", "hidden")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    accepted: SessionAccepted
    hidden: HiddenStates
    def __init__(self, accepted: _Optional[_Union[SessionAccepted, _Mapping]] = ..., hidden: _Optional[_Union[HiddenStates, _Mapping]] = ...) -> None: ...
