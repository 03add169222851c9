"""Client-side synthesis: the server runs T..t_cut, this client finishes t_cut..0 with its model."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import torch
from torch import Tensor, nn

from collafuse.client.daemon import state_paths
from collafuse.client.remote import Remote
from collafuse.client.trainer import load_client_model
from collafuse.common.config import ClientConfig, ScheduleConfig
from collafuse.common.data import load_local_data
from collafuse.common.diffusion import Denoiser, Diffusion, SamplerKind
from collafuse.common.domain import SynthesisChunk, SynthesisRequest
from collafuse.common.images import save_grid, save_pngs
from collafuse.common.nets import UNetDenoiser

log = logging.getLogger("collafuse.client.synth")


# The server is restarting, unreachable or did not answer in time: wait and resume.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

GAMMA_IMAGES = 64
"""Local images the analytic sampler's Gamma_t estimate runs over, at every timestep of the
client's chain: one model call of this many per timestep, once per finish_chain, about what
synthesising 64 images costs. The draw is seeded by a constant, so the estimate depends on the
model and the images only, not on the request's seed."""

_GAMMA_SEED = 0x6A77A


class SynthesisError(RuntimeError):
    """The server's answer broke the protocol (wrong timestep, count or shape)."""


@dataclass(frozen=True)
class SynthesisResult:
    """Images and what it took to make them."""

    images: Tensor  # (n, C, H, W) in [-1, 1]
    t_cut: int
    model_version: int
    server_seconds: float
    client_seconds: float


def receive_cut_samples(
    remote: Remote,
    req: SynthesisRequest,
    t_cut: int,
    shape: tuple[int, ...],
    parts: list[Tensor] | None = None,
) -> tuple[Tensor, int]:
    """Collect the streamed x_{t_cut}, checking every chunk's timestep, offset, count and shape.

    Returns all samples (those in `parts` before the call included) and the model version.

    A chunk that breaks the protocol stops the stream at once: no further chunk is read and
    the stream is closed (which cancels the call), so a server cannot make this client buffer
    more than the n samples it asked for.
    """
    stream = remote.synthesize(req)
    # Samples arrive from req.offset on; a caller that resumes passes the parts it already has,
    # and they keep what arrived even when the stream breaks.
    parts = [] if parts is None else parts
    got = req.offset
    version = 0
    try:
        for chunk in stream:
            _check_chunk(chunk, req, got, t_cut, shape)
            parts.append(chunk.samples)
            got += chunk.samples.shape[0]
            version = chunk.model_version
    finally:
        # Closing the generator drops the gRPC call mid-stream; a no-op once it has ended.
        close = getattr(stream, "close", None)
        if callable(close):
            close()
    if got != req.n:
        raise SynthesisError(f"server ended the stream after {got} samples, {req.n} were asked for")
    return torch.cat(parts), version


def _check_chunk(
    chunk: SynthesisChunk, req: SynthesisRequest, got: int, t_cut: int, shape: tuple[int, ...]
) -> None:
    """Raise SynthesisError unless `chunk` is the next valid piece after `got` samples."""
    if chunk.timestep != t_cut:
        raise SynthesisError(
            f"server sent timestep {chunk.timestep}, this client's t_cut is {t_cut}"
        )
    if chunk.total != req.n:
        raise SynthesisError(f"server announced {chunk.total} samples, {req.n} were asked for")
    if chunk.offset != got:
        raise SynthesisError(
            f"server sent a chunk at offset {chunk.offset}, the next sample is {got}"
        )
    if tuple(chunk.samples.shape[1:]) != tuple(shape):
        raise SynthesisError(
            f"server sent samples of shape {list(chunk.samples.shape[1:])}, this client's "
            f"images have shape {list(shape)}"
        )
    count = int(chunk.samples.shape[0])
    # An empty chunk would let a server keep the stream going forever without passing n.
    if count < 1:
        raise SynthesisError("server sent an empty chunk")
    if got + count > req.n:
        raise SynthesisError(
            f"server sent {got + count} or more samples, {req.n} were asked for; the stream "
            "was cut off"
        )


def synthesize(
    config: ClientConfig,
    n: int,
    seed: int = 0,
    sampler: SamplerKind | None = None,
    server_steps: int | None = None,
    client_steps: int | None = None,
    mixture: bool | None = None,
) -> SynthesisResult:
    """Ask the server for x_{t_cut} and finish the chain locally."""
    s = config.synth
    kind = sampler or s.sampler
    model, state = load_client_model(state_paths(config)["checkpoint"], config)
    schedule = ScheduleConfig.model_validate(state["schedule"])
    diffusion = Diffusion.from_config(schedule)
    t_cut = int(state["t_cut"])
    # The analytic sampler estimates its variance from this client's own images (they stay here).
    images = load_local_data(config.data, config.image).images if kind == "analytic" else None
    req = SynthesisRequest(
        client_id=config.client_id,
        n=n,
        seed=seed,
        sampler=kind,
        num_steps=s.server_steps if server_steps is None else server_steps,
        eta=s.eta,
        mixture=s.mixture if mixture is None else mixture,
    )
    started = time.perf_counter()
    x_cut, version = fetch_cut_samples(config, req, t_cut, s.patience_s)
    server_seconds = time.perf_counter() - started
    started = time.perf_counter()
    steps = s.client_steps if client_steps is None else client_steps
    out = finish_chain(diffusion, model, x_cut, t_cut, steps, kind, s.eta, seed, images=images)
    return SynthesisResult(out, t_cut, version, server_seconds, time.perf_counter() - started)


def fetch_cut_samples(
    config: ClientConfig, req: SynthesisRequest, t_cut: int, patience_s: float
) -> tuple[Tensor, int]:
    """Receive x_{t_cut}, waiting for a server that is away and resuming a broken stream.

    A server that restarts or stops answering is waited for (gRPC's wait_for_ready) and the
    request is sent again from the first sample not yet received, with the same seed: sample i
    depends on the seed and i only, so the result is what one unbroken stream would give (on
    the same model version). Gives up after `patience_s` seconds without progress.
    """
    parts: list[Tensor] = []
    delay = 0.5
    deadline = time.monotonic() + patience_s
    while True:
        have = sum(int(p.shape[0]) for p in parts)
        remote = Remote.for_client(config)
        try:
            return receive_cut_samples(
                remote, replace(req, offset=have), t_cut, config.image.shape, parts
            )
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            now = sum(int(p.shape[0]) for p in parts)
            if now > have:
                deadline = time.monotonic() + patience_s  # progress: patience starts again
            if code not in _TRANSIENT or time.monotonic() + delay > deadline:
                raise SynthesisError(
                    f"synthesis failed after {now} of {req.n} samples: {code.name}: {details}"
                ) from None
            log.warning(
                "synthesis interrupted after %d of %d samples (%s); retrying in %.1fs",
                now,
                req.n,
                code.name,
                delay,
            )
        finally:
            remote.close()
        time.sleep(delay)
        delay = min(2 * delay, 10.0)


def finish_chain(
    diffusion: Diffusion,
    model: nn.Module,
    x_cut: Tensor,
    t_cut: int,
    num_steps: int,
    kind: SamplerKind,
    eta: float,
    seed: int,
    images: Tensor | None = None,
) -> Tensor:
    """The client's half of the chain: from x_{t_cut} down to an image with its own model.

    The analytic sampler needs this client's images (N, C, H, W) in [-1, 1], to estimate
    Gamma_t at the chain's timesteps (local_gamma).
    """
    steps = diffusion.timesteps(t_cut, 0, num_steps)
    denoiser = UNetDenoiser(model)
    gamma = None
    if kind == "analytic":
        if images is None or images.shape[0] == 0:
            raise ValueError(
                "the analytic sampler estimates its variance from this client's images; "
                "none were given"
            )
        gamma = local_gamma(diffusion, denoiser, images.to(x_cut.device), steps[:-1])
    # The client's noise comes from its own seed stream, independent of the server's.
    gen = torch.Generator().manual_seed(seed + 0x5EED)
    with torch.inference_mode():
        return diffusion.sample_loop(denoiser, x_cut, steps, kind, eta, gen, gamma=gamma)


def local_gamma(
    diffusion: Diffusion, model: Denoiser, images: Tensor, timesteps: list[int]
) -> Tensor:
    """Gamma_t at each timestep from GAMMA_IMAGES of the images, noised to t by q_sample.

    Every timestep of the client's chain is at most t_cut, where its model was trained, so the
    exact forward process gives the samples of q(x_t). Returns (K,) float64.
    """
    gen = torch.Generator().manual_seed(_GAMMA_SEED)
    pick = torch.randperm(images.shape[0], generator=gen)[:GAMMA_IMAGES]
    x0 = images[pick]  # (n, C, H, W)

    def draw(t: int) -> Tensor:
        noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
        return diffusion.q_sample(x0, torch.full((x0.shape[0],), t, device=x0.device), noise)

    return diffusion.estimate_gamma(model, timesteps, draw)


def write_images(result: SynthesisResult, out_dir: Path) -> Path:
    """One PNG per image plus grid.png; returns the grid's path."""
    save_pngs(result.images, out_dir)
    return save_grid(result.images, out_dir / "grid.png", scale=2)
