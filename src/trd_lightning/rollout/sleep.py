"""vLLM's sleep mode for every engine of this process, kept as one state.

vLLM's sleep allocator is one per process: ``sleep()`` or ``wake_up()`` on any engine frees or maps back the memory
of every engine in the process. So the trainer keeps one state for all of its engines and calls sleep and wake on
one of them (the first started, the driver):

- the engines sleep once the step's generation is done (``release``), before the trainer trains;
- a weight load wakes the weights only, loads, then wakes the KV cache (the weights are garbage after level 2
  until they are loaded, and the cache is not needed for the load);
- a generate call without a load wakes everything.

Level 2 discards the weights too, so it serves only where every engine's weights are loaded again before it next
generates: one engine (the student's) synced every step. Level 1 keeps the weights in host memory; it is the level
for ``sync_every > 1`` and wherever a second engine (a frozen teacher's, loaded once) shares the process, whose
weights and buffers a level-2 sleep would discard with no reload to restore them.
"""

from __future__ import annotations

WEIGHTS, KV_CACHE = "weights", "kv_cache"


class SleepSettingsError(ValueError):
    """A sleep level that cannot work for these engines; the message says why and what to set."""


class ProcessSleep:
    """The sleep state of every vLLM engine in this process.

    Args:
        level: 1 or 2; None picks 2 where it works (one engine, reloaded every step) and 1 elsewhere.
        sync_every: the steps between the student engine's weight loads.
    """

    def __init__(self, level: int | None = None, sync_every: int = 1):
        if level not in (None, 1, 2):
            raise SleepSettingsError(f"VLLMEngine sleep_level must be 1, 2 or null (got {level})")
        if level == 2 and sync_every > 1:
            raise SleepSettingsError(
                f"sleep_level 2 discards the engine's weights after every step, but sync_every={sync_every} reloads them only "
                "every few steps, so the steps between would sample from garbage; use sleep_level 1 (weights kept in host memory) or null")
        self.wanted, self.sync_every = level, sync_every
        self.engines: dict[str, object] = {}  # role -> vllm.LLM, in start order; the first is the driver
        self.asleep = 0  # 0: awake, else the level every engine sleeps at
        self.loaded: set[str] = set()  # roles whose weights the engine memory holds

    @property
    def level(self) -> int:
        """The level the engines sleep at: 2 only for one engine reloaded every step."""
        if self.wanted is not None:
            return self.wanted
        return 2 if len(self.engines) == 1 and self.sync_every == 1 else 1

    @property
    def driver(self):
        return next(iter(self.engines.values()))

    def check_roles(self, roles: set[str]) -> None:
        """Refuse, before anything starts, an explicit level 2 for more than one engine."""
        if self.wanted == 2 and len(roles) > 1:
            raise SleepSettingsError(
                f"sleep_level 2 cannot serve the engines {sorted(roles)} in one process: vLLM's sleep allocator is one per "
                "process, so a level-2 sleep discards every engine's weights and buffers, and the frozen teacher's engine is "
                "loaded once, never reloaded. Use sleep_level 1 (weights kept in host memory) or null (which picks it)")

    def before_start(self, role: str) -> None:
        """A new engine allocates its memory while the others are awake, so that one wake maps back every engine."""
        self.check_roles({*self.engines, role})
        self.wake()

    def started(self, role: str, engine) -> None:
        self.engines[role] = engine

    def before_load(self, role: str) -> None:
        if self.asleep:
            self.driver.wake_up(tags=[WEIGHTS])

    def after_load(self, role: str) -> None:
        self.loaded.add(role)
        if self.asleep:
            self.driver.wake_up(tags=[KV_CACHE])
            self.asleep = 0

    def before_generate(self, role: str) -> None:
        self.wake()
        if role not in self.loaded:
            raise RuntimeError(f"the {role} engine's weights were discarded by a level-2 sleep and not loaded again; "
                               f"sync_weights({role!r}, model) must run before it generates")

    def wake(self) -> None:
        if self.asleep:
            self.driver.wake_up()
            self.asleep = 0

    def sleep(self) -> None:
        """Every engine sleeps at ``level``; after level 2 no engine holds its weights until loaded again."""
        if self.asleep or not self.engines:
            return
        level = self.level
        self.driver.sleep(level=level)
        self.asleep = level
        if level == 2:
            self.loaded.clear()

    def holds(self, role: str) -> bool:
        return role in self.engines and role in self.loaded

    def clear(self) -> None:
        self.engines.clear()
        self.loaded.clear()
        self.asleep = 0
