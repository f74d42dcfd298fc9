"""The model manager: loads versions from the store, hands them out per frame,
swaps them under load and watches a new version through its probation.

Following TF Serving's ServableHandle rule, the pipeline never keeps a model
between frames: it calls :meth:`ModelManager.acquire` for each frame and
releases the model when the frame is done, so a new version can be switched
in between two frames and the old one closed once no frame holds it.

Every change of what serves (start, activate, rollback, labels, remove) is a
*transaction*, serialised by one lock, in this order: load and verify the new
version while the old one serves, write the state file (atomically), switch
in memory, retire the old version. A failure before the switch leaves the old
version serving and the state file untouched. See docs/lifecycle.md.

What lives elsewhere: the loaded version itself (:mod:`.servable`), which
version serves and how to swap it in (:mod:`.policy`, pure functions), the
probation verdict and its thread (:mod:`.probation`), the state file
(:mod:`.state`) and the directories (:mod:`.store`).

Ownership and thread-safety:

* The manager owns its slots (one :class:`Slot` per configured model) and
  every :class:`LoadedModel` in them; nothing outside reads or changes a
  slot. A frame holds a model only between :meth:`ModelManager.acquire` and
  the release at the end of its ``with`` block.
* ``_tx`` (a re-entrant lock) serialises the transactions: start, stop,
  activate, rollback, remove, set_label, collect, reject_installed, a
  probation verdict, and a caller's :meth:`ModelManager.transaction` block.
  A slot's ``state`` (the state file's record, its probation and that
  probation's watch included) is changed only while holding it. Loading a
  version happens inside a transaction, while frames are served.
* ``_cond`` (a condition, never held across a load or a file write) guards
  what frames read and change: a slot's ``serving``, ``loaded`` and
  ``gap_since``, and each model's ``refs`` and ``retired``. Frames wait on it
  during a resource-preserving swap's gap; a transaction waits on it for
  frames in flight. Lock order: ``_tx`` before ``_cond``, never the reverse.
* Reads without ``_tx`` (``status``, the probation supervisor's judging, the
  version a label picks) see a whole state object or its predecessor; the
  supervisor acts on a verdict only inside a transaction, and only if the
  probation it judged is still the one recorded.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

from edge_agent.bundles import Bundle
from edge_agent.config import ModelConfig
from edge_agent.errors import BundleError, EdgeAgentError, ModelNotAvailable, TaskMismatch
from edge_agent.faults import checkpoint
from edge_agent.models import policy
from edge_agent.models.probation import Supervisor, baseline_ms, judge
from edge_agent.models.servable import LoadedModel, close_in_background, lower_priority
from edge_agent.models.state import ModelState, Probation, Watch
from edge_agent.models.store import ModelStore, StoreError, installed_as

log = logging.getLogger(__name__)

EventSink = Callable[[dict[str, Any]], None]

ACQUIRE_TIMEOUT_S = 30.0  # longest a frame waits for a model during a resource-preserving swap


@dataclass
class Slot:
    """Everything the manager holds for one model name (``state`` changed
    under the manager's ``_tx``; ``serving``, ``loaded`` and ``gap_since``
    under its ``_cond``, see the module docstring)."""

    cfg: ModelConfig
    policy: policy.Policy
    state: ModelState = field(default_factory=ModelState)
    serving: LoadedModel | None = None
    loaded: dict[int, LoadedModel] = field(default_factory=dict)
    gap_since: float | None = None  # set while a resource-preserving swap has nothing serving


@dataclass
class Swap:
    """What :meth:`ModelManager._swap` prepared: the version that served, the
    one that will, and the numbers a reply reports."""

    mode: str  # "availability" or "resource"
    load_ms: float
    old: LoadedModel | None
    new: LoadedModel
    gap_ms: float | None = None  # 0 for availability; measured at the switch for resource

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "load_ms": self.load_ms}
        if self.gap_ms is not None:
            out["gap_ms"] = self.gap_ms
        return out


def _policy_of(cfg: ModelConfig) -> policy.Policy:
    return policy.Policy(kind=cfg.version_policy, latest=cfg.latest, versions=tuple(cfg.versions))


class ModelManager:
    """Owns the loaded models and every transaction on them.

    Every public method may be called from any thread (see the module
    docstring for the locks); ``acquire`` never waits for a transaction.

    ``trusted_keys``: public key files; when given, every bundle must be signed
    by one of them (checked at install and again at every load).
    ``on_event``: called with each lifecycle event (activated, rolled back, ...).
    ``memory_available``: bytes of free memory (psutil by default), measured
    at each swap for ``swap = "auto"`` (see :func:`policy.swap_mode`).
    """

    def __init__(
        self,
        store: ModelStore,
        configs: list[ModelConfig],
        *,
        trusted_keys: Sequence[Path] = (),
        on_event: EventSink | None = None,
        memory_available: Callable[[], int] | None = None,
        supervise_interval_s: float = 0.1,
        probation: bool = True,
    ) -> None:
        self.store = store
        self.trusted_keys = list(trusted_keys) or None
        self.on_event = on_event
        self._memory_available = memory_available
        self._cond = threading.Condition()
        self._tx = threading.RLock()
        self._slots: dict[str, Slot] = {c.name: Slot(cfg=c, policy=_policy_of(c)) for c in configs}
        self._stop = threading.Event()
        self._supervisor = Supervisor(self._watching, self._check_probations, supervise_interval_s)
        # Off for the offline `models` CLI: with no frames flowing there is
        # nothing to judge, and the operator chose the version.
        self.probation_enabled = probation
        # The models sources feed camera frames to (set by the agent, read
        # at each load): a tensor model cannot serve those.
        self.framed: Callable[[], Collection[str]] = lambda: ()

    # -- events ------------------------------------------------------------

    def _event(self, event: str, model: str, version: int | None = None, **fields: Any) -> None:
        msg = {"ts": time.time(), "event": event, "model": model, "version": version, **fields}
        level = logging.WARNING if event in ("rolled_back", "load_failed", "probation_failed") else logging.INFO
        log.log(level, "model %s: %s%s %s", model, event, f" v{version}" if version is not None else "",
                {k: v for k, v in fields.items() if v is not None} or "")
        if self.on_event is not None:
            try:
                self.on_event(msg)
            except Exception:
                log.exception("an event sink failed")

    # -- start / stop ------------------------------------------------------

    def start(self, *, require: bool = True) -> None:
        """Recover the store and load what each model's policy wants.
        ``require=False`` (the offline ``models`` CLI) leaves a model with no
        installed version unloaded instead of failing."""
        with self._tx:
            self.store.clean_staging()
            for slot in self._slots.values():
                if not require and not self.store.versions(slot.cfg.name) and slot.cfg.bundle is None:
                    continue
                self._start_model(slot)
        self._supervisor.start()

    def _start_model(self, slot: Slot) -> None:
        cfg = slot.cfg
        name = cfg.name
        state = self.store.recover(name)
        verified = None  # the configured bundle, when installed just now
        if not self.store.versions(name):
            if cfg.bundle is None:
                raise ModelNotAvailable(
                    f"model {name}: the store {self.store.root} holds no version and no bundle is configured"
                )
            with self.store.open_incoming(cfg.bundle, trusted_keys=self.trusted_keys) as bundle:
                if bundle.manifest.name != name:
                    raise EdgeAgentError(
                        f"model {name}: bundle {cfg.bundle} is named {bundle.manifest.name!r}", code="name_mismatch"
                    )
                verified = installed_as(bundle, self.store.install(bundle)[0])
            state.record("installed", bundle.manifest.version, reason=f"configured bundle {cfg.bundle}")
        rearm = None
        if state.probation is not None and state.probation.clean_stop and state.probation.version == state.active:
            # A clean restart during probation: the version gets a new one.
            rearm = state.probation
            rearm.clean_stop = False
            rearm.restarts += 1
        elif state.probation is not None:
            # The agent stopped (crash, power cut, kill) while a version was on
            # probation: do not trust it, go back to the version before it.
            p = state.probation
            back = p.previous if p.previous is not None else state.last_good
            if back is not None and back != p.version and back in self.store.versions(name):
                state.failed[p.version] = "the agent stopped during its probation"
                state.active = back
                state.record("rolled_back", p.version, reason="the agent stopped during its probation", to=back)
                self._event("rolled_back", name, p.version, to=back, reason="the agent stopped during its probation")
            state.probation = None
        slot.state = state
        snap = self._snapshot(slot)
        planned = policy.plan(slot.policy, snap)
        candidates = ([planned.serving] if planned.serving is not None else []) + policy.fallbacks(
            slot.policy, snap, state.last_good
        )
        serving = None
        for version in candidates:
            try:
                fresh = verified if verified is not None and verified.manifest.version == version else None
                serving = self._load_version(slot, version, fresh)
                break
            except TaskMismatch:
                raise  # the config's fault (a source on a tensor model), not the version's: nothing recorded
            except EdgeAgentError as exc:
                state.failed[version] = f"{exc.code}: {exc}"
                state.record("load_failed", version, reason=str(exc))
                self._event("load_failed", name, version, code=exc.code, message=str(exc))
        if serving is None:
            self._save(slot)
            raise ModelNotAvailable(f"model {name}: no installed version could be loaded (see the errors above)")
        state.active = serving.version
        if state.last_good is None:
            state.last_good = serving.version
        state.failed.pop(serving.version, None)
        if rearm is not None and rearm.version == serving.version and self.probation_enabled:
            state.probation = rearm
        else:
            state.probation = None
        self._save(slot)
        with self._cond:
            slot.serving = serving
            slot.loaded[serving.version] = serving
            if state.probation is not None:
                state.probation.watch = Watch(time.monotonic(), None, 0, 0)
                self._supervisor.wake()
        self._reconcile(slot)
        # What crashed or failed deploys left behind (versions installed and
        # never activated, versions failed on the way back from a probation).
        self._collect(slot, "collected at start")
        log.info(
            "model %s version %d serving (%s, %s, input %s)",
            name,
            serving.version,
            serving.manifest.runtime,
            serving.manifest.task,
            serving.manifest.inputs[0].shape,
        )

    def stop(self) -> None:
        self._stop.set()
        self._supervisor.stop()
        with self._tx:
            for slot in self._slots.values():
                if slot.state.probation is not None:
                    slot.state.probation.clean_stop = True
                    try:
                        self._save(slot)
                    except EdgeAgentError as exc:
                        log.error("model %s: %s", slot.cfg.name, exc)
        with self._tx, self._cond:
            deadline = time.monotonic() + 10.0
            while any(m.refs for s in self._slots.values() for m in s.loaded.values()):
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    break
            for slot in self._slots.values():
                for model in slot.loaded.values():
                    model.close()
                slot.loaded.clear()
                slot.serving = None

    # -- serving -----------------------------------------------------------

    @contextmanager
    def acquire(self, name: str, label: str | None = None, version: int | None = None) -> Iterator[LoadedModel]:
        """A version of ``name`` for the duration of one frame: by default the
        active one; by ``label`` (the active one when the label is not set) or
        an explicit loaded ``version``. Waits while a resource-preserving swap
        has nothing serving."""
        with self._cond:
            slot = self._slots.get(name)
            if slot is None:
                raise ModelNotAvailable(f"model {name} is not configured")
            model = self._pick(slot, label, version)
            if model is None and version is None:
                deadline = time.monotonic() + ACQUIRE_TIMEOUT_S
                while model is None and slot.gap_since is not None and not self._stop.is_set():
                    self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
                    if time.monotonic() >= deadline:
                        break
                    model = self._pick(slot, label, version)
            if model is None:
                what = f"version {version}" if version is not None else "a version"
                raise ModelNotAvailable(f"model {name}: {what} is not loaded")
            model.refs += 1
        try:
            yield model
        finally:
            close = False
            with self._cond:
                model.refs -= 1
                if model.refs == 0 and model.retired and not model.closed:
                    close = True
                self._cond.notify_all()
            if close:
                close_in_background(model)  # not on the frame's thread: the next frame must not wait

    def _pick(self, slot: Slot, label: str | None, version: int | None) -> LoadedModel | None:
        if version is not None:
            return slot.loaded.get(version)
        if label is not None and label in slot.state.labels:
            labelled = slot.loaded.get(slot.state.labels[label])
            if labelled is not None:
                return labelled
        return slot.serving

    def active_version(self, name: str) -> int | None:
        """The version of ``name`` that serves (the state file's active one
        while none is loaded), as in :meth:`status`."""
        slot = self._slot(name)
        with self._cond:
            serving = slot.serving
        return serving.version if serving else slot.state.active

    def status(self) -> dict[str, Any]:
        """Per model: active version, installed versions, labels, runtime, and
        the lifecycle details (last good, probation, loaded, failed)."""
        out = {}
        for name, slot in self._slots.items():
            with self._cond:
                serving = slot.serving
                loaded = sorted(slot.loaded)
                state = slot.state.model_copy(deep=True)
            watch = state.probation.watch if state.probation is not None else None
            out[name] = {
                "active": serving.version if serving else state.active,
                "versions": self.store.versions(name),
                "labels": dict(state.labels),
                "runtime": serving.manifest.runtime if serving else None,
                "last_good": state.last_good,
                "loaded": loaded,
                "probation": None if state.probation is None or watch is None else {
                    "version": state.probation.version,
                    "elapsed_s": round(time.monotonic() - watch.started, 3),
                },
                "failed": {str(k): v for k, v in state.failed.items()},
            }
        return out

    def model_stats(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, slot in self._slots.items():
            with self._cond:
                serving = slot.serving
            if serving is None:
                out[name] = {"version": None}
                continue
            frames, errors, times = serving.stats.snapshot()
            out[name] = {
                "version": serving.version,
                "frames": frames,
                "errors": errors,
                "infer_ms_p50": round(statistics.median(times), 3) if times else None,
            }
        return out

    # -- transactions ------------------------------------------------------

    @contextmanager
    def transaction(self, name: str) -> Iterator[None]:
        """A block of steps on model ``name`` that no other transaction may
        come between: a deploy's install, or its load, activation and, on a
        failure, cleanup.

        Raises ``unknown_model`` (a :class:`StoreError`) before the block when
        ``name`` is not configured. For the block's duration the calling
        thread holds the transaction lock: no other activation, rollback,
        removal, label change, garbage collection or probation verdict, of
        any model, runs; the manager's own methods called inside (``activate``,
        ``set_label``, ``collect``, ...) take it again without waiting. Frames
        are served meanwhile (``acquire`` never waits for it). The block does
        not make its steps atomic: each method keeps its own guarantee, and
        undoing a failed step is the caller's (:meth:`reject_installed`).
        """
        self._slot(name)
        with self._tx:
            yield

    def activate(self, name: str, version: int, *, reason: str = "activate", probation: bool = True,
                 progress: Callable[..., None] | None = None) -> dict[str, Any]:
        """Make ``version`` the active one: load and check it while the current
        one serves (or after unloading it, in resource-preserving mode), then
        switch between two frames. Returns what happened (mode, gap, timings)."""
        with self._tx:
            slot = self._slot(name)
            if version not in self.store.versions(name):
                raise StoreError(f"{name} version {version} is not in the store", code="version_not_found")
            if not slot.policy.allows(version):
                raise StoreError(
                    f"{name} version {version} is not among the versions the policy allows ({list(slot.policy.versions)})",
                    code="version_not_allowed",
                )
            with self._cond:
                current = slot.serving
            if current is not None and current.version == version:
                return {"model": name, "version": version, "changed": False}
            previous = current.version if current is not None else slot.state.active
            swap = self._swap(slot, version, progress=progress)
            before = slot.state.model_copy(deep=True)
            slot.state.probation = None  # no verdict: another version takes over
            state = slot.state
            state.active = version
            state.failed.pop(version, None)
            start_probation = probation and self.probation_enabled and previous is not None
            if start_probation:
                state.probation = Probation(version=version, since=time.time(), previous=state.last_good or previous)
            else:
                state.last_good = version
            state.record("activated", version, reason=reason, previous=previous)
            checkpoint("activate_before_state")
            self._save_swap(slot, swap, before)
            checkpoint("activate_after_state")
            self._commit_swap(slot, swap)
            if start_probation:
                assert state.probation is not None
                frames, errors, _ = swap.new.stats.snapshot()
                state.probation.watch = Watch(time.monotonic(), baseline_ms(swap.old), frames, errors)
                self._supervisor.wake()
            self._reconcile(slot)
            if not start_probation:
                self._collect(slot, "collected after an activation")
            self._event("activated", name, version, previous=previous, reason=reason, mode=swap.mode,
                        gap_ms=swap.gap_ms, load_ms=swap.load_ms)
            return {"model": name, "version": version, "previous": previous, "changed": True,
                    "probation": start_probation, **swap.report()}

    def rollback(self, name: str, *, reason: str = "rollback requested") -> dict[str, Any]:
        """Back to the previous good version (no probation: it was good)."""
        with self._tx:
            slot = self._slot(name)
            state = slot.state
            active = slot.serving.version if slot.serving else state.active
            target = self._rollback_target(slot, active)
            if target is None:
                raise StoreError(f"model {name}: no earlier good version to roll back to", code="no_rollback_target")
            swap = self._swap(slot, target)
            before = slot.state.model_copy(deep=True)
            slot.state.probation = None
            if active is not None and reason != "rollback requested":
                state.failed[active] = reason
            state.active = target
            state.last_good = target
            state.record("rolled_back", active, reason=reason, to=target)
            self._save_swap(slot, swap, before)
            self._commit_swap(slot, swap)
            self._reconcile(slot)
            self._event("rolled_back", name, active, to=target, reason=reason, mode=swap.mode, gap_ms=swap.gap_ms)
            self._collect(slot, "collected after a rollback")
            return {"model": name, "version": target, "from": active, "reason": reason, **swap.report()}

    def _rollback_target(self, slot: Slot, active: int | None) -> int | None:
        state = slot.state
        installed = set(self.store.versions(slot.cfg.name))
        if state.last_good is not None and state.last_good != active and state.last_good in installed:
            return state.last_good
        # the active version is the last good one: the good one before it
        for entry in reversed(state.history):
            if entry.event in ("probation_passed", "activated") and entry.version not in (None, active):
                v = entry.version
                if v in installed and v not in state.failed:
                    return v
        older = [v for v in installed if active is None or v < active]
        older = [v for v in older if v not in state.failed]
        return max(older) if older else None

    def remove(self, name: str, version: int) -> dict[str, Any]:
        with self._tx:
            slot = self._slot(name)
            state = slot.state
            if version not in self.store.versions(name):
                raise StoreError(f"{name} version {version} is not in the store", code="version_not_found")
            if version == state.active:
                raise StoreError(f"{name} version {version} is active; activate another version first", code="version_active")
            labels = [k for k, v in state.labels.items() if v == version]
            if labels:
                raise StoreError(f"{name} version {version} carries label(s) {labels}; move them first", code="version_labelled")
            if version == state.last_good:
                raise StoreError(
                    f"{name} version {version} is the last good version (the rollback target); activate and "
                    "keep another version first",
                    code="version_last_good",
                )
            self._retire(slot, version)
            self.store.delete_version(name, version)
            state.failed.pop(version, None)
            state.record("removed", version)
            self._save(slot)
            self._event("removed", name, version)
            return {"model": name, "version": version, "removed": True}

    def reject_installed(self, name: str, version: int, exc: BaseException) -> None:
        """A version a deploy has just installed failed (``exc``): unload it,
        delete it (unless it became active), record why. A store problem on
        the way is logged, not raised: the deploy's own error is the one to report."""
        with self._tx:
            slot = self._slot(name)
            try:
                self._retire(slot, version)
                if slot.state.active != version:
                    self.store.delete_version(name, version)
                reason = f"{getattr(exc, 'code', type(exc).__name__)}: {exc}"
                slot.state.record("rejected", version, reason=reason)
                self._save(slot)
                self._event("rejected", name, version, code=getattr(exc, "code", "error"), message=str(exc))
            except (StoreError, OSError) as cleanup:
                log.error("model %s: could not remove rejected version %d: %s", name, version, cleanup)

    def collect(self, name: str, why: str) -> list[int]:
        """Garbage-collect ``name``'s versions (see :meth:`_collect`); never raises."""
        with self._tx:
            try:
                return self._collect(self._slot(name), why)
            except Exception:
                log.exception("model %s: garbage collection failed", name)
                return []

    def _needed(self, slot: Slot) -> set[int]:
        """Versions garbage collection must leave besides the ones the state
        protects (active, last good, labelled, on probation and the one
        before): those the policy serves or keeps loaded, those loaded now,
        and the target a rollback would go to."""
        planned = policy.plan(slot.policy, self._snapshot(slot))
        needed = set(planned.load)
        if planned.serving is not None:
            needed.add(planned.serving)
        with self._cond:
            needed |= set(slot.loaded)
            serving = slot.serving
        active = serving.version if serving is not None else slot.state.active
        if active is not None:
            needed.add(active)
        target = self._rollback_target(slot, active)
        if target is not None:
            needed.add(target)
        return needed

    def _collect(self, slot: Slot, why: str, *, save: bool = True) -> list[int]:
        """Remove the versions beyond ``keep_versions`` that nothing needs
        (:meth:`ModelStore.collectable`): what interrupted deploys and failed
        probations leave behind. Each removal is recorded in the history and
        announced (event ``removed``); ``save`` writes the state (a failure
        to is logged: the versions are gone either way, and the next start
        repairs the state from the disk)."""
        name = slot.cfg.name
        removed = self.store.gc(name, slot.state, self._needed(slot))
        if not removed:
            return removed
        reason = f"{why}: beyond keep_versions ({self.store.keep_versions})"
        for version in removed:
            slot.state.failed.pop(version, None)
            slot.state.record("removed", version, reason=reason)
            self._event("removed", name, version, reason=reason)
        if save:
            try:
                self._save(slot)
            except EdgeAgentError as exc:
                log.error("model %s: %s", name, exc)
        return removed

    def set_label(self, name: str, label: str, version: int | None) -> dict[str, Any]:
        """Point ``label`` at ``version`` (loaded and checked first), or remove it (None)."""
        with self._tx:
            slot = self._slot(name)
            state = slot.state
            if version is None:
                state.labels.pop(label, None)
            else:
                if version not in self.store.versions(name):
                    raise StoreError(f"{name} version {version} is not in the store", code="version_not_found")
                if version not in slot.loaded:
                    model = self._load_in_background(slot, version)  # frames are being served meanwhile
                    with self._cond:
                        slot.loaded[version] = model
                state.labels[label] = version
            state.record("label", version, label=label)
            self._save(slot)
            self._reconcile(slot)
            self._event("label_set", name, version, label=label)
            return {"model": name, "label": label, "version": version}

    def verify_installed(self, name: str, version: int, bundle: Bundle | None = None) -> LoadedModel:
        """Load and smoke-test an installed version without serving it (the
        deploy's verification step, at a lower priority like any load while
        frames are served); the caller closes or adopts the result.
        ``bundle``: the installed version, just verified by the deploy (see
        :meth:`_load_version`)."""
        return self._load_in_background(self._slot(name), version, bundle)

    def adopt(self, model: LoadedModel) -> None:
        """Keep an already verified model loaded (so activation need not load it again)."""
        slot = self._slot(model.name)
        with self._cond:
            old = slot.loaded.get(model.version)
            if old is None:
                slot.loaded[model.version] = model
                return
        model.close()

    # -- internals ---------------------------------------------------------

    def _slot(self, name: str) -> Slot:
        slot = self._slots.get(name)
        if slot is None:
            known = ", ".join(sorted(self._slots)) or "none"
            raise StoreError(f"no model named {name!r} is configured (models: {known})", code="unknown_model")
        return slot

    def _snapshot(self, slot: Slot) -> policy.Snapshot:
        s = slot.state
        return policy.Snapshot(
            installed=tuple(self.store.versions(slot.cfg.name)), active=s.active, labels=dict(s.labels),
            failed=tuple(s.failed),
        )

    def _save(self, slot: Slot) -> None:
        self.store.save_state(slot.cfg.name, slot.state)

    def _load_version(self, slot: Slot, version: int, bundle: Bundle | None = None) -> LoadedModel:
        """Open (sha256 of every file, signature), load, warm up and smoke-test.

        ``bundle``: the installed version directory, opened and verified a
        moment ago by the caller (a deploy or the first start installing the
        bundle it extracted itself), so its files are not hashed again. Every
        other load opens the version from the store."""
        name = slot.cfg.name
        checkpoint("load_begin")
        if bundle is None:
            opened = self.store.open(name, version, trusted_keys=self.trusted_keys)
        else:
            opened = nullcontext(bundle)
        with opened as bundle:
            if bundle.manifest.name != name or bundle.manifest.version != version:
                raise BundleError(
                    f"{self.store.path(name, version)} holds {bundle.manifest.name} v{bundle.manifest.version}",
                    code="bad_manifest",
                )
            if bundle.manifest.task == "tensor" and name in self.framed():
                raise TaskMismatch(
                    f"model {name} v{version} is a tensor model (task 'tensor': inputs and outputs as tensors, "
                    f"served over HTTP and gRPC only); a source feeds camera frames to {name}", model=name
                )
            model = LoadedModel.load(bundle, slot.cfg)
            try:
                model.smoke_test(bundle.root, slot.cfg.smoke_tolerance)
            except BaseException:
                model.close()
                raise
        checkpoint("load_done")
        return model

    def _load_in_background(self, slot: Slot, version: int, bundle: Bundle | None = None) -> LoadedModel:
        """Load while frames are being served, without taking CPU from them.

        Loading (graph optimisation, warm-up, smoke test) is a burst of a few
        hundred milliseconds of CPU; on a 2- or 4-core device it competes with
        the inference and capture threads and shows up as a late frame. So it
        runs in its own thread at a lower scheduling priority (nice +10, Linux
        threads have their own). Only for single-threaded models: a runtime's
        worker threads inherit their creator's priority and would keep it
        while serving.
        """
        if slot.cfg.threads != 1 or not hasattr(os, "setpriority"):
            return self._load_version(slot, version, bundle)
        out: dict[str, Any] = {}

        def work() -> None:
            lower_priority()
            try:
                out["model"] = self._load_version(slot, version, bundle)
            except BaseException as exc:  # handed to the caller's thread
                out["error"] = exc

        t = threading.Thread(target=work, name=f"load-{slot.cfg.name}-v{version}", daemon=True)
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["model"]

    def _free_memory(self) -> int:
        """Bytes of memory available now (``memory_available``, else psutil)."""
        if self._memory_available is not None:
            return self._memory_available()
        import psutil

        return psutil.virtual_memory().available

    def _swap_mode(self, slot: Slot, version: int, serving: bool) -> policy.SwapMode:
        """:func:`policy.swap_mode`, measured: free memory and the version's
        size are read only when ``swap = "auto"`` has something to unload."""
        setting = slot.cfg.swap
        if setting != "auto" or not serving:
            return policy.swap_mode(setting, serving=serving)
        return policy.swap_mode(
            setting, serving=True, free_bytes=self._free_memory(), model_bytes=self.store.size(slot.cfg.name, version)
        )

    def _swap(self, slot: Slot, version: int, progress: Callable[..., None] | None = None) -> Swap:
        """Load ``version`` (and, in resource-preserving mode, unload the one
        serving first); the caller writes the state file, then switches with
        :meth:`_commit_swap`."""
        t0 = time.monotonic()
        with self._cond:
            old = slot.serving
        if self._swap_mode(slot, version, serving=old is not None) == "availability":
            new = slot.loaded.get(version)
            if new is None:
                if progress:
                    progress("loading", version=version)
                new = self._load_in_background(slot, version)
            load_ms = (time.monotonic() - t0) * 1000.0
            return Swap("availability", round(load_ms, 1), old, new, gap_ms=0.0)
        # Resource-preserving: stop handing out the old version, wait for the
        # frames in flight, close it, then load the new one, unless it is
        # loaded already (kept by a deploy, or by the policy): then it only
        # has to switch. Frames wait.
        assert old is not None  # resource only when something serves
        with self._cond:
            new = slot.loaded.get(version)
            slot.gap_since = time.monotonic()
            slot.serving = None
            while old.refs:
                self._cond.wait(timeout=1.0)
            slot.loaded.pop(old.version, None)
        old.close()
        try:
            if new is None:
                if progress:
                    progress("loading", version=version)
                new = self._load_version(slot, version)
        except BaseException:
            self._restore(slot, old.version)  # it was serving a moment ago
            raise
        load_ms = (time.monotonic() - t0) * 1000.0
        return Swap("resource", round(load_ms, 1), old, new)

    def _restore(self, slot: Slot, version: int) -> None:
        """Load ``version`` again and serve it: the one a failed
        resource-preserving swap had closed."""
        back = self._load_version(slot, version)
        with self._cond:
            slot.loaded[back.version] = back
            slot.serving = back
            slot.gap_since = None
            self._cond.notify_all()

    def _save_swap(self, slot: Slot, swap: Swap, before: ModelState) -> None:
        """Write the state of a swap :meth:`_swap` prepared. If that fails (a
        full disk), undo the swap: the state is ``before`` (a copy taken
        before the swap changed it: a probation the swap ended runs on, its
        watch with it), the version that served before serves again
        (reloaded if a resource-preserving swap had closed it), and the new
        one is closed unless something else keeps it loaded."""
        try:
            self._save(slot)
        except BaseException:
            slot.state = before
            with self._cond:
                kept = slot.loaded.get(swap.new.version) is swap.new
            if swap.mode == "resource":
                assert swap.old is not None
                self._restore(slot, swap.old.version)
            if not kept:
                swap.new.close()
            raise

    def _commit_swap(self, slot: Slot, swap: Swap) -> None:
        """Switch to the new version. The old one stays loaded until the
        caller's :meth:`_reconcile` retires it (unless the policy keeps it)."""
        with self._cond:
            slot.loaded[swap.new.version] = swap.new
            slot.serving = swap.new
            if slot.gap_since is not None:
                swap.gap_ms = round((time.monotonic() - slot.gap_since) * 1000.0, 1)
                slot.gap_since = None
            self._cond.notify_all()

    def _retire(self, slot: Slot, version: int) -> None:
        with self._cond:
            model = slot.loaded.pop(version, None)
            if model is None:
                return
            model.retired = True
            close_now = model.refs == 0 and not model.closed
        if close_now:
            close_in_background(model)

    def _reconcile(self, slot: Slot) -> None:
        """Load what the policy wants loaded and retire what it does not."""
        want = set(policy.plan(slot.policy, self._snapshot(slot)).load)
        with self._cond:
            serving = slot.serving.version if slot.serving else None
            have = set(slot.loaded)
        want.add(serving) if serving is not None else None
        for version in sorted(want - have):
            try:
                model = self._load_in_background(slot, version)
            except EdgeAgentError as exc:
                self._event("load_failed", slot.cfg.name, version, code=exc.code, message=str(exc))
                continue
            with self._cond:
                slot.loaded[version] = model
        for version in have - want:
            self._retire(slot, version)

    # -- probation ---------------------------------------------------------

    @staticmethod
    def _watched(slot: Slot) -> Probation | None:
        """The probation of ``slot`` the supervisor judges: recorded and
        watched in this process (read without a lock: one reference each)."""
        record = slot.state.probation
        return record if record is not None and record.watch is not None else None

    def _watching(self) -> bool:
        return any(self._watched(slot) is not None for slot in list(self._slots.values()))

    def _check_probations(self) -> None:
        """The supervisor's check (on its thread): each model's probation."""
        for slot in list(self._slots.values()):
            try:
                self._check_probation(slot)
            except Exception:
                log.exception("model %s: probation check failed", slot.cfg.name)

    def _check_probation(self, slot: Slot) -> None:
        """Judge the watched probation of ``slot`` (outside the transaction
        lock) and act on a verdict inside it, if the probation judged is
        still the one recorded: a transaction may have ended or replaced it
        meanwhile."""
        record = self._watched(slot)
        if record is None:
            return
        watch = record.watch
        assert watch is not None
        model = slot.loaded.get(record.version)
        if model is None:
            return
        verdict = judge(slot.cfg, watch, model.stats.snapshot(), time.monotonic())
        if verdict is None:
            return
        name = slot.cfg.name
        with self._tx:
            if slot.state.probation is not record or record.watch is not watch:
                return
            if verdict.passed:
                self._pass_probation(slot, frames=verdict.frames, elapsed=verdict.elapsed)
                return
            self._event("probation_failed", name, record.version, reason=verdict.reason, frames=verdict.frames,
                        errors=verdict.errors)
            try:
                self.rollback(name, reason=verdict.reason or "probation failed")
            except EdgeAgentError as exc:
                log.error("model %s: automatic rollback failed: %s", name, exc)
                # Stop judging (the state keeps the record: the next start decides).
                if slot.state.probation is not None:
                    slot.state.probation.watch = None

    def _pass_probation(self, slot: Slot, *, frames: int, elapsed: float) -> None:
        """The version on probation passed: it becomes the last good one."""
        run, slot.state.probation = slot.state.probation, None
        assert run is not None
        slot.state.last_good = run.version
        slot.state.record("probation_passed", run.version, frames=frames, seconds=round(elapsed, 2))
        removed = self._collect(slot, "collected after a probation passed", save=False)
        self._save(slot)
        self._event("probation_passed", slot.cfg.name, run.version, frames=frames, seconds=round(elapsed, 2),
                    removed=removed or None)
