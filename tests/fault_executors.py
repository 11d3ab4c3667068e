"""Test-only executors that misbehave on purpose, loaded by the NVFlare simulator by import path
(``fault_executors.FaultyExecutor``: the tests put this folder on the sites' PYTHONPATH and allow the module in the
simulator workspace's ``class_allow_list``).

Per site, fixed so the job config needs no extra argument:
- site-1: honest.
- site-2: raises in ``class_activations`` and in the first fine-tuning round (``train``, round 0).
- site-3: returns garbage from ``class_activations`` (NaN sums, one layer with the wrong shape); honest otherwise.
- site-4: sleeps past ``task_timeout`` in ``class_activations`` and in the first fine-tuning round, then answers.
"""

from __future__ import annotations

import time

import numpy as np
from nvflare.apis.dxo import DXO, DataKind

from nvflare_unlearn.fl.executor import UnlearningExecutor

#: seconds site-4 sleeps; the tests set task_timeout below it (and the controller's straggler wait above it)
SLEEP_S = 14.0


class FaultyExecutor(UnlearningExecutor):
    def _sleep(self, abort_signal) -> None:
        end = time.time() + SLEEP_S
        while time.time() < end and not abort_signal.triggered:
            time.sleep(0.2)

    def _class_activations(self, model, fl_model, meta, fl_ctx, abort_signal) -> DXO:
        site = self._site_name
        if site == "site-2":
            raise RuntimeError("injected fault: site-2 crashes while collecting activations")
        if site == "site-4":
            self._sleep(abort_signal)
        dxo = super()._class_activations(model, fl_model, meta, fl_ctx, abort_signal)
        if site != "site-3":
            return dxo
        data = dict(dxo.data)
        sums = dict(data["sums"])
        names = sorted(sums)
        sums[names[0]] = np.full_like(np.asarray(sums[names[0]]), np.nan)  # NaN everywhere
        sums[names[-1]] = np.zeros((3, 5), dtype=np.float32)  # wrong shape
        data["sums"] = sums
        return DXO(data_kind=DataKind.COLLECTION, data=data, meta=dxo.meta)

    def _train(self, model, fl_model, meta, fl_ctx, abort_signal) -> DXO:
        first_round = not fl_model.current_round
        if first_round and self._site_name == "site-2":
            raise RuntimeError("injected fault: site-2 crashes in fine-tuning round 1")
        if first_round and self._site_name == "site-4":
            self._sleep(abort_signal)
        return super()._train(model, fl_model, meta, fl_ctx, abort_signal)


class CrashFromRound2Executor(UnlearningExecutor):
    """Every site fails from fine-tuning round 2 on: the job stops after saving round 1 (the resume test)."""

    def _train(self, model, fl_model, meta, fl_ctx, abort_signal) -> DXO:
        if (fl_model.current_round or 0) >= 1:
            raise RuntimeError("injected fault: every site crashes in fine-tuning round 2")
        return super()._train(model, fl_model, meta, fl_ctx, abort_signal)
