"""The training loop: D step on real + fake in one pass, G step through a frozen D, EMA, health watch, checkpoints.

Reads top to bottom like EDM2's training_loop.py. Progress is a count of real images shown to D; every step's randomness
(batch, latents, augmentation) is a pure function of (seed, rank, images seen), so `resume` continues bit for bit.
"""

from __future__ import annotations

import copy
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.optim import swa_utils
from tqdm import tqdm

from medgan import checkpoint
from medgan.config import Config, flatten, from_dict, to_dict
from medgan.data import DeviceFeeder, step_seed
from medgan.dataset import SliceDataset
from medgan.models.discriminator import Discriminator
from medgan.models.generator import Generator, generate, standing_stats
from medgan.tracking.null import NullTracker
from medgan.train import dist, losses
from medgan.train.augment import Augment
from medgan.train.monitor import Monitor, NonFiniteError, diversity
from medgan.viz import health_figure, image_grid, save_png


@dataclass
class TrainResult:
    run_name: str
    run_dir: Path
    checkpoint: Path | None
    run_id: str | None
    model_uri: str | None
    alarms: list[str]
    images_seen: int
    metrics: dict[str, float] = field(default_factory=dict)
    ui_command: str = ""
    env: str = ""

    def summary(self) -> str:
        m = self.metrics
        lines = [
            f"run {self.run_name}: {self.images_seen / 1000:.3f} kimg on {self.env}",
            f"  loss/d {m.get('loss/d', float('nan')):.4f}  loss/g {m.get('loss/g', float('nan')):.4f}"
            f"  {m.get('perf/img_per_s', 0.0):.1f} img/s",
            f"  checkpoint: {self.checkpoint}",
            f"  model: {self.model_uri or 'not registered'}" + (f"  (run {self.run_id})" if self.run_id else ""),
        ]
        lines += [f"  WARNING: {a}" for a in self.alarms] or ["  health: no alarms"]
        if self.ui_command:
            lines.append(f"  view runs: {self.ui_command}")
        return "\n".join(lines)


def _every(kimg: float) -> int:
    return max(1, round(kimg * 1000))


def _next(images_seen: int, every: int) -> int:
    return (images_seen // every + 1) * every


def train(
    cfg: Config, data: Path, *, out_dir: Path, resume: str | None, preset: str, tracker: NullTracker | None = None
) -> TrainResult:
    """Train a class-conditional GAN on a slice dataset's train split.

    Args:
        cfg: the resolved config (model, train, track sections are used).
        data: a slice-dataset folder.
        out_dir: parent of the run folder ``<dataset>-<preset>-<id>`` (checkpoints, sample grids).
        resume: a run folder (its latest checkpoint) or a ``ckpt-*.pt`` to continue exactly; None starts fresh.
        preset: the config preset name, part of the run name.
        tracker: where params, metrics, images and the generator go (`medgan.tracking.runs.Tracker` for MLflow);
            started here on rank 0 only. None = a `NullTracker`.

    Returns:
        TrainResult with the run folder, last checkpoint, run id, registered model URI and health alarms.

    Raises:
        ValueError: bad settings, or a resume on a dataset whose content hash differs.
        FileNotFoundError: the dataset or checkpoint is missing.
        RuntimeError: training diverged (NaN/inf); the last good checkpoint is kept and named.
    """
    t = cfg.train
    losses.check_loss(t.loss)
    env = dist.setup(t)
    ds = SliceDataset.open(data)
    classes, nc = ds.classes, len(ds.classes)
    geometry = ds.geometry()  # spacing_mm / modality: exports state them in NIfTI affines and DICOM headers
    if t.batch_size % env.world_size:
        raise ValueError(f"train.batch_size={t.batch_size} must be divisible by the {env.world_size} DDP processes")
    b = t.batch_size // env.world_size  # batch per rank

    # Resume: the checkpoint fixes the architecture and the run; train settings may change (e.g. a longer total_kimg).
    state, resumed_from = None, None
    if resume:
        resumed_from, state = checkpoint.load_latest(resume)  # past a truncated newest checkpoint, with a warning
        checkpoint.check_dataset(state, ds.content_hash, Path(data), resumed_from)
        cfg.model = from_dict(state["config"]).model
        run_name, run_dir = state["run_name"], resumed_from.parent
    else:
        run_name = dist.broadcast_object(env, f"{ds.path.name}-{preset}-{uuid.uuid4().hex[:6]}")
        run_dir = Path(out_dir) / run_name
    device, mf = env.device, torch.channels_last if env.channels_last else torch.contiguous_format

    # Networks, optimizers, augmentation (Adam 2e-4, betas 0.5/0.999: Radford 2016; TTUR via lr_g != lr_d, Heusel 2017).
    torch.manual_seed(t.seed)
    G = Generator.from_config(cfg.model, nc).to(device, memory_format=mf)
    D = Discriminator.from_config(cfg.model, nc).to(device, memory_format=mf)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    # Fused Adam: one kernel over all parameters instead of a loop of elementwise ops (CPU and CUDA).
    opt_g = torch.optim.Adam(G.parameters(), lr=t.lr_g, betas=tuple(t.betas), fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=t.lr_d, betas=tuple(t.betas), fused=True)
    aug = Augment(t.augment, t.ada_target, t.ada_kimg, t.ada_interval, device)
    mon = Monitor(device, patience=t.health_patience)
    images_seen, d_step = 0, 0
    if state is not None:
        parts = {"G": G, "D": D, "G_ema": G_ema, "opt_g": opt_g, "opt_d": opt_d, "augment": aug, "monitor": mon}
        for k, m in parts.items():
            m.load_state_dict(state[k])
        images_seen, d_step = state["images_seen"], state["d_step"]
        torch.set_rng_state(state["rng"]["torch"])
    for m in (G, D, G_ema):
        dist.broadcast_module(env, m)
    # Compile on CUDA only; R1's double backward and checkpoints use the eager modules.
    G_run, D_run = (torch.compile(G), torch.compile(D)) if env.compile else (G, D)
    g_params, d_params = list(G.parameters()), list(D.parameters())
    cw = cfg.model.class_loss

    def d_out(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """D's real/fake logits [B] in fp32 and, with model.class_loss > 0, its class logits [B, classes]."""
        out = D_run(x, labels, with_class=True) if cw > 0 else (D_run(x, labels), None)
        return out[0].float(), out[1]

    feeder = DeviceFeeder(ds, device, t.seed, env.rank, env.world_size)
    fixed_labels = np.repeat(np.arange(nc), t.samples_per_class)
    fixed_seeds = np.tile(np.arange(t.samples_per_class), nc)
    real_div = np.array([diversity(feeder.images[feeder.labels == c][:16].float().cpu().numpy()) for c in range(nc)])

    # Rank 0 alone tracks. A resumed run continues its MLflow run, so its metric curves stay one line in the UI.
    tracker = tracker if tracker is not None and env.is_main else NullTracker()
    tracker.start(cfg, ds, run_name, resume_run_id=(state or {}).get("run_id"))
    tracker.log_params(
        {
            **flatten(cfg),
            "env.device": str(device),
            "env.precision": env.precision,
            "env.compile": str(env.compile),
            "env.world_size": str(env.world_size),
        }
    )
    tracker.set_tags({"preset": preset, "resumed_from": str(resumed_from or "")})

    total = int(round(t.total_kimg * 1000))
    log_every, sample_every = _every(t.log_every_kimg), _every(t.sample_every_kimg)
    ckpt_every = _every(t.ckpt_every_kimg)
    next_log, next_sample, next_ckpt = (_next(images_seen, e) for e in (log_every, sample_every, ckpt_every))
    last_ckpt = resumed_from if env.is_main else None  # the checkpoint resumed from was read whole
    metrics: dict[str, float] = {}
    history: list[dict[str, float]] = []  # one row per log interval, for the end-of-run health figure
    grad_g = grad_d = torch.zeros((), device=device)
    bar = tqdm(total=total, initial=min(images_seen, total), unit="img", disable=not (env.is_main and t.progress))
    tick_time, tick_images = time.perf_counter(), images_seen
    deadline = tick_time + t.max_minutes * 60 if t.max_minutes > 0 else None
    out_of_time = False

    label_pool = feeder.labels.cpu().numpy()
    stats_at = -1  # images_seen when G_ema's BN statistics were last set

    def ema_ready() -> None:
        # G_ema's BN statistics for its weights of now, before it is sampled, saved or registered (rank 0): standing
        # statistics (train.standing_stats images), or with 0 the trained G's running statistics.
        nonlocal stats_at
        if stats_at == images_seen:
            return
        if t.standing_stats > 0:
            standing_stats(G_ema, label_pool, t.standing_stats, b, seed=t.seed)
        else:
            with torch.no_grad():
                for be, bg in zip(G_ema.buffers(), G.buffers(), strict=True):
                    be.copy_(bg)
        stats_at = images_seen

    def snapshot() -> Path:
        state = {
            "G": G.state_dict(), "D": D.state_dict(), "G_ema": G_ema.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "augment": aug.state_dict(), "monitor": mon.state_dict(),
            "images_seen": images_seen, "d_step": d_step, "rng": {"torch": torch.get_rng_state()},
            "config": to_dict(cfg), "classes": classes, "dataset_hash": ds.content_hash,
            "run_name": run_name, "run_id": tracker.run_id, "metrics": dict(metrics), "geometry": geometry,
        }  # fmt: skip
        return checkpoint.save(run_dir / checkpoint.checkpoint_name(images_seen), state)

    try:
        while images_seen < total and not out_of_time:
            log_now = images_seen + t.d_steps * t.batch_size >= min(next_log, total)

            # D steps: real and fake.detach() concatenated in ONE D pass; G's forward is kept for the G step.
            for k in range(t.d_steps):
                gen = torch.Generator(device=device).manual_seed(step_seed(t.seed, env.rank, images_seen))
                real, y = feeder.batch(images_seen, b)
                z = torch.randn(b, G.z_dim, device=device, generator=gen)
                last = k == t.d_steps - 1
                with env.autocast(), torch.set_grad_enabled(last):
                    fake = G_run(z, y)  # (b, 1, 128, 128)
                x = aug(torch.cat([real, fake.detach().float()]), gen).contiguous(memory_format=mf)
                with env.autocast():
                    logits, cls = d_out(x, torch.cat([y, y]))  # (2b,), (2b, classes) or None
                logits_real, logits_fake = logits[:b], logits[b:]
                loss_d = losses.discriminator_loss(t.loss, logits_real, logits_fake, t.label_smoothing)
                total_d = loss_d
                if cls is not None:  # D's class head learns from real images only, so G cannot teach it its mistakes
                    total_d = total_d + cw * losses.class_loss(cls[:b], y)
                # Lazy R1 (Karras 2020): every r1_interval steps, scaled by the interval, in fp32 on eager D.
                if t.r1_gamma > 0 and d_step % t.r1_interval == 0:
                    run_d = lambda v, g=gen, c=y: D(aug(v, g).contiguous(memory_format=mf), c)  # noqa: E731
                    penalty, _ = losses.r1_penalty(run_d, real)
                    total_d = total_d + penalty.mean() * (t.r1_gamma / 2 * t.r1_interval)
                opt_d.zero_grad(set_to_none=True)
                total_d.backward()
                dist.all_reduce_grads(env, d_params)
                if log_now and last:
                    grad_d = _grad_norm(d_params)
                opt_d.step()
                mon.record_d(loss_d, logits_real, logits_fake)
                aug.observe(logits_real, t.batch_size, lambda v: dist.all_reduce_mean(env, v))
                images_seen += t.batch_size
                d_step += 1

            # G step through a frozen D: only the input gradient flows back, no D weight grads (non-saturating loss).
            D.requires_grad_(False)
            with env.autocast():
                logits_g, cls_g = d_out(aug(fake.float(), gen).contiguous(memory_format=mf), y)
            loss_g = losses.generator_loss(t.loss, logits_g)
            if cls_g is not None:
                loss_g = loss_g + cw * losses.class_loss(cls_g, y)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            D.requires_grad_(True)
            dist.all_reduce_grads(env, g_params)
            if log_now:
                grad_g = _grad_norm(g_params)
            opt_g.step()
            mon.record_g(loss_g, t.d_steps)

            # EMA of G with a half-life in images, ramped up early (Karras 2020); its BN statistics: ema_ready().
            ema_images = t.ema_kimg * 1000
            if t.ema_rampup > 0:
                ema_images = min(ema_images, images_seen * t.ema_rampup)
            beta = 0.5 ** (t.batch_size * t.d_steps / max(ema_images, 1e-8))
            with torch.no_grad():
                swa_utils.get_ema_multi_avg_fn(beta)(list(G_ema.parameters()), g_params, None)  # one fused lerp
            bar.update(min(images_seen, total) - bar.n)
            if deadline is not None and log_now:
                # The wall-clock budget, checked at log points (so it may run over by one log interval) and agreed by
                # every rank: the run ends here, logged, sampled, saved and registered as at total_kimg.
                late = torch.tensor(float(time.perf_counter() > deadline), device=device)
                out_of_time = float(dist.all_reduce_mean(env, late)) > 0
                if out_of_time:
                    tracker.set_tags({"medgan.stopped_by": f"train.max_minutes={t.max_minutes:g}"})
            done = images_seen >= total or out_of_time

            # Health watch at log intervals: the only place training metrics reach the host.
            if images_seen >= next_log or done:
                mon.sums.copy_(dist.all_reduce_mean(env, mon.sums))
                metrics = mon.read()
                now = time.perf_counter()
                metrics.update(
                    {
                        "aug/p": float(aug.p),
                        "grad/d": float(grad_d),
                        "grad/g": float(grad_g),
                        "perf/img_per_s": (images_seen - tick_images) / max(now - tick_time, 1e-9),
                    }
                )
                tick_time, tick_images = now, images_seen
                Monitor.check_finite(metrics, images_seen / 1000, str(last_ckpt) if last_ckpt else None)
                n_alarms = len(mon.alarms)
                metrics.update(mon.check_overpowering(metrics, images_seen / 1000))
                tracker.log_metrics(metrics, step=images_seen)
                history.append({"kimg": images_seen / 1000, **metrics})
                bar.set_postfix_str(
                    f"kimg {images_seen / 1000:.1f} {metrics['perf/img_per_s']:.0f} img/s "
                    f"D {metrics['loss/d']:.3f} G {metrics['loss/g']:.3f} p {metrics['aug/p']:.2f}"
                )
                _raise_alarms(mon, n_alarms, tracker, bar, env)
                next_log = _next(images_seen, log_every)

            # Fixed-noise grids per class from G_ema (rank 0), and the mode-collapse watch on the same samples.
            if images_seen >= next_sample or done:
                if env.is_main:
                    ema_ready()
                    samples = generate(G_ema, fixed_labels, fixed_seeds, device=device)
                    for c, name in enumerate(classes):
                        grid = image_grid(samples[fixed_labels == c], ncol=t.samples_per_class)
                        tracker.log_image(grid, f"samples/{name}", step=images_seen)
                    grid = image_grid(samples, ncol=t.samples_per_class)
                    save_png(grid, run_dir / "samples" / f"{images_seen:09d}.png")
                    n_alarms = len(mon.alarms)
                    health = mon.check_collapse(samples, fixed_labels, real_div, images_seen / 1000)
                    tracker.log_metrics(health, step=images_seen)
                    metrics.update(health)
                    _raise_alarms(mon, n_alarms, tracker, bar, env)
                next_sample = _next(images_seen, sample_every)

            if images_seen >= next_ckpt or done:
                # Never save a diverged state (checked on every rank so all stop together); the last good one stays.
                finite = torch.stack([p.detach().isfinite().all() for p in g_params + d_params]).all().float()
                if float(dist.all_reduce_mean(env, finite)) < 1.0:
                    kimg = images_seen / 1000
                    raise NonFiniteError(
                        f"parameters became NaN/inf at {kimg:.3f} kimg; the last good checkpoint is {last_ckpt}"
                    )
                if env.is_main:
                    ema_ready()
                    last_ckpt = snapshot()
                next_ckpt = _next(images_seen, ckpt_every)
        bar.close()

        # The end: a health figure, register the EMA generator, close the run.
        if env.is_main and history:
            tracker.log_artifact(health_figure(history, run_dir / "health.png"))
        if env.is_main and cfg.track.register:
            ema_ready()
            tracker.register_generator(G_ema, cfg, classes, ds.content_hash, metrics, step=images_seen)
        tracker.finish("FINISHED")  # catches up what a tracking outage kept (the registration included)
    except BaseException:
        bar.close()
        tracker.finish("FAILED")
        dist.cleanup(env)
        raise
    dist.barrier(env)
    dist.cleanup(env)
    return TrainResult(
        run_name=run_name,
        run_dir=run_dir,
        checkpoint=last_ckpt,
        run_id=tracker.run_id,
        model_uri=tracker.model_uri,
        alarms=list(mon.alarms),
        images_seen=images_seen,
        metrics=metrics,
        ui_command=tracker.ui_command(),
        env=env.describe(),
    )


def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _raise_alarms(mon: Monitor, n_before: int, tracker, bar: tqdm, env: dist.Env) -> None:
    """Print new alarms and record them as tags (metrics carry the 0/1 flags)."""
    for message in mon.alarms[n_before:]:
        if env.is_main:
            bar.write(f"medgan: WARNING: {message}")
        tracker.set_tags({f"alarm/{message.split(' at ')[0].replace(' ', '_')}": message})
