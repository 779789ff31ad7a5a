"""Typed answers of the HTTP API (they also document it at /docs); ``/v1/model`` answers the
export manifest itself (``faar_serve.manifest.Manifest``)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from .manifest import Manifest

__all__ = ["BatchPrediction", "ErrorBody", "Health", "Manifest", "Prediction", "Readiness", "TaskMap"]


class TaskMap(BaseModel):
    """One task's map at the uploaded image's size, as a base64 PNG, and how to read its pixels."""

    kind: str = Field(description="labels | probability | normals | depth")
    description: str
    encoding: str = Field(description="png-palette | png-8bit | png-16bit | png-rgb")
    png: str = Field(description="base64 PNG")
    classes: list[str] | None = Field(None, description="labels: class name per pixel value")
    palette: list[list[int]] | None = Field(None, description="labels: RGB per class (also in the PNG)")
    classes_present: list[str] | None = None
    scale: float | None = Field(None, description="value = pixel * scale (in units)")
    units: str | None = None
    range: list[float] | None = None
    min: float | None = None
    max: float | None = None
    convention: str | None = Field(None, description="normals: axes and pixel encoding")


class Prediction(BaseModel):
    model: str
    version: int
    width: int = Field(description="of the uploaded image after EXIF orientation; every map has this size")
    height: int
    tasks: dict[str, TaskMap]
    timings_ms: dict[str, float] = Field(description="server stages decode, queue, inference, encode in ms; "
                                          "their sum is the server time (HTTP parsing excluded)")


class BatchPrediction(BaseModel):
    model: str
    version: int
    results: list[Prediction] = Field(description="one per uploaded image, in upload order")


class ErrorBody(BaseModel):
    error: str = Field(description="stable code, e.g. not_an_image, too_many_pixels, overloaded")
    detail: str = Field(description="what is wrong, for people")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    engine: str
    model: str
    version: int
