"""The one training loop, for both stages, over DeepSpeed.

Per optimizer step: set the LR (a pure function of the step), run `grad_accum_steps` micro-batches
through the stage, all-reduce a [non-finite loss, stop requested] flag pair each micro-batch, back
-propagate through each engine that got a loss, step at the window's end, update the EMA only when
the main engine's step was applied, then log / validate / preview / checkpoint as scheduled.

A window with a non-finite loss on any rank is dropped on every rank: its gradients are discarded,
no optimizer steps, the EMA is untouched, the step counter advances and `nonfinite_skipped` counts
it. `max_consecutive_nonfinite` such steps in a row abort with EXIT_NONFINITE, leaving the last
good checkpoint as it was.

Faults (issue 21): a checkpoint that cannot be written (full disk) ends the run with EXIT_SAVE_FAILED, the
previous complete checkpoint intact; a collective that fails or times out (a peer died or hung,
`runtime.collective_timeout_s`), or a step counter that stops advancing (launch/runtime/watchdog.py), ends
the rank at once with EXIT_PEER_LOST and saves nothing from that state.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from . import dist as D
from launch.report.html import write_report_safely

from .batches import to_device
from .checkpoint import CheckpointManager, CheckpointSaveFailed, capture_rng, tag_for
from .config import Config
from .configio import ConfigError, config_hash, dump_yaml, to_plain
from .ema import EMA
from .engine import (build_engine, check_runtime_config, discard_gradients, grads_finite, lr_factor,
                     optimizer_state_bytes, set_lr)
from .images import save_grid
from .latentstats import write_latent_statistics
from .init import initialise, start_ema
from .metrics import MetricsWriter, WandbLogger, data_counters, data_record
from .posthoc import PosthocEMA
from .progress import TrainProgress
from .resume import LogWindow, resume, seed_everything
from .runlock import RunDirLocked, RunLock
from .throughput import ThroughputMeter
from .signals import EXIT_LOCKED, EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, EXIT_SAVE_FAILED, StopFlag
from .universal import needs_universal
from .validation import Validator
from .watchdog import (StallWatchdog, attempt_identity, collective_failed, exit_peer_lost, leave_peer_lost,
                       repeated_failure)


@dataclass
class TrainResult:
    status: str          # "completed" | "preempted" | "nonfinite" | "save_failed" | "locked"
    step: int
    exit_code: int


class NonFiniteAbort(RuntimeError):
    pass


def flush_denormals() -> None:
    """Treat denormal floats as zero on CPU. Late in training, tiny optimizer moments and
    activations become denormal and x86 arithmetic on them is ~100x slower: a demo autoencoder
    step went from 0.06 s to 6.8 s at step ~900 without this. No effect on CUDA."""
    torch.set_flush_denormal(True)


class Trainer:
    def __init__(self, cfg: Config, env: D.DistEnv, stage, train_data, val_data: Callable[[], Iterable] | None = None,
                 eval_module_factory: Callable[[], torch.nn.Module] | None = None,
                 log: Callable[[str], None] | None = None,
                 stats_data: Callable[[], Iterable] | None = None):
        check_runtime_config(cfg)
        self.cfg, self.env, self.stage = cfg, env, stage
        self.train_data = train_data
        self.val_data = val_data                      # a callable giving a fresh one-pass iterable
        self.eval_module_factory = eval_module_factory
        self.stats_data = stats_data                  # fresh training batches for stage one's latent statistics
        self.run_dir = Path(cfg.run_dir)
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * env.world_size

    def log(self, msg: str) -> None:
        if self.env.is_main:
            self._log(f"[ldm] {msg}")

    # ------------------------------------------------------------------ setup

    def _write_run_files(self) -> None:
        locked = None
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                self.run_lock = RunLock(self.run_dir).acquire(self.log)   # one writer per run directory
            except RunDirLocked as e:
                locked = e
            else:
                (self.run_dir / "samples").mkdir(exist_ok=True)
                (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
        # every rank learns whether rank 0 holds the lock (this collective is also the barrier)
        if D.all_reduce_max([1.0 if locked else 0.0], self.env.device)[0]:
            raise locked or RunDirLocked(f"run directory {self.run_dir} is in use by another run (see rank 0)")

    def _meta(self) -> dict:
        return {"world_size": self.env.world_size, "zero_stage": self.cfg.deepspeed.zero_stage,
                "config_hash": config_hash(self.cfg), "config": to_plain(self.cfg), "engines": list(self.engines),
                "main_module": self.stage.main_module, "ema": self.ema is not None,
                "precision": self.cfg.train.precision, "global_batch": self.global_batch,
                "stage": self.cfg.stage}

    def _rank_state(self, step: int) -> dict:
        data_state = self.train_data.state_dict() if hasattr(self.train_data, "state_dict") else {}
        return {"step": step, "rng": capture_rng(), "data_json": json.dumps(data_state),
                "window": self.window.state(), "counters": dict(self.counters)}

    # ------------------------------------------------------------------ main

    def run(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        flush_denormals()
        if (repeated := repeated_failure(self.run_dir, self.log)) is not None:   # a restart must not undo an end
            return TrainResult(*repeated)
        try:
            self._write_run_files()
        except RunDirLocked as e:
            print(f"[ldm] error: {e}", file=sys.stderr, flush=True)
            return TrainResult("locked", 0, EXIT_LOCKED)
        seed_everything(cfg.train.seed)                      # identical initial weights on every rank
        modules = self.stage.trainable_modules()
        if cfg.train.activation_checkpointing:
            for name, m in modules.items():
                if not hasattr(m, "set_activation_checkpointing"):
                    raise ConfigError(f"config key 'train.activation_checkpointing' = true, but the "
                                      f"'{name}' module has no activation checkpointing")
                m.set_activation_checkpointing(True)
        # Which checkpoint (if any) we resume decides how the engines are built: one written at
        # another world size loads through DeepSpeed's universal format.
        self.ckpt = CheckpointManager(self.run_dir, env, cfg.train.keep_checkpoints)
        tag = self.ckpt.find_resumable(self.log)
        meta = None
        while tag is not None and meta is None:     # a tag that vanished since: re-resolve the newest complete one
            try:
                meta = self.ckpt.read_meta(tag)
            except FileNotFoundError:
                self.log(f"warning: checkpoint {tag} vanished before it was read; looking again")
                tag = self.ckpt.find_resumable(self.log)
        # init.from: weights only, before any engine exists; a checkpoint to resume takes precedence
        init_ema = initialise(cfg, self.stage, self.log, env.is_main) if tag is None else None
        universal = tag is not None and needs_universal(meta, env.world_size)
        self.engines = {name: build_engine(m, self.stage.param_groups(name), cfg, load_universal=universal)
                        for name, m in modules.items()}
        if cfg.train.compile:
            for e in self.engines.values():
                e.compile()
        self.main = self.engines[self.stage.main_module]
        self.ema = EMA(self.main.module, cfg.ema) if cfg.ema.enabled else None
        if init_ema is not None and self.ema is not None:
            start_ema(self.ema, init_ema, env.rank, env.world_size)
        self.posthoc = PosthocEMA.build(self.main.module, cfg, self.run_dir, env)   # EDM2 post-hoc profiles
        self.validator = Validator.build(cfg, env, self.stage, self.val_data, self.log)
        self.stage.setup(env.device)
        if hasattr(self.stage, "set_collectives") and env.world_size > 1:
            # state updated inside forward (VQ codebook usage / EMA codebooks) must agree across ranks
            self.stage.set_collectives(D.all_reduce_sum_, D.broadcast_)
        self.window = LogWindow()
        self.meter = ThroughputMeter.for_config(cfg, env.device)
        self.counters = {"nonfinite_skipped": 0, "consecutive_nonfinite": 0}
        self._logged_memory = False

        step = 0
        if tag is not None:
            step = resume(self, tag)
            self.meter.resume_from(self.run_dir / "metrics.jsonl")   # never count after resume
        else:
            seed_everything(cfg.train.seed * 1_000_003 + env.rank + 1)  # per-rank noise / dropout streams
        self.last_saved_step = step if tag is not None else -1

        self.metrics = None
        self.wandb = None
        if env.is_main:
            dropped = MetricsWriter.truncate_after(self.run_dir / "metrics.jsonl", step)
            if dropped:
                self.log(f"dropped {dropped} metrics records logged after step {step} (they will be re-logged)")
            self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl")
            if cfg.logging.wandb:
                self.wandb = WandbLogger(self.run_dir, cfg.logging.wandb_project, cfg.logging.wandb_entity,
                                         cfg.logging.wandb_run_name, to_plain(cfg))
        if tag is None and self.posthoc is not None:
            self.posthoc.drop_after(0)                        # snapshots of an earlier start that left no checkpoint
        if self.validator is not None and tag is None:
            self._validate(0)                                 # the step-0 baseline of the validation curves
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0):
            self.log(f"torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']} of at most "
                     f"{os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')} (runtime.max_restarts): at step {step}")
        self.watchdog = (StallWatchdog(cfg.runtime.collective_timeout_s, env.rank, self._leave_peer_lost).start()
                         if env.world_size > 1 else None)
        stop = StopFlag().install()
        progress = TrainProgress(enabled=env.is_main and cfg.logging.progress, start_step=step,
                                 max_steps=cfg.train.max_steps, images_per_step=self.global_batch,
                                 desc=f"train {cfg.stage}")
        self._log_fn = progress.write if env.is_main else None
        # The stop flag stays installed until result.json is written: torchrun sends SIGTERM to the
        # remaining workers as soon as one exits, which must not kill rank 0 mid-write.
        try:
            try:
                try:
                    status, step = self._loop(step, stop, progress)
                finally:
                    progress.close()
                if status == "completed" and hasattr(self.stage, "latent_statistics"):
                    with self._paused():
                        self._latent_statistics(step)
                with self._paused():
                    self._finish(status, step)
                return TrainResult(status, step, EXIT_OK if status == "completed" else EXIT_PREEMPTED)
            except NonFiniteAbort as e:
                self.log(str(e))
                self._finish("nonfinite", self.step_reached)
                return TrainResult("nonfinite", self.step_reached, EXIT_NONFINITE)
            except CheckpointSaveFailed as e:
                # every rank raised it after agreeing on the failure: the group is healthy, the run stops here
                self.log(f"error: {e}")
                self._finish("save_failed", self.step_reached, message=str(e))
                return TrainResult("save_failed", self.step_reached, EXIT_SAVE_FAILED)
            except Exception as e:
                if env.world_size > 1 and D.is_collective_error(e):
                    exit_peer_lost(collective_failed(env.rank, self.step_reached, e, cfg.runtime.collective_timeout_s),
                                   self._leave_peer_lost)
                raise
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            stop.restore()

    def _paused(self):
        return self.watchdog.paused() if self.watchdog is not None else contextlib.nullcontext()

    def _leave_peer_lost(self) -> None:
        if self.env.is_main:   # no barrier: a peer is gone
            leave_peer_lost(self.run_dir, getattr(self, "step_reached", 0), getattr(self, "run_lock", None))

    def _latent_statistics(self, step: int) -> None:
        write_latent_statistics(self, step)

    def _finish(self, status: str, step: int, message: str | None = None) -> None:
        D.barrier()
        if self.env.is_main:
            record = {"status": status, "step": step, "time": time.time(), **({"message": message} if message else {}),
                      **attempt_identity()}
            try:
                (self.run_dir / "result.json").write_text(json.dumps(record))
            except OSError as e:          # a full disk must not turn a clear status into a traceback
                self.log(f"warning: could not write {self.run_dir / 'result.json'}: {e}")
            if self.metrics:
                self.metrics.close()
            if self.wandb:
                self.wandb.finish()

    def _loop(self, step: int, stop: StopFlag, progress: TrainProgress) -> tuple[str, int]:
        cfg, env = self.cfg, self.env
        gas = cfg.train.grad_accum_steps
        autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16"
                    else contextlib.nullcontext())
        data_iter = iter(self.train_data)
        t_window = time.time()
        self.step_reached = step
        status = "completed"
        while step < cfg.train.max_steps:
            factor = lr_factor(cfg.optimizer, step, cfg.train.max_steps)
            lrs = {name: set_lr(e, factor) for name, e in self.engines.items()}
            poisoned = False
            backwarded: list[str] = []
            stop_seen = False
            for micro in range(gas):
                boundary = micro == gas - 1
                batch = to_device(next(data_iter), env.device)
                losses: dict = {}
                logs: dict = {}
                if micro == 0:
                    self.meter.start_count()        # FLOPs of forward + backward, once (throughput.py)
                if not poisoned:
                    with autocast:
                        losses, logs = self.stage.training_step(self.engines, batch, step)
                    bad = any(not bool(torch.isfinite(l.detach()).all()) for l in losses.values())
                else:
                    bad = True
                flags = D.all_reduce_max([float(bad) if cfg.train.nonfinite_check or poisoned else 0.0,
                                          float(stop.requested)], env.device)
                stop_seen = stop_seen or flags[1] > 0
                if flags[0] > 0:
                    poisoned = True
                    self.meter.stop_count(backward_ran=False)
                    continue
                for name, loss in losses.items():
                    engine = self.engines[name]
                    engine.set_gradient_accumulation_boundary(boundary)
                    engine.backward(loss)
                    if name not in backwarded:
                        backwarded.append(name)
                    if not boundary:
                        engine.step()
                self.meter.stop_count(backward_ran=bool(losses))
                self.window.add({("loss" if n == self.stage.main_module else f"loss/{n}"): l
                                 for n, l in losses.items()})
                self.window.add(logs)
            self.window.images += self.global_batch

            applied = False
            if poisoned:
                for name in backwarded:
                    discard_gradients(self.engines[name])
            else:
                for name in backwarded:
                    engine = self.engines[name]
                    if cfg.deepspeed.zero_stage == 0 and not grads_finite(engine):
                        discard_gradients(engine)  # grads are all-reduced: every rank decides alike
                        continue
                    engine.step()
                    if engine.was_step_applied():
                        key = f"steps_applied/{name}"
                        self.counters[key] = self.counters.get(key, 0) + 1
                    if name == self.stage.main_module:
                        applied = engine.was_step_applied()
            if applied and self.ema is not None:
                self.ema.update(step)
            if applied and self.posthoc is not None:
                self.posthoc.update(step)
            if poisoned or not applied:
                self.counters["nonfinite_skipped"] += 1
                self.counters["consecutive_nonfinite"] += 1
                if self.counters["consecutive_nonfinite"] >= cfg.train.max_consecutive_nonfinite:
                    self.step_reached = step
                    raise NonFiniteAbort(
                        f"aborting: {self.counters['consecutive_nonfinite']} consecutive steps with a non-finite "
                        f"loss or gradient (up to step {step}); the last good checkpoint is untouched. "
                        "Lower the learning rate, check the data, or raise train.max_consecutive_nonfinite.")
            else:
                self.counters["consecutive_nonfinite"] = 0
            step += 1
            self.step_reached = step
            if self.watchdog is not None:
                self.watchdog.beat(step)
            progress.update(step, loss=self.window.means().get("loss", float("nan")))

            if step % cfg.train.log_every == 0:
                self._log_step(step, lrs, time.time() - t_window)
                t_window = time.time()
            if self.validator is not None and self.validator.due(step):
                with self._paused():
                    self._validate(step)
            if self.posthoc is not None and self.posthoc.due(step, cfg.train.max_steps):
                with self._paused():
                    self.posthoc.snapshot(step)
            if cfg.validation.sample_every and step % cfg.validation.sample_every == 0:
                with self._paused():
                    self._preview(step)
            if stop_seen or step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps:
                with self._paused():
                    self._save(step)
            if stop_seen:
                self.log(f"stopping at step {step} on request (checkpoint saved)")
                status = "preempted"
                break
        return status, step

    # ------------------------------------------------------------------ periodic work

    def _save(self, step: int) -> None:
        """Collective. A failed write raises CheckpointSaveFailed on every rank (run() stops with
        EXIT_SAVE_FAILED): never train on without checkpoints."""
        if step == self.last_saved_step:
            return
        self.ckpt.save(step, self.engines, self.ema, self._rank_state(step), self._meta(), also=self.posthoc)
        self.last_saved_step = step
        self.log(f"checkpoint {tag_for(step)} saved")
        if self.env.is_main:   # RUN_DIR/report.html, always current; a failure only warns
            write_report_safely(self.run_dir, self.log)

    def _log_step(self, step: int, lrs: dict[str, float], elapsed: float) -> None:
        means = D.all_reduce_mean(self.window.means(), self.env.device)
        data = D.all_reduce_sum_counts(data_counters(self.train_data))
        perf = self.meter.window(self.cfg.train.log_every, elapsed)   # MFU of this rank; peak memory: the busiest
        perf.update({k: D.all_reduce_max([v], self.env.device)[0] for k, v in perf.items() if k.startswith("mem/")})
        record: dict[str, Any] = {"step": step, **means, "lr": lrs[self.stage.main_module],
                                  "img_per_s": self.window.images / max(elapsed, 1e-9),
                                  "samples_seen": step * self.global_batch,
                                  "nonfinite_skipped": self.counters["nonfinite_skipped"]}
        grad_norm = self.main.get_global_grad_norm()
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        record.update({k: v for k, v in self.counters.items() if k.startswith("steps_applied/")})
        if not self._logged_memory:
            # once per start: what ZeRO leaves on the busiest rank (see docs/scaling.md / ldm plan)
            self._logged_memory = True
            for name, engine in self.engines.items():
                record[f"mem/optimizer_state_bytes_max/{name}"] = D.all_reduce_max(
                    [float(optimizer_state_bytes(engine))], self.env.device)[0]
        record.update(perf)
        record.update(data_record(data))
        self.window.reset()
        if self.env.is_main:
            self.metrics.write(record)
            if self.wandb:
                self.wandb.log(record, step)

    def _val_batches(self) -> Iterable:
        return self.val_data() if self.val_data is not None else []

    def _validate(self, step: int) -> None:
        """Fixed-set validation of the live and EMA weights on every rank (launch/runtime/validation.py)."""
        record = self.validator.evaluate(self.engines, self.ema)
        if record and self.env.is_main:
            self.metrics.write({"step": step, **record})
            if self.wandb:
                self.wandb.log(record, step)

    def full_main_state(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """Full fp32 weights of the main module (EMA or live) plus its buffers. Collective."""
        module = self.main.module
        if use_ema and self.ema is not None:
            weights = self.ema.full_state_dict()
        elif any(hasattr(p, "ds_id") for p in module.parameters()):
            import deepspeed

            weights = {}
            for name, p in module.named_parameters():
                with deepspeed.zero.GatheredParameters([p]):
                    weights[name] = p.detach().float().clone()
        else:
            weights = {n: p.detach().float().clone() for n, p in module.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
        return {**weights, **buffers}

    def _preview(self, step: int) -> None:
        if self.eval_module_factory is None or (self.val_data is None and not self.cfg.validation.prompts):
            return
        state = self.full_main_state(use_ema=True)   # collective under ZeRO-3
        if self.env.is_main:
            module = self.eval_module_factory()
            missing, unexpected = module.load_state_dict(state, strict=False)
            if unexpected:
                raise RuntimeError(f"preview module does not match the trained one: unexpected {unexpected[:5]}")
            module.to(self.env.device).eval()
            if self.cfg.validation.prompts and self.cfg.stage == "diffusion":
                batch = {"caption": list(self.cfg.validation.prompts)}
            else:
                batch = next(iter(self._val_batches()))
                batch = {k: (v[: self.cfg.validation.num_images] if hasattr(v, "__getitem__") else v)
                         for k, v in batch.items()}
            with torch.random.fork_rng(devices=[]):
                images = self.stage.preview(module, to_device(batch, self.env.device), seed=self.cfg.train.seed)
            path = save_grid(images, self.run_dir / "samples" / f"step_{step:08d}.png")
            if self.wandb:
                self.wandb.log_image("samples", path, step)
        D.barrier()

    def close(self) -> None:
        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()
            self.run_lock = None
        for engine in getattr(self, "engines", {}).values():
            if hasattr(engine, "destroy"):
                engine.destroy()
        self.engines = {}
        if hasattr(self.train_data, "close"):
            self.train_data.close()


def run_training(cfg: Config, build_stage: Callable[[Config], Any],
                 build_data: Callable[[Config, D.DistEnv], tuple[Any, Callable[[], Iterable] | None]],
                 eval_module_factory: Callable[[], torch.nn.Module] | None = None,
                 stats_data: Callable[[], Iterable] | None = None) -> TrainResult:
    """Initialise the process group, build stage and data, train, tear everything down."""
    check_runtime_config(cfg)
    flush_denormals()
    if (repeated := repeated_failure(cfg.run_dir, lambda m: print(f"[ldm] {m}", file=sys.stderr))) is not None:
        return TrainResult(*repeated)   # before joining a process group: torchrun gives up the sooner
    env = D.init_distributed(timeout_s=cfg.runtime.collective_timeout_s)
    trainer = None
    try:
        seed_everything(cfg.train.seed)          # same initial weights on every rank
        stage = build_stage(cfg)
        train_data, val_data = build_data(cfg, env)
        trainer = Trainer(cfg, env, stage, train_data, val_data, eval_module_factory, stats_data=stats_data)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        D.destroy()
