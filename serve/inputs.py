"""Request schemas and input checks. Every bad request becomes an `ApiError` (a 4xx with a message
that names the field), checked in the ingress before any model work."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from typing import Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from serve.settings import Limits

IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}
DATA_URL = re.compile(r"data:image/[a-zA-Z0-9.+-]+;base64,", re.IGNORECASE)
IMAGE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")


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


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    url: str


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class ChatRequest(BaseModel):
    """OpenAI's chat completion request; decoding is greedy (temperature and top_p are accepted and
    ignored), one choice, no streaming."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    stream: bool | None = None
    temperature: float | int | None = None
    top_p: float | int | None = None


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


def chat_prompt(messages: list[Message], limits: Limits) -> tuple[str, object]:
    """The single user turn of a chat request → (question, image or None). The OFFSIDE chat layout is
    one user turn (as in evaluation): system/assistant turns and several images are refused."""
    if not 1 <= len(messages) <= limits.max_messages:
        raise ApiError(400, f"messages: between 1 and {limits.max_messages} messages, got {len(messages)}")
    if len(messages) != 1 or messages[0].role != "user":
        raise ApiError(400, "messages: one user message is supported (single-turn probing, no system or assistant turns)")
    content = messages[0].content
    parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else content
    texts, images = [], []
    for i, part in enumerate(parts):
        if part.type == "text":
            if part.text is None:
                raise ApiError(400, f"messages[0].content[{i}]: a text part needs 'text'")
            texts.append(part.text)
        else:
            if part.image_url is None:
                raise ApiError(400, f"messages[0].content[{i}]: an image_url part needs 'image_url.url'")
            images.append(part.image_url.url)
    if len(images) > 1:
        raise ApiError(400, "messages[0].content: at most one image per request")
    question = check_text("\n".join(texts), "messages[0].content text", limits.max_prompt_chars)
    image = decode_image(images[0], limits, "messages[0].content image_url") if images else None
    return question, image
