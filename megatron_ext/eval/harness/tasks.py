"""The lm-eval tasks a setting names, checked and built offline: names of lm-eval's registry, task YAML files,
directories of task YAMLs.

Nothing is downloaded unless the user sets HF_DATASETS_OFFLINE=0: task data comes from the Hugging Face cache
or from local files. A name lm-eval does not know, a file that is not there, or data that is not on this
machine is an EvalSettingsError that says what to do. Imports lm-eval; no torch model, no megatron.
"""

import difflib
import functools
import json
import os
from pathlib import Path

from megatron_ext.errors import MissingFile
from megatron_ext.eval.settings import EvalSettingsError

YAML_SUFFIXES = (".yaml", ".yml")
FALSE_VALUES = ("0", "FALSE", "NO", "OFF")


def use_local_data_only() -> bool:
    """Keep `datasets` offline unless HF_DATASETS_OFFLINE is set to 0 (false, no, off); True when offline.

    `datasets` reads the variable once, when it is imported; its flag is set here, whenever that was."""
    import datasets

    offline = os.environ.get("HF_DATASETS_OFFLINE", "1").upper() not in FALSE_VALUES
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = offline
    return offline


def load_tasks(specs: list[str], metadata: str | None = None) -> dict:
    """lm-eval's task dict ({"tasks", "groups", "group_map"}, as TaskManager.load returns it) for `specs`;
    `metadata`: a JSON object for the tasks (lm-eval's --metadata)."""
    local_dirs = tuple(str(Path(spec).resolve()) for spec in specs if Path(spec).is_dir())
    names = {name: spec for spec in specs for name in _task_names(spec, local_dirs, metadata)}  # checked first
    manager = task_manager(local_dirs, metadata)
    offline = use_local_data_only()
    loaded = {"tasks": {}, "groups": {}, "group_map": {}}
    for name, spec in names.items():
        try:
            one = manager.load([name])
        except (ConnectionError, FileNotFoundError) as error:
            raise _missing_data(spec, error, offline) from error
        for key in loaded:
            loaded[key].update(one.get(key, {}))
    return loaded


@functools.cache
def task_manager(local_dirs: tuple[str, ...], metadata: str | None = None):
    """lm-eval's TaskManager over its own tasks and `local_dirs`, handing the tasks `metadata` (JSON); built once
    per process and arguments (it reads every task YAML lm-eval ships: seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(local_dirs) or None, metadata=json.loads(metadata) if metadata else None)


def _task_names(spec: str, local_dirs: tuple[str, ...], metadata: str | None) -> list[str]:
    """The names (or the YAML path) that `spec` stands for; lm-eval's index is read for names only."""
    path = Path(spec)
    if path.is_dir():
        from lm_eval.tasks import TaskManager

        own = TaskManager(include_defaults=False, include_path=str(path.resolve())).all_subtasks
        if not own:
            raise EvalSettingsError(f"lm_eval.tasks: directory {spec} holds no task YAML (a file with `task:`)")
        return own
    if path.suffix in YAML_SUFFIXES or os.sep in spec:
        if not path.is_file():
            raise MissingFile(f"lm_eval.tasks: {spec} does not exist: give a task YAML file, a directory of them, "
                              "or an lm-eval task name")
        return [str(path.resolve())]
    known = task_manager(local_dirs, metadata).all_tasks
    if spec not in known:
        close = difflib.get_close_matches(spec, known, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "`lm-eval ls tasks` lists them"
        raise EvalSettingsError(f"lm_eval.tasks: lm-eval has no task, group or tag '{spec}': {hint}")
    return [spec]


def _missing_data(spec: str, error: Exception, offline: bool) -> EvalSettingsError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    how = ("nothing is downloaded unless you set HF_DATASETS_OFFLINE=0: run once with HF_DATASETS_OFFLINE=0 on a "
           "machine with internet (the Hugging Face cache, ~/.cache/huggingface, can then be copied here), or "
           "point the task's dataset_path/data_files at local files" if offline else
           "check the dataset name and your connection, or point the task's data_files at local files")
    return EvalSettingsError(f"lm_eval.tasks: the data of '{spec}' is not on this machine ({reason}); {how}")
