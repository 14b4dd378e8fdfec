"""Teachers: one interface (``generate``, ``score``) and its implementations.

- ``SeparateTeacher`` (OPD) and ``SelfTeacher`` (OPSD): in the trainer's process, dense scores;
- ``VLLMServerTeacher``: served by ``vllm serve`` elsewhere, sparse scores (top-k and the target's log-probability).
"""

from trd_lightning.teachers.base import Teacher
from trd_lightning.teachers.local import LocalTeacher, SelfTeacher, SeparateTeacher, freeze
from trd_lightning.teachers.vllm_server import TeacherSetupError, VLLMServerTeacher

__all__ = ["LocalTeacher", "SelfTeacher", "SeparateTeacher", "Teacher", "TeacherSetupError", "VLLMServerTeacher", "freeze"]
