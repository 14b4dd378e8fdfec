"""vLLM sleep mode as one state per process (``rollout/sleep.py``): which sleep and wake calls reach vLLM, in which
order, for each configuration, and what is refused. vLLM's sleep allocator needs a GPU, so the calls are recorded
on a stand-in for ``vllm.LLM``'s two sleep methods; the order is the rule under test."""

from __future__ import annotations

import pytest

from trd_lightning.rollout.sleep import KV_CACHE, WEIGHTS, ProcessSleep, SleepSettingsError


class Recorder:
    """Records ``vllm.LLM.sleep`` / ``wake_up`` calls into a log shared by every engine of the process."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def sleep(self, level: int):
        self.log.append((self.name, "sleep", level))

    def wake_up(self, tags=None):
        self.log.append((self.name, "wake_up", tuple(tags) if tags else "all"))


def start(state: ProcessSleep, role: str, log: list) -> None:
    state.before_start(role)
    state.started(role, Recorder(role, log))


def load(state: ProcessSleep, role: str, log: list) -> None:
    state.before_load(role)
    log.append((role, "load"))
    state.after_load(role)


def generate(state: ProcessSleep, role: str, log: list) -> None:
    state.before_generate(role)
    log.append((role, "generate"))


def test_student_synced_every_step_sleeps_at_level_2_and_wakes_weights_load_then_cache():
    log, state = [], ProcessSleep(sync_every=1)
    start(state, "student", log)
    for _ in range(2):  # two training steps: sync, generate, sleep before training
        load(state, "student", log)
        generate(state, "student", log)
        state.sleep()
    assert state.level == 2
    assert log == [("student", "load"), ("student", "generate"), ("student", "sleep", 2),
                   ("student", "wake_up", (WEIGHTS,)), ("student", "load"), ("student", "wake_up", (KV_CACHE,)),
                   ("student", "generate"), ("student", "sleep", 2)]
    assert not state.holds("student")  # level 2 discarded the weights: generating now would sample garbage
    with pytest.raises(RuntimeError, match="discarded by a level-2 sleep"):
        generate(state, "student", log)


def test_sync_every_2_sleeps_at_level_1_and_a_step_without_a_sync_wakes_everything():
    log, state = [], ProcessSleep(sync_every=2)
    start(state, "student", log)
    load(state, "student", log)
    generate(state, "student", log)
    state.sleep()
    generate(state, "student", log)  # the next step: no sync, the weights came back from host memory
    state.sleep()
    load(state, "student", log)  # the step after: a sync
    assert state.level == 1
    assert log[2:] == [("student", "sleep", 1), ("student", "wake_up", "all"), ("student", "generate"), ("student", "sleep", 1),
                       ("student", "wake_up", (WEIGHTS,)), ("student", "load"), ("student", "wake_up", (KV_CACHE,))]
    assert state.holds("student")


def test_a_teacher_engine_makes_every_sleep_level_1_through_one_driver():
    """Two engines share the process's allocator: one sleep call (on the first engine) covers both, at level 1, since
    the frozen teacher's weights are loaded once; the teacher engine itself never gets a sleep or wake call."""
    log, state = [], ProcessSleep(sync_every=1)
    start(state, "student", log)
    load(state, "student", log)
    generate(state, "student", log)
    start(state, "teacher", log)  # TRD's first rewrite: the teacher's engine starts and loads once
    load(state, "teacher", log)
    generate(state, "teacher", log)
    state.sleep()
    load(state, "student", log)  # next step: the student's sync
    generate(state, "student", log)
    generate(state, "teacher", log)  # the teacher's weights came back with the student's: no reload
    state.sleep()
    assert state.level == 1
    assert [entry for entry in log if entry[1] in ("sleep", "wake_up")] == [
        ("student", "sleep", 1), ("student", "wake_up", (WEIGHTS,)), ("student", "wake_up", (KV_CACHE,)), ("student", "sleep", 1)]
    assert state.holds("teacher") and state.holds("student")


def test_a_second_engine_starts_while_the_first_is_awake():
    """OPD validated before fit: the student's engine alone slept at level 2; a teacher engine starting later (``trd
    test``'s teacher solutions) first wakes the process, and the student's weights, discarded, need a sync."""
    log, state = [], ProcessSleep()
    start(state, "student", log)
    load(state, "student", log)
    state.sleep()
    start(state, "teacher", log)
    assert log[-2:] == [("student", "sleep", 2), ("student", "wake_up", "all")]
    assert state.level == 1 and not state.holds("student")


def test_sleep_levels_that_cannot_work_are_refused_naming_why():
    with pytest.raises(SleepSettingsError, match="sync_every=4 reloads them only every few steps"):
        ProcessSleep(level=2, sync_every=4)
    with pytest.raises(SleepSettingsError, match="frozen teacher's engine is loaded once, never reloaded"):
        ProcessSleep(level=2).check_roles({"student", "teacher"})
    with pytest.raises(SleepSettingsError, match="must be 1, 2 or null"):
        ProcessSleep(level=3)
    ProcessSleep(level=2).check_roles({"student"})  # one engine reloaded every step: level 2 works
    ProcessSleep(level=1, sync_every=4).check_roles({"student", "teacher"})


def test_an_explicit_level_2_is_refused_when_a_teacher_engine_starts():
    log, state = [], ProcessSleep(level=2)
    start(state, "student", log)
    with pytest.raises(SleepSettingsError, match="one per process"):
        start(state, "teacher", log)
