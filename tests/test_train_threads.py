"""The trainers' thread governor obeys OMP_NUM_THREADS: jobs that share the heavy-job lock run with 1 thread."""
import torch

from ldm_tools.train.threads import ThreadGovernor


def test_omp_num_threads_caps_the_governor(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        gov = ThreadGovernor(2)
        assert (gov.max_threads, gov.threads, torch.get_num_threads()) == (1, 1, 1)
        assert gov.update() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert ThreadGovernor(2).max_threads == 2
    finally:
        torch.set_num_threads(before)
