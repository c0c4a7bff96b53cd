"""The trainer's checkpointer: atomic saves, and a ``--resume`` that survives a broken last file.

detectron2 writes ``model_*.pth`` and ``last_checkpoint`` in place, so a run killed while saving
leaves a truncated (often 0-byte) checkpoint that ``last_checkpoint`` may already name; resuming
then dies in ``torch.load``, or, for ``model_final.pth``, silently "finishes" without it.
:class:`TrainingCheckpointer` writes both through :func:`unsam.utils.files.atomic_write` and,
on resume, falls back to the newest checkpoint that reads, saying so.
"""
import logging
import os
from typing import Any, Dict, List

import torch

from ..checkpoint import UnSAMCheckpointer
from ..utils.files import atomic_write, remove_stale_temps

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"  # detectron2's tag file naming the newest checkpoint


class CheckpointError(ValueError):
    """No checkpoint of ``OUTPUT_DIR`` can be resumed from; the message names the files tried."""


def _is_checkpoint_file(name: str) -> bool:
    return name.endswith(".pth") or name == LAST_CHECKPOINT


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
                logger.info("removed %d temporary files of interrupted checkpoint saves in %s",
                            removed, self.save_dir)

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``save``, written atomically (local folders; others as detectron2 does)."""
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
        with atomic_write(save_file, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        with atomic_write(os.path.join(self.save_dir, LAST_CHECKPOINT)) as f:
            f.write(last_filename_basename)

    def resume_candidates(self) -> List[str]:
        """The file ``last_checkpoint`` names, then every other ``*.pth`` of ``save_dir``, newest first."""
        tagged = self.get_checkpoint_file()
        others = [p for p in self.get_all_checkpoint_files() if p != tagged]
        others.sort(key=lambda p: os.path.getmtime(p), reverse=True)
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
            except Exception as e:  # noqa: BLE001 — a damaged file fails to unpickle in many ways
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                logger.warning("checkpoint %s is unreadable (%s); trying an older one", candidate, reason)
                tried.append(os.path.basename(candidate))
                continue
            if tried:
                logger.warning("resuming from %s, the newest readable checkpoint (unreadable: %s)",
                               candidate, ", ".join(tried))
            self.resumed_from = candidate
            return self.load(candidate)
        raise CheckpointError(f"--resume: no readable checkpoint in '{self.save_dir}' "
                              f"(tried {', '.join(tried) or 'none'}); remove '{LAST_CHECKPOINT}' "
                              "to start over")

    def _load_file(self, filename: str):
        preread = self._preread.pop(filename, None)
        return preread if preread is not None else super()._load_file(filename)
