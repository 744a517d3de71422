"""Request models of the device's OpenAI-compatible API (``/v1/completions``, ``/v1/chat/completions``).

The OpenAI fields people's clients send, plus the MEG fields beside them (``codec``, ``codec_params``,
``channel``, ``split_layer``). What this server does not implement is refused with a 422 naming the field
(``n > 1``, ``logprobs``, ``tools`` ...), never silently ignored: a client that asked for two choices must not
get one back as if that were all. Fields that change nothing here (``user``, zero penalties) are accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from device_client.schemas import ChannelIn

STRICT = ConfigDict(extra="forbid", strict=True)
MAX_STOP = 4
MAX_PROMPT_CHARS = 8000


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class CompletionCommon(BaseModel):
    """Fields shared by both endpoints."""

    model_config = STRICT

    model: str = Field(..., min_length=1, description="a model id from GET /v1/models")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0: greedy (default)")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = None
    # Refused unless they ask for what this server does anyway.
    n: int | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # MEG fields.
    codec: str | None = Field(None, description="a hidden-state codec from GET /v1/codecs?source=llm-hidden")
    codec_params: dict[str, str] = Field(default_factory=dict)
    channel: ChannelIn = Field(default_factory=ChannelIn)  # type: ignore[valid-type]
    split_layer: int | None = Field(None, ge=1, description="decoder layers the edge runs (default: the edge's)")
    ignore_eos: bool = Field(False, description="generate max_tokens tokens, through end tokens (as vLLM's "
                                                "extra parameter; benchmarks use it for fixed-length answers)")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only n = 1 is supported")
        return v

    @field_validator("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call")
    @classmethod
    def _refused(cls, v: Any) -> Any:
        if v is None or v is False:
            return v
        raise ValueError("not supported by this server (refused rather than ignored)")

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("only 0 is supported")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("not supported by this server")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP} non-empty stop strings")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionIn(CompletionCommon):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=64)
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")

    @model_validator(mode="after")
    def _alias(self) -> "ChatCompletionIn":
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_completion_tokens: differs from max_tokens (give one)")
            self.max_tokens = self.max_completion_tokens
        if sum(len(m.text()) for m in self.messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"messages: longer than {MAX_PROMPT_CHARS} characters in all")
        return self


class CompletionIn(CompletionCommon):
    prompt: str | list[str]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if len(prompts) != 1:
            raise ValueError("exactly one prompt is supported")
        if not prompts[0] or len(prompts[0]) > MAX_PROMPT_CHARS:
            raise ValueError(f"must hold 1 to {MAX_PROMPT_CHARS} characters")
        return v

    @field_validator("echo", "suffix")
    @classmethod
    def _refused_completion(cls, v: Any) -> Any:
        if v:
            raise ValueError("not supported by this server")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only best_of = 1 is supported")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
