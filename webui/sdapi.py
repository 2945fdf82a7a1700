"""The AUTOMATIC1111 web UI's REST API (``/sdapi/v1/...``), on the same server and port as the page.

Tools written for that web UI (Open WebUI, SillyTavern, chat bots, the ``webuiapi`` client) use
this server unchanged. It is one more door, like the page: a request becomes
``GenerationRequest``s (``sdapi_translate``), waits in the same queue as the page's requests
(``jobs``: never two generations at once), runs under the same limits, and makes the same image
with the same PNG parameters as the page given the same settings.

Errors: a bad request gets a 4xx with a JSON ``detail`` naming the field (400 for a body that is
not JSON, 413 for one too large, 422 for a wrong value); 503 when no model is loaded or too many
requests wait; a 5xx otherwise only for a fault of ours. ``--api-auth`` (or ``--auth``) requires
HTTP basic auth on every endpoint; ``--no-api`` does not mount them (see ``app.py``).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
import torch
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image, ImageOps
from pydantic import BaseModel, ValidationError
from starlette.routing import BaseRoute

from stable_diffusion import inpainting
from stable_diffusion.hub import ModelLoadError
from stable_diffusion.images import grid
from stable_diffusion.pipelines import Generation, GenerationCancelled
from stable_diffusion.request import GenerationRequest, InvalidSetting

from .generation import MAX_IMAGES, MAX_STEPS
from .sdapi_translate import (SCHEDULERS, ImageToImagePayload, PngInfoPayload, TextToImagePayload, api_error,
                              decode_image, encode_png, generation_info, generation_requests, png_info, sampler_list)
from .served import ServedModel, gpu, switch_model

__all__ = ["PREFIX", "api_routes", "parse_logins"]

logger = logging.getLogger(__name__)

PREFIX = "/sdapi/v1"
# A base64 image of the largest input size fits; a body beyond it is refused before parsing.
MAX_BODY_BYTES = 32 * 2**20
# API requests waiting for the model at once (the page's queue holds as many); more get a 503.
MAX_WAITING = 32
# How often a running request checks that its client is still there (else it is cancelled).
_POLL_S = 0.5

Payload = TypeVar("Payload", bound=BaseModel)


def parse_logins(text: str) -> list[tuple[str, str]]:
    """``USER:PASSWORD[,USER:PASSWORD...]`` (the web UI's ``--api-auth`` format) as pairs."""
    logins = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError("--api-auth must be USER:PASSWORD (or several, comma-separated), both non-empty")
        logins.append((user, password))
    return logins


def api_routes(served: ServedModel, *, logins: Sequence[tuple[str, str]] = (),
               checkpoints: Mapping[str, str] | None = None) -> list[BaseRoute]:
    """The API's routes, for the app's FastAPI server (``launch(app_kwargs={"routes": ...})``).

    ``logins``: (user, password) pairs that HTTP basic auth accepts; none: the API is open.
    ``checkpoints``: title -> source of the models besides the served one that ``sd_model_checkpoint``
    may switch to (``models.catalogue``: the page's picker lists the same).
    """
    api = _WebUIApi(served, checkpoints or {})
    router = APIRouter(prefix=PREFIX, dependencies=[Depends(_basic_auth(logins))] if logins else [])
    for path, endpoint, method in [
        ("/txt2img", api.txt2img, "POST"), ("/img2img", api.img2img, "POST"), ("/png-info", api.png_info, "POST"),
        ("/progress", api.progress, "GET"), ("/interrupt", api.interrupt, "POST"),
        ("/sd-models", api.sd_models, "GET"), ("/options", api.options, "GET"), ("/options", api.set_options, "POST"),
        ("/samplers", sampler_list, "GET"), ("/schedulers", _schedulers, "GET"), ("/scripts", _scripts, "GET"),
    ]:
        router.add_api_route(path, endpoint, methods=[method])
    return list(router.routes)


def _basic_auth(logins: Sequence[tuple[str, str]]) -> Callable[..., None]:
    security = HTTPBasic(auto_error=False)

    def check(credentials: HTTPBasicCredentials | None = Depends(security)) -> None:
        if credentials is not None:
            given = (credentials.username.encode(), credentials.password.encode())
            # Every pair is compared in full, so the time taken says nothing about which part was wrong.
            matches = [secrets.compare_digest(given[0], user.encode()) & secrets.compare_digest(given[1], password.encode())
                       for user, password in logins]
            if any(matches):
                return
        raise HTTPException(401, "This API needs a login: HTTP basic auth with a user and password of the "
                                 "server's --api-auth (or --auth).", headers={"WWW-Authenticate": "Basic"})

    return check


def _schedulers() -> list[dict[str, Any]]:
    return [{"name": name, "label": label, "aliases": None, "default_rho": 7.0 if name == "karras" else -1,
             "need_inner_model": False} for name, label in SCHEDULERS.items()]


def _scripts() -> dict[str, list[str]]:
    """No scripts or extensions here (clients such as ``webuiapi`` ask at start)."""
    return {"txt2img": [], "img2img": []}


@gpu
def _generate_on_device(served: ServedModel, requests: list[GenerationRequest], image: Image.Image | None,
                        mask: Image.Image | None, cancel: threading.Event) -> list[Generation]:
    return served.generate(requests, door="api", image=image, mask=mask, cancel=cancel)


# The web UI's starts for the masked area that apply: 0 "fill" (the colours around it), 1 "original".
INPAINTING_FILLS = (0, 1)


class _WebUIApi:
    """The endpoints that read the served model. Each reads ``served`` per request, like the page."""

    def __init__(self, served: ServedModel, checkpoints: Mapping[str, str]) -> None:
        self.served = served
        self.checkpoints = dict(checkpoints)
        # Worker threads of this API's own: requests waiting for the model never hold the server's.
        self.limiter = anyio.CapacityLimiter(MAX_WAITING + 1)
        # The last preview sent, with the latents it shows: clients poll faster than steps go.
        self._preview: tuple[torch.Tensor, str] | None = None

    # ---------------------------------------------------------------- generation
    async def txt2img(self, request: Request) -> dict[str, Any]:
        payload = await _payload(request, TextToImagePayload)
        return await self._generate(request, payload, image=None, strength=None)

    async def img2img(self, request: Request) -> dict[str, Any]:
        payload = await _payload(request, ImageToImagePayload)
        if len(payload.init_images) != 1:
            raise HTTPException(422, f"init_images must hold exactly one image, got {len(payload.init_images)}.")
        if payload.mask and payload.inpainting_fill not in (None, *INPAINTING_FILLS):
            raise HTTPException(422, f"inpainting_fill must be 0 (fill) or 1 (original) here, got {payload.inpainting_fill}"
                                     " (the latent noise and latent nothing starts are not served).")
        with _http_errors():
            image = decode_image(payload.init_images[0], field="init_images[0]")
            mask = decode_image(payload.mask, field="mask") if payload.mask else None
            if mask is not None:
                mask = inpainting.read_mask(mask, size=image.size)
                if payload.inpainting_mask_invert:
                    mask = ImageOps.invert(mask)
                if payload.inpainting_fill == 0:
                    image = inpainting.fill_masked(image, mask)
        strength = 0.75 if payload.denoising_strength is None else payload.denoising_strength
        return await self._generate(request, payload, image=image, strength=strength, mask=mask)

    async def _generate(self, request: Request, payload: TextToImagePayload | ImageToImagePayload, *,
                        image: Image.Image | None, strength: float | None,
                        mask: Image.Image | None = None) -> dict[str, Any]:
        pipe = self.served.pipe
        if pipe is None:
            raise HTTPException(503, f"No model is loaded, so this server cannot generate images. {self.served.notice}")
        self._check_model_override(payload.override_settings or {})
        with _http_errors():
            requests = generation_requests(payload, strength=strength, max_steps=MAX_STEPS,
                                           max_images=min(MAX_IMAGES, pipe.max_images), inpainting=mask is not None)
        if self.served.queue.waiting >= MAX_WAITING:
            raise HTTPException(503, f"Busy: {MAX_WAITING} requests are already waiting. Try again later.",
                                headers={"Retry-After": "10"})
        with _http_errors():
            results = await self._in_worker(request, lambda cancel: _generate_on_device(
                self.served, requests, image, mask, cancel))
        images = [encode_png(picture, text) for result in results
                  for picture, text in zip(result.images, result.parameters, strict=True)]
        echo = payload.model_dump(exclude=set() if getattr(payload, "include_init_images", False) else {"init_images", "mask"})
        return {"images": images if payload.send_images is not False else [], "parameters": echo,
                "info": generation_info(requests, results)}

    def _check_model_override(self, overrides: dict[str, Any]) -> None:
        wanted = overrides.get("sd_model_checkpoint")
        current = self.served.pipe.name if self.served.pipe is not None else None
        if wanted is not None and wanted != current:
            raise HTTPException(422, f"override_settings.sd_model_checkpoint: {wanted!r} is not the model loaded now "
                                     f"({current!r}). Switch models first with POST {PREFIX}/options.")

    async def _in_worker(self, request: Request, work: Callable[[threading.Event], Any]) -> Any:
        """``work(cancel)`` in one of this API's threads; ``cancel`` is set if the client hangs up first."""
        cancel = threading.Event()

        async def watch() -> None:
            while not await request.is_disconnected():
                await anyio.sleep(_POLL_S)
            logger.info("The client of %s went away: cancelling it", request.url.path)
            cancel.set()

        failure: Exception | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            try:
                result = await anyio.to_thread.run_sync(work, cancel, limiter=self.limiter)
            except Exception as error:  # raised below, not wrapped in the task group's ExceptionGroup
                failure = error
            group.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return result

    # ---------------------------------------------------------------- the rest
    async def png_info(self, request: Request) -> dict[str, Any]:
        payload = await _payload(request, PngInfoPayload)
        with _http_errors():
            return png_info(decode_image(payload.image, field="image"))

    async def progress(self, skip_current_image: bool = False) -> dict[str, Any]:
        """The running job, whichever door started it: progress, ETA, and a preview of its x̂0."""
        job = self.served.queue.running
        waiting = self.served.queue.waiting
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                 "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        state.update(interrupted=job.interrupted.is_set(), job=job.name, job_count=job.parts,
                     job_timestamp=job.timestamp, job_no=job.part, sampling_step=job.step, sampling_steps=job.steps)
        pipe, x0_latents = job.pipe, job.x0_latents
        current_image = None
        if not skip_current_image and pipe is not None and x0_latents is not None:
            if self._preview is None or self._preview[0] is not x0_latents:
                png = await anyio.to_thread.run_sync(lambda: encode_png(grid(pipe.preview(x0_latents))))
                self._preview = (x0_latents, png)
            current_image = self._preview[1]
        return {"progress": job.progress, "eta_relative": job.eta_s, "state": state, "current_image": current_image,
                "textinfo": f"{waiting} more waiting" if waiting else None}

    async def interrupt(self) -> dict[str, Any]:
        """Stop the running generation (the page's too) at its next step."""
        self.served.queue.interrupt()
        return {}

    def _checkpoints(self) -> dict[str, str | None]:
        """Each model this server may serve, by title (its name, as ``hub.load`` gives it) -> its source."""
        found = {} if self.served.pipe is None else {self.served.pipe.name: self.served.source}
        for title, source in self.checkpoints.items():
            found.setdefault(title, source)
        return found

    async def sd_models(self) -> list[dict[str, Any]]:
        # Titles only: the paths of this machine stay private.
        return [{"title": title, "model_name": title, "hash": None, "sha256": None, "filename": title, "config": None}
                for title in self._checkpoints()]

    async def options(self) -> dict[str, Any]:
        """The web UI's settings that mean something here; this server keeps no others."""
        pipe = self.served.pipe
        return {"sd_model_checkpoint": None if pipe is None else pipe.name, "CLIP_stop_at_last_layers": 1,
                "samples_format": "png"}

    async def set_options(self, request: Request) -> None:
        """Only ``sd_model_checkpoint`` has an effect: it switches the served model (as the page's picker).

        Other settings are ignored, as the web UI ignores unknown ones: clients post back the
        whole of ``GET options`` with one key changed.
        """
        options = await _payload(request, _Options)
        wanted = options.sd_model_checkpoint
        checkpoints = self._checkpoints()
        if wanted is None or (self.served.pipe is not None and wanted == self.served.pipe.name):
            return
        if checkpoints.get(wanted) is None:
            raise HTTPException(422, f"sd_model_checkpoint {wanted!r} is not available here: use one of "
                                     f"{', '.join(repr(title) for title in checkpoints)}.")
        with _http_errors():
            await self._in_worker(request, lambda cancel: switch_model(self.served, checkpoints[wanted]))
        logger.info("Now serving %s", wanted)


class _Options(BaseModel, extra="ignore"):
    sd_model_checkpoint: str | None = None


# ------------------------------------------------------------------------------------ requests and errors
async def _payload(request: Request, model: type[Payload]) -> Payload:
    """The JSON body as ``model``, or a 4xx saying what is wrong with it."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HTTPException(413, f"The body is over {MAX_BODY_BYTES // 2**20} MiB: send a smaller image.")
        chunks.append(chunk)
    try:
        return model.model_validate_json(b"".join(chunks))
    except ValidationError as error:
        problems = error.errors(include_url=False)
        if any(problem["type"] == "json_invalid" for problem in problems):
            raise HTTPException(400, f"The body is not valid JSON: {problems[0]['msg']}.") from None
        raise HTTPException(422, "; ".join(_problem(problem) for problem in problems)) from None


def _problem(problem: dict[str, Any]) -> str:
    """One pydantic error as "field: what is wrong (got ...)", the value shortened."""
    where = ".".join(str(part) for part in problem["loc"]) or "the body"
    given = repr(problem.get("input"))
    return f"{where}: {problem['msg']} (got {given[:60] + '...' if len(given) > 60 else given})"


@contextmanager
def _http_errors() -> Iterator[None]:
    """The errors of a request as HTTP errors: the client's as 4xx under the API's names, ours as 5xx."""
    try:
        yield
    except InvalidSetting as error:
        raise HTTPException(422, api_error(error)) from None
    except ValueError as error:
        raise HTTPException(422, str(error)) from None
    except GenerationCancelled as error:
        raise HTTPException(409, f"Interrupted before the images were finished ({error}).") from None
    except ModelLoadError as error:
        raise HTTPException(503, f"Could not load the model, the previous one is still served: {error}") from None
    except torch.cuda.OutOfMemoryError:
        raise HTTPException(503, "Out of memory on the GPU: try a smaller size or fewer images.") from None
    except HTTPException:
        raise
    except Exception:
        logger.exception("The API request failed")
        raise HTTPException(500, "The server failed on this request (its log says why).") from None
