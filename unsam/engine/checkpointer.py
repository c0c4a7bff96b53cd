"""The trainer's checkpointer: atomic saves, and a ``--resume`` that survives a broken last file.

detectron2 writes ``model_*.pth`` and ``last_checkpoint`` in place, so a run killed while saving
leaves a truncated (often 0-byte) checkpoint that ``last_checkpoint`` may already name; resuming
then dies in ``torch.load``, or, for ``model_final.pth``, silently "finishes" without it.
:class:`TrainingCheckpointer` writes both through :func:`unsam.utils.files.atomic_write` and,
on resume, falls back to the newest checkpoint that reads, saying so. "Newest" is the highest
iteration in the file name (``model_final.pth`` above all): file times say nothing after a
``cp -r`` or a restore from backup. A resume also needs every model tensor to fit: a checkpoint
of another model size is refused before the optimizer and scheduler states are touched. A save
that fails (full disk) leaves the previous checkpoint and ``last_checkpoint`` as they were and
stops the run with a :class:`CheckpointError` naming both.
"""

import logging
import os
import re
from typing import Any, Dict, List, Tuple

import torch

from ..checkpoint import LoadReport, UnsafeWeightsError, UnSAMCheckpointer
from ..utils.files import atomic_write, remove_stale_temps

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"  # detectron2's tag file naming the newest checkpoint


class CheckpointError(ValueError):
    """No checkpoint of ``OUTPUT_DIR`` can be resumed from; the message names the files tried."""


def _is_checkpoint_file(name: str) -> bool:
    return name.endswith(".pth") or name == LAST_CHECKPOINT


_ITERATION_IN_NAME = re.compile(r"_(\d+)\.pth$")
_FINAL = "model_final.pth"


def iteration_rank(path: str) -> Tuple[int, int, str]:
    """Sort key, by training progress, of a checkpoint file of an output folder: ``model_final``
    above every ``model_<iteration>`` (by iteration), files with no iteration in the name last."""
    name = os.path.basename(path)
    if name == _FINAL:
        return (2, 0, name)
    found = _ITERATION_IN_NAME.search(name)
    return (1, int(found.group(1)), name) if found else (0, 0, name)


class TrainingCheckpointer(UnSAMCheckpointer):
    """``UnSAMCheckpointer`` with atomic saves and a resume that skips unreadable checkpoints.

    ``resumed_from`` is the checkpoint file a resume loaded ("" when none). Temporary files of
    saves killed earlier are removed when the (saving) checkpointer is created: one training
    run writes into ``save_dir`` at a time.
    """

    def __init__(self, model, save_dir: str = "", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.resumed_from = ""
        self._preread: Dict[str, Any] = {}
        if self.save_dir and self.save_to_disk and os.path.isdir(self.save_dir):
            removed = remove_stale_temps(self.save_dir, _is_checkpoint_file)
            if removed:
                logger.info(
                    "removed %d temporary files of interrupted checkpoint saves in %s",
                    removed,
                    self.save_dir,
                )

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``save``, written atomically (local folders; others as detectron2 does).

        An ``OSError`` (disk full, quota, permissions) becomes a :class:`CheckpointError` naming
        the file and the last good checkpoint, which the atomic write left untouched.
        """
        if not self.save_dir or not self.save_to_disk:
            return
        if "://" in self.save_dir:
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        last_good = self._last_good()
        try:
            with atomic_write(save_file, "wb") as f:
                torch.save(data, f)
            self.tag_last_checkpoint(basename)
        except OSError as e:
            raise CheckpointError(
                f"cannot save checkpoint '{save_file}': {e.strerror or e}; the last good "
                f"checkpoint is {repr(last_good) if last_good else 'none (nothing saved yet)'}, "
                "unchanged "
                "(free space, then --resume)"
            ) from None

    def _last_good(self) -> str:
        """The checkpoint ``last_checkpoint`` names, if it exists ("" otherwise)."""
        tagged = self.get_checkpoint_file() if self.has_checkpoint() else ""
        return tagged if tagged and os.path.isfile(tagged) else ""

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        with atomic_write(os.path.join(self.save_dir, LAST_CHECKPOINT)) as f:
            f.write(last_filename_basename)

    def resume_candidates(self) -> List[str]:
        """The file ``last_checkpoint`` names, then every other ``*.pth`` of ``save_dir`` by
        :func:`iteration_rank`, latest first (not by file time, which a copy rewrites)."""
        tagged = self.get_checkpoint_file()
        others = sorted(
            (p for p in self.get_all_checkpoint_files() if p != tagged),
            key=iteration_rank,
            reverse=True,
        )
        return ([tagged] if tagged else []) + others

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """detectron2's ``resume_or_load``; on resume, the newest *readable* checkpoint is used.

        Raises :class:`CheckpointError` when ``last_checkpoint`` exists but no checkpoint reads:
        starting over from ``MODEL.WEIGHTS`` would silently throw the run's progress away.
        """
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        tried = []
        for candidate in self.resume_candidates():
            try:
                if not os.path.isfile(candidate):
                    raise FileNotFoundError("missing")
                # read here, load below: a file that does not read is skipped, while a readable
                # one whose content does not fit the model stays an error
                self._preread = {candidate: super()._load_file(candidate)}
            except UnsafeWeightsError:
                raise  # not damaged but refused for safety: falling back would hide it
            except Exception as e:  # noqa: BLE001 — a damaged file fails to unpickle in many ways
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                logger.warning(
                    "checkpoint %s is unreadable (%s); trying an older one", candidate, reason
                )
                tried.append(os.path.basename(candidate))
                continue
            if tried:
                logger.warning(
                    "resuming from %s, the newest readable checkpoint (unreadable: %s)",
                    candidate,
                    ", ".join(tried),
                )
            self.resumed_from = candidate
            self._resuming = True
            try:
                return self.load(candidate)
            finally:
                self._resuming = False
        raise CheckpointError(
            f"--resume: no readable checkpoint in '{self.save_dir}' "
            f"(tried {', '.join(tried) or 'none'}); remove '{LAST_CHECKPOINT}' "
            "to start over"
        )

    _resuming = False

    def _load_model(self, checkpoint):
        """On resume, every model tensor must come from the checkpoint, before detectron2 goes on
        to the optimizer and scheduler states (which a model of another size breaks with a
        traceback): a half-loaded model would continue someone else's run."""
        incompatible = super()._load_model(checkpoint)
        if self._resuming and _misfits(self.last_report):
            raise CheckpointError(_misfit_message(self.last_report))
        return incompatible

    def _load_file(self, filename: str):
        preread = self._preread.pop(filename, None)
        return preread if preread is not None else super()._load_file(filename)


def _misfits(report: LoadReport) -> bool:
    return bool(report.missing or report.wrong_shape or report.unexpected)


def _misfit_message(report: LoadReport) -> str:
    """One line: which checkpoint, how many tensors do not fit, the first of them."""
    parts = []
    if report.wrong_shape:
        name, saved, built = report.wrong_shape[0]
        parts.append(
            f"{len(report.wrong_shape)} with other shapes (e.g. {name} {tuple(saved)} in the "
            f"checkpoint vs {tuple(built)} in the model)"
        )
    absent = [n for n in report.missing if n not in {w[0] for w in report.wrong_shape}]
    if absent:
        parts.append(f"{len(absent)} missing from the checkpoint (e.g. {absent[0]})")
    if report.unexpected:
        parts.append(f"{len(report.unexpected)} not in the model (e.g. {report.unexpected[0]})")
    return (
        f"--resume: checkpoint '{report.path}' does not fit this model: "
        f"{report.num_loaded}/{report.num_expected} tensors load, {', '.join(parts)}; resume with "
        "the config it was trained with, or start a new OUTPUT_DIR from it with MODEL.WEIGHTS"
    )
