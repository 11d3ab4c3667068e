"""The in-process federation (evaluation.fedsim) against the NVFlare job it stands for: same batch order, same model.

The fast tests pin what the two must share to train identically (each site's batch order, across epochs too); the
simulator test runs ``benchmarks.fedsim_faithfulness`` at a small size (3 sites, 3 rounds of 2 local epochs) and
requires the two federations to produce the same model, far below the run-to-run noise between seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nvflare_unlearn.data import digits_dataset
from nvflare_unlearn.evaluation import TensorBatches, as_tensors
from nvflare_unlearn.evaluation.fedsim import FedConfig
from nvflare_unlearn.runtime.batches import site_shuffle_seed

REPO = Path(__file__).resolve().parents[1]


def test_executor_batches_are_the_in_process_batches():
    """The executor's shuffled loader draws exactly TensorBatches' order for the same (seed, site, round)."""
    from nvflare_unlearn.fl.executor import UnlearningExecutor

    data = digits_dataset("train")
    ex = UnlearningExecutor("small_cnn", 10, training={"seed": 3, "batch_size": 16})
    ex._site_name = "site-2"
    x, y = as_tensors(data)
    for round_num in (0, 4):
        loader = ex._loader(data, shuffle=True, round_num=round_num)
        ours = TensorBatches(x, y, 16, shuffle=True, seed=site_shuffle_seed(3, "site-2", round_num))
        for _epoch in range(2):  # the generator carries over between epochs in both
            got = [yb for _, yb in loader]
            want = [yb for _, yb in ours]
            assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert site_shuffle_seed(3, "site-2", 0) != site_shuffle_seed(3, "site-1", 0)


def test_emulate_option_is_validated():
    with pytest.raises(ValueError, match="emulate"):
        FedConfig(rounds=1, clients_per_round=1, emulate="flower")
    assert FedConfig(rounds=1, clients_per_round=1).emulate == "none"  # earlier results keep their seeding


@pytest.mark.sim
@pytest.mark.timeout(900)
def test_nvflare_job_and_in_process_federation_train_the_same_model(tmp_path):
    from benchmarks import fedsim_faithfulness

    report = fedsim_faithfulness.main(
        ["--sites", "3", "--rounds", "3", "--noise-seeds", "1", "--out", str(tmp_path / "f.json")]
    )
    same = report["nvflare_vs_inprocess_emulating"]
    assert same["per_class_count_diffs_per_round"] == [0, 0, 0], same
    assert same["weights_max_abs"] < 1e-5, same  # the same arithmetic; only the sites' kernels could differ
    assert report["agree_within_noise"] and report["weights_closer_than_any_two_seeds"]
    nv = [r["acc"] for r in report["nvflare"]["per_round"]]
    assert np.all(np.asarray(nv) > 0.1)  # the job trained (a failed simulator run can exit 0)
