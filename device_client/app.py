"""The device client: a FastAPI app that takes prompts over REST, receives features from the edge through
the channel emulator, decodes them with its lightweight decoder and serves the images and the dashboard."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import codec
from codec.image_sets import image_set_dir
from codec.sets import IMAGE_SOURCE, IMAGE_SPLIT, LLM_SOURCE, SOURCES, codec_set_identity
from device_client.decoders import DecoderBank
from device_client.finisher import SplitFinisher
from device_client.generate import GenerateDefaults, ImageGeneration
from device_client.guard import DeviceGuard
from device_client.link import DeviceLink, DeviceLinkConfig
from device_client.llm import LlmDevice, LlmDeviceConfig, LlmGeneration
from device_client.openai_api import OpenAiRoutes, OpenAiSettings, add_openai_routes
from device_client.schemas import GenerateIn, GenerateOut
from radio import CHANNELS
from radio.spec import describe_channel
from serving.http_adapter import respond
from telemetry.metrics import MegMetrics

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"


def default_model_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "models" / "shapes_v1"


@dataclass
class DeviceConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (off loopback needs MEG_API_KEY)"})
    port: int = field(default=8000, metadata={"help": "REST port"})
    channel: str = field(default="127.0.0.1:50052", metadata={"help": "channel emulator address host:port"})
    model_dir: Path = field(default_factory=default_model_dir, metadata={
        "help": "model folder with the decoders (default: the embedded models/shapes_v1)"})
    device: str = field(default="cpu", metadata={"help": "torch device of the decoders, e.g. cpu or cuda"})
    request_timeout_s: float = field(default=120.0, metadata={"help": "deadline of one request end to end"})
    max_in_flight: int = field(default=64, metadata={"help": "requests served at once before 503"})
    max_images: int = field(default=512, metadata={"help": "images kept in memory for GET /v1/images"})
    max_body_bytes: int = field(default=64 * 1024, metadata={"help": "largest request body (413 beyond)"})
    body_timeout_s: float = field(default=30.0, metadata={"help": "deadline to receive a request body (408)"})
    header_timeout_s: float = field(default=10.0, metadata={"help": "deadline to receive request headers"})
    max_connections: int = field(default=256, metadata={"help": "open HTTP connections at most (503 beyond)"})
    default_steps: int = field(default=20, metadata={"help": "denoising steps when a request sets none"})
    default_guidance: float = field(default=4.0, metadata={"help": "guidance scale when a request sets none"})
    default_codec: str = field(default="raw-fp16", metadata={"help": "codec when a request sets none"})
    max_pixel_steps: int = field(default=512 * 512 * 50, metadata={
        "help": "refuse requests over height × width × steps at once (the edge enforces its own budget too)"})
    api_keys: tuple[str, ...] = field(default=(), metadata={"help": "API keys (from MEG_API_KEY)", "cli": False})
    tls_dir: Path | None = field(default=None, metadata={"help": "mutual TLS towards the channel emulator"})
    open_api: bool = field(default=False, metadata={
        "help": "serve without MEG_API_KEY off loopback (for a container whose port is published on loopback "
                "only; logged loudly)"})
    llm: LlmDeviceConfig = field(default_factory=LlmDeviceConfig)

    @staticmethod
    def keys_from_env() -> tuple[str, ...]:
        raw = os.environ.get("MEG_API_KEY", "")
        return tuple(k.strip() for k in raw.split(",") if k.strip())


class ImageStore:
    """The last ``capacity`` PNGs in memory, by id (oldest evicted first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def put(self, image_id: str, png: bytes) -> None:
        self._items[image_id] = png
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, image_id: str) -> bytes | None:
        return self._items.get(image_id)


def key_owner(key: str | None) -> str:
    """Who made a request, as history stores it: a hash of the API key (never the key), "" without keys."""
    return hashlib.sha256(key.encode()).hexdigest()[:16] if key else ""


class DeviceState:
    """Everything the app holds: link, decoders, images, history and metrics."""

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self.metrics = MegMetrics("device")
        self.link: DeviceLink | None = None
        self.decoders = DecoderBank(config.model_dir, config.device)
        self.finisher = SplitFinisher(config.model_dir, config.device)
        self.images = ImageStore(config.max_images)
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)
        self.generation: ImageGeneration | None = None
        # The split language model's device half; loaded with the app so its routes exist from the start.
        self.llm = LlmDevice(config.llm, config.device, self.metrics) if config.llm.llm_enabled else None
        self.openai: OpenAiRoutes | None = None

    def start(self) -> None:
        credentials = None
        if self.config.tls_dir is not None:
            from security.tls import channel_credentials

            credentials = channel_credentials(self.config.tls_dir, "device")
        self.link = DeviceLink(DeviceLinkConfig(self.config.channel), credentials)
        c = self.config
        defaults = GenerateDefaults(c.default_steps, c.default_guidance, c.default_codec, c.request_timeout_s,
                                    c.max_in_flight, c.max_pixel_steps)
        self.generation = ImageGeneration(self.link, self.decoders, self.finisher, defaults, self.metrics,
                                          model_dir=c.model_dir)
        if self.openai is not None:
            self.openai.generation.link = self.link

    def openai_routes(self) -> OpenAiRoutes | None:
        """The OpenAI-compatible routes' handler (its link is attached at start)."""
        if self.llm is None:
            return None
        c = self.config
        settings = OpenAiSettings(c.llm.llm_default_codec, c.llm.llm_max_tokens, c.request_timeout_s,
                                  c.max_in_flight)
        self.openai = OpenAiRoutes(self.llm, LlmGeneration(self.llm, self.link, self.metrics), settings,
                                   self.metrics)
        return self.openai


def create_app(config: DeviceConfig) -> Any:
    """The device's ASGI app: the FastAPI routes behind :class:`~device_client.guard.DeviceGuard`."""
    state = DeviceState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        # Load the decoders before the first request, so its latency is not a cold start.
        for kind in state.decoders.available():
            await asyncio.to_thread(state.decoders.get, kind)
        yield
        assert state.link is not None
        await state.link.close()
        if state.llm is not None:
            await asyncio.to_thread(state.llm.stop)

    app = FastAPI(title="MEG device client", version="1.0",
                  description="Prompts in, images out: features cross a simulated wireless link from the edge.",
                  lifespan=lifespan)
    app.state.meg = state
    _add_error_handlers(app)
    _add_page_routes(app, state)
    _add_api_routes(app, state)
    routes = state.openai_routes()
    if routes is not None:
        add_openai_routes(app, routes)
    guarded = DeviceGuard(app, config.api_keys, config.max_body_bytes, config.body_timeout_s)
    guarded.state = app.state  # type: ignore[attr-defined]  (tests reach the state through the app)
    return guarded


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_field_error(e) for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # Invalid UTF-8 or JSON nested too deep: the client's body is unusable, like any unparsable body.
            return JSONResponse({"detail": "body: not valid JSON (encoding or nesting)"}, status_code=422)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def _field_error(error: dict[str, Any]) -> dict[str, str]:
    field_name = ".".join(str(p) for p in error["loc"] if p != "body")
    message = str(error["msg"]).removeprefix("Value error, ")
    # Cross-field rules report their own dotted field ("channel.snr_db: required").
    head, sep, rest = message.partition(": ")
    if sep and head.startswith(field_name + ".") and " " not in head:
        field_name, message = head, rest
    return {"field": field_name or "body", "message": message}


def _add_page_routes(app: FastAPI, state: DeviceState) -> None:
    @app.get("/", include_in_schema=False)
    async def dashboard() -> Response:
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            return JSONResponse({"detail": "dashboard not installed; see /docs for the API"}, status_code=404)
        return FileResponse(index, media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        # Only plain file names from the package's own static folder: no user-controlled paths.
        allowed = {p.name: p for p in STATIC_DIR.glob("*") if p.is_file()} if STATIC_DIR.is_dir() else {}
        if name not in allowed:
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(allowed[name])

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        assert state.link is not None
        ok, reason = await state.link.health()
        return JSONResponse({"status": "ok" if ok else "unavailable", "reason": reason},
                            status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "2"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def codec_sets(state: DeviceState) -> dict[str, dict[str, Any]]:
    """The codec set this device holds per feature source: ``{source: {"id", "hash", "split"}}`` (hash "" when
    none is fitted: then only codecs without fitted data work). The LLM's is the one at its default split."""
    model_dir = state.config.model_dir.expanduser().resolve()
    set_id, set_hash = codec_set_identity(image_set_dir(model_dir), model_dir.name, IMAGE_SPLIT, IMAGE_SOURCE)
    out = {IMAGE_SOURCE: {"id": set_id, "hash": set_hash, "split": IMAGE_SPLIT}}
    if state.llm is not None:
        k = int(state.llm.describe()["default_split_layer"])
        _, (llm_id, llm_hash) = state.llm.codec_set(k)
        out[LLM_SOURCE] = {"id": llm_id, "hash": llm_hash, "split": k}
    return out


def _add_api_routes(app: FastAPI, state: DeviceState) -> None:
    config = state.config

    @app.get("/v1/codecs")
    async def codecs(source: str | None = None) -> dict[str, Any]:
        from codec.registry import codec_kind, request_params, resolve_spec

        if source is not None and source not in SOURCES:
            raise HTTPException(422, f"source: unknown feature source {source!r}; known: {', '.join(SOURCES)}")
        # Without a source: the image path's codecs, what this route listed before there were sources.
        items = [{"name": p.name, "description": p.description, "kind": codec_kind(p.name),
                  "stages": resolve_spec(p.name)[0].split("+"), "params": p.params, "sources": list(p.sources),
                  "request_params": list(request_params(p.name))} for p in codec.list_codecs(source or IMAGE_SOURCE)]
        default = config.llm.llm_default_codec if source == LLM_SOURCE else config.default_codec
        out: dict[str, Any] = {"codecs": items, "default": default}
        if (source or IMAGE_SOURCE) == IMAGE_SOURCE:
            out["adaptive"] = {"name": "auto", "request_params": ["budget_symbols"],
                               "description": "link adaptation: the edge picks the scheme (codec and, for digital, "
                                              "modulation, FEC, code rate) the measured table expects to do best at "
                                              "the receiver's SNR estimate; the answer's codec_choice says which "
                                              "and why"}
        if source is not None:
            out["codec_set"] = codec_sets(state).get(source)
        return out

    @app.get("/v1/sources")
    async def sources() -> dict[str, Any]:
        sets = codec_sets(state)
        return {"sources": [{"name": name, "codecs": codec.codec_names(name), "codec_set": sets.get(name)}
                            for name in SOURCES]}

    @app.get("/v1/channels")
    async def channels() -> dict[str, Any]:
        return {"channels": [describe_channel(name) for name in CHANNELS]}

    @app.get("/v1/history")
    async def history(request: Request) -> dict[str, Any]:
        owner = key_owner(request.scope.get("state", {}).get("api_key"))
        return {"requests": [{k: v for k, v in r.items() if k != "owner"} for r in state.history
                             if r["owner"] == owner]}

    @app.get("/v1/images/{name}")
    async def image(name: str) -> Response:
        png = state.images.get(name.removesuffix(".png")) if name.endswith(".png") else None
        if png is None:
            raise HTTPException(404, f"no image {name!r} (images are kept for the last {config.max_images} requests)")
        return Response(png, media_type="image/png")

    @app.post("/v1/generate", response_model=GenerateOut)
    async def generate(body: GenerateIn, request: Request) -> Response:
        assert state.generation is not None
        answer = await respond(state.generation, body, state.metrics, request.is_disconnected)
        if isinstance(answer, Response):
            return answer
        out, png = answer
        state.images.put(out.id, png)
        owner = key_owner(request.scope.get("state", {}).get("api_key"))
        state.history.append({**out.model_dump(), "snr_db": out.channel.get("snr_db"), "owner": owner,
                              "finished_at": time.time()})
        return JSONResponse(out.model_dump())


