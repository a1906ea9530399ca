"""Editing sessions: a session's weight fingerprints are exact, so only a real change of the weights ends a run."""
import pytest
import torch

from conftest import session_on_one_projection
from mose_easyedit.session import get_session, weight_fingerprint


def test_a_session_survives_a_change_of_thread_count_between_calls():
    with session_on_one_projection(threads=1) as (model, session):
        # a float64 sum of this weight ends in other bits on two threads than on one
        torch.set_num_threads(2)
        assert get_session(model, "MOSE") is session


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_a_fingerprint_sees_a_one_ulp_change_and_a_swap(dtype):
    torch.manual_seed(0)
    weight = torch.randn(576, 1536).to(dtype)
    reference = weight_fingerprint(weight)
    assert weight_fingerprint(weight.clone()) == reference
    nudged = weight.clone()
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    nudged.view(bits)[300, 700] += 1  # the next representable value: one unit in the last place
    assert not torch.equal(nudged, weight)
    assert weight_fingerprint(nudged) != reference
    swapped = weight.clone()
    swapped[[3, 400], [5, 1200]] = weight[[400, 3], [1200, 5]]
    assert weight_fingerprint(swapped) != reference
    assert weight_fingerprint(weight.to(torch.float64 if dtype != torch.float64 else torch.float32)) != reference
