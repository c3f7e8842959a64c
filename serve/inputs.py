"""Request schemas and input checks. Every bad request becomes an `ApiError` (a 4xx with a message
that names the field), checked in the ingress before any model work."""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import secrets
import warnings
from typing import Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from serve.chat import Decoding, Turn
from serve.settings import Limits

IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}
DATA_URL = re.compile(r"data:image/[a-zA-Z0-9.+-]+;base64,", re.IGNORECASE)
IMAGE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
MAX_CHOICES = 8  # n
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on /v1/completions
MAX_PROMPTS = 64  # prompts in one /v1/completions request (× n choices at most this too)
MAX_STOP, MAX_STOP_CHARS = 4, 200
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ProbeRequest(Strict):
    model: str = Field(description="a registered model name (GET /v1/models)")
    question: str
    image: str | None = Field(None, description="base64 image or data URL (PNG, JPEG, WEBP, GIF, BMP)")
    image_id: str | None = Field(None, description="a benchmark image id (needs `data` in the app config)")
    options: list[str] | None = Field(None, description="multiple choice: score each option's log-likelihood")
    max_tokens: int | None = Field(None, description="generation length (free-form questions)")


class AttackRequest(Strict):
    model: str
    item_id: str = Field(description="a forget item id of the benchmark (needs `data` in the app config)")
    attacks: list[str] | None = Field(None, description="attack names (default: all registered)")


class ImageUrl(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted, ignored (images are resized to the model's size)


class ContentPart(Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None  # accepted, ignored


class StreamOptions(Strict):
    include_usage: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text"]


class ChatRequest(Strict):
    """OpenAI's chat completion request. Unknown fields are refused (400 naming the field); the
    accepted ones are listed in serve/README.md."""

    model: str
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, description="0 (or omitted): greedy, as `offside eval`; up to 2: sampling")
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    frequency_penalty: float | None = Field(None, description="0 only")
    presence_penalty: float | None = Field(None, description="0 only")
    logit_bias: dict[str, float] | None = Field(None, description="empty only")
    response_format: ResponseFormat | None = None
    user: str | None = None  # accepted, ignored


class CompletionRequest(Strict):
    """OpenAI's (legacy) completion request: raw text or token prompts, no chat layout. Unknown fields are
    refused (400 naming the field); the accepted ones are listed in serve/README.md."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, description="0 only with echo (the prompt's log-probabilities, no generation)")
    echo: bool | None = None
    logprobs: int | None = Field(None, description="0–5 alternatives per token; with echo, the prompt's tokens too")
    n: int | None = None
    best_of: int | None = Field(None, description="equal to n (or 1) only")
    stream: bool | None = Field(None, description="false only (/v1/chat/completions streams)")
    temperature: float | None = Field(None, description="0 (or omitted): greedy; up to 2: sampling")
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = Field(None, description="0 only")
    presence_penalty: float | None = Field(None, description="0 only")
    logit_bias: dict[str, float] | None = Field(None, description="empty only")
    suffix: str | None = Field(None, description="null only")
    user: str | None = None  # accepted, ignored


def check_model(name: str, registered) -> str:
    if name not in registered:
        shown = name if len(name) <= 80 else name[:80] + "…"
        raise ApiError(404, f"model {shown!r} is not registered (registered: {', '.join(sorted(registered))})",
                       "model_not_found")
    return name


def check_text(text: str, what: str, limit: int) -> str:
    if not text.strip():
        raise ApiError(400, f"{what}: must not be empty")
    if len(text) > limit:
        raise ApiError(413, f"{what}: {len(text)} characters, limit {limit}")
    if "\x00" in text:
        raise ApiError(400, f"{what}: contains a NUL character")
    return text


def check_max_tokens(value: int | None, default: int, limits: Limits) -> int:
    if value is None:
        return default
    if not 1 <= value <= limits.max_tokens:
        raise ApiError(400, f"max_tokens: must be between 1 and {limits.max_tokens}, got {value}")
    return value


def check_options(options: list[str], limits: Limits) -> list[str]:
    if not 2 <= len(options) <= limits.max_options:
        raise ApiError(400, f"options: between 2 and {limits.max_options} options, got {len(options)}")
    return [check_text(o, f"options[{i}]", limits.max_option_chars) for i, o in enumerate(options)]


def decode_image(value: str, limits: Limits, what: str = "image") -> Image.Image:
    """A base64 string or data URL → RGB image; size and pixel count are checked before decoding."""
    if value.lower().startswith(("http://", "https://", "file:", "/")):
        raise ApiError(400, f"{what}: only inline images (base64 or data:image/...;base64, URLs) are accepted; nothing is fetched")
    match = DATA_URL.match(value)
    payload = value[match.end():] if match else value
    if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
        raise ApiError(413, f"{what}: larger than the {limits.max_image_bytes}-byte limit")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what}: not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.format not in IMAGE_FORMATS:
                raise ApiError(415, f"{what}: format {image.format} not accepted ({', '.join(sorted(IMAGE_FORMATS))})")
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise ApiError(413, f"{what}: {width}×{height} pixels, limit {limits.max_image_pixels}")
            return image.convert("RGB")
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, f"{what}: too many pixels (decompression bomb guard)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ApiError(400, f"{what}: not a readable image") from None


def chat_turns(messages: list[Message], limits: Limits) -> list[Turn]:
    """The whole conversation → turns (system/developer/assistant: text; user: text and images). The
    answer continues the conversation, so the last message must be the user's."""
    if not 1 <= len(messages) <= limits.max_messages:
        raise ApiError(400, f"messages: between 1 and {limits.max_messages} messages, got {len(messages)}")
    if messages[-1].role != "user":
        raise ApiError(400, f"messages[{len(messages) - 1}]: the last message must be the user's (got {messages[-1].role})")
    turns = [_turn(m, f"messages[{i}]", limits) for i, m in enumerate(messages)]
    images = sum(len(t.images) for t in turns)
    if images > limits.max_images:
        raise ApiError(400, f"messages: {images} images, at most {limits.max_images} per request")
    check_text("".join(t.text for t in turns), "messages text", limits.max_prompt_chars)
    return turns


def _turn(message: Message, where: str, limits: Limits) -> Turn:
    content = message.content
    parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else content
    texts, images = [], []
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]" if not isinstance(content, str) else f"{where}.content"
        if part.type == "text":
            if part.text is None:
                raise ApiError(400, f"{at}: a text part needs 'text'")
            if "\x00" in part.text:
                raise ApiError(400, f"{at}: contains a NUL character")
            texts.append(part.text)
        elif message.role != "user":
            raise ApiError(400, f"{at}: images are accepted in user messages only")
        elif part.image_url is None:
            raise ApiError(400, f"{at}: an image_url part needs 'image_url.url'")
        else:
            images.append(part.image_url.url)
    text = "\n".join(texts)
    if not text.strip() and not images:
        raise ApiError(400, f"{where}.content: must not be empty")
    if len(images) > limits.max_images:
        raise ApiError(400, f"{where}.content: {len(images)} images, at most {limits.max_images} per request")
    decoded = tuple(decode_image(url, limits, f"{where}.content image_url") for url in images)
    role = "system" if message.role == "developer" else message.role
    return Turn(role, text, decoded)


def chat_decoding(body: ChatRequest) -> tuple[Decoding, int]:
    """The request's decoding settings (checked) and its number of choices."""
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options: only allowed with stream: true")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs: true")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs: between 0 and {MAX_TOP_LOGPROBS}, got {body.top_logprobs}")
    return _decoding(body, (body.top_logprobs or 0) if body.logprobs else None)


def completion_decoding(body: CompletionRequest) -> tuple[Decoding, int]:
    """/v1/completions' decoding settings (checked as in chat) and its number of choices per prompt."""
    if body.stream:
        raise ApiError(400, "stream: not supported on /v1/completions (/v1/chat/completions streams)")
    if body.suffix is not None:
        raise ApiError(400, "suffix: not supported")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise ApiError(400, f"logprobs: between 0 and {MAX_COMPLETION_LOGPROBS}, got {body.logprobs}")
    decoding, n = _decoding(body, body.logprobs)
    if body.best_of is not None and body.best_of not in (1, n):
        raise ApiError(400, f"best_of: only equal to n ({n}) is supported, got {body.best_of}")
    return decoding, n


def _decoding(body: ChatRequest | CompletionRequest, top_logprobs: int | None) -> tuple[Decoding, int]:
    """The sampling fields chat and completions share, checked alike."""
    temperature = _number(body.temperature, "temperature", 0, 2, 0.0)
    top_p = _number(body.top_p, "top_p", 0, 1, 1.0)
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(getattr(body, name), name, -2, 2, 0.0) != 0:
            raise ApiError(400, f"{name}: only 0 is supported")
    if body.logit_bias:
        raise ApiError(400, "logit_bias: not supported")
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"n: between 1 and {MAX_CHOICES}, got {n}")
    if n > 1 and temperature == 0:
        raise ApiError(400, "n: greedy decoding (temperature 0 or omitted) has one answer; n > 1 needs temperature > 0")
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    if not -(2**63) <= seed < 2**64:
        raise ApiError(400, f"seed: a 64-bit integer, got {seed}")
    return Decoding(temperature, top_p, seed, top_logprobs, _stop(body.stop)), n


def _number(value: float | None, name: str, low: float, high: float, default: float) -> float:
    if value is None:
        return default
    if not math.isfinite(value) or not low <= value <= high:
        raise ApiError(400, f"{name}: a number between {low} and {high}, got {value}")
    return float(value)


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    strings = [stop] if isinstance(stop, str) else (stop or [])
    if len(strings) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in strings):
        raise ApiError(400, f"stop: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters")
    return tuple(strings)


def chat_max_tokens(body: ChatRequest, default: int, limits: Limits) -> int:
    """`max_completion_tokens` is OpenAI's newer name for `max_tokens`: either, or both if equal."""
    given = {v for v in (body.max_tokens, body.max_completion_tokens) if v is not None}
    if len(given) > 1:
        raise ApiError(400, "max_tokens and max_completion_tokens differ: give one (they are aliases)")
    return check_max_tokens(given.pop() if given else None, default, limits)


def completion_max_tokens(body: CompletionRequest, default: int, limits: Limits) -> int:
    """As in chat, and 0 with echo: the prompt's log-probabilities alone (what harnesses score with)."""
    if body.max_tokens == 0:
        if not body.echo:
            raise ApiError(400, "max_tokens: 0 only with echo: true (nothing would be returned)")
        return 0
    return check_max_tokens(body.max_tokens, default, limits)


def completion_prompts(prompt: str | list, tokenizer, limits: Limits, n: int) -> list[tuple[tuple[int, ...], str]]:
    """The prompts of a completion request as (token ids, text): a string, strings, token ids or lists of
    them (OpenAI's four forms), each checked — text only (no vision tokens), known ids, length limits."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if not 1 <= len(prompt) <= MAX_PROMPTS or len(prompt) * n > MAX_PROMPTS:
        raise ApiError(400, f"prompt: between 1 and {MAX_PROMPTS} prompts (× n), got {len(prompt)} × {n}")
    vision = {tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    prompts = []
    for i, one in enumerate(prompt):
        where = f"prompt[{i}]" if len(prompt) > 1 else "prompt"
        if isinstance(one, str):
            ids = tokenizer(check_text(one, where, limits.max_prompt_chars), add_special_tokens=False)["input_ids"]
            text = one
        else:
            if any(not 0 <= t < len(tokenizer) for t in one):
                raise ApiError(400, f"{where}: token ids must be between 0 and {len(tokenizer) - 1}")
            ids, text = one, tokenizer.decode(one)
        if not ids:
            raise ApiError(400, f"{where}: must not be empty")
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(413, f"{where}: {len(ids)} tokens, limit {limits.max_prompt_tokens}")
        if vision & set(ids):
            raise ApiError(400, f"{where}: contains vision tokens ({', '.join(VISION_TOKENS)}); /v1/completions takes text only")
        prompts.append((tuple(ids), text))
    return prompts


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a number")
    return value


def strict_json(raw: bytes):
    """JSON as the standard defines it: Python's json also reads NaN, Infinity and 1e999 (→ inf)."""
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError:
        raise
    except ValueError as err:  # from the hooks above (no position), or bytes that are not UTF-8/16/32
        raise json.JSONDecodeError(str(err), "", -1) from None
